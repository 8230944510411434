"""Model classes by config type (a plain dict, no registry)."""

from dspark_jax.configs import DraftConfig, Qwen3Config
from dspark_jax.models.draft import Draft
from dspark_jax.models.qwen3 import Qwen3

MODELS = {Qwen3Config: Qwen3, DraftConfig: Draft}
