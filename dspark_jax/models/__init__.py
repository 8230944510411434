"""Model classes by config type (a plain dict, no registry)."""

from dspark_jax.configs import (
    DeepseekV4Config,
    DeepseekV4DraftConfig,
    DraftConfig,
    Gemma4Config,
    Qwen3Config,
    Qwen3MoeConfig,
)
from dspark_jax.models.deepseek_v4 import DeepseekV4
from dspark_jax.models.deepseek_v4_draft import DeepseekV4Draft
from dspark_jax.models.draft import Draft
from dspark_jax.models.gemma4_target import Gemma4
from dspark_jax.models.qwen3 import Qwen3
from dspark_jax.models.qwen3_moe import Qwen3Moe

MODELS = {
    DeepseekV4Config: DeepseekV4,
    DeepseekV4DraftConfig: DeepseekV4Draft,
    Qwen3Config: Qwen3,
    DraftConfig: Draft,
    Gemma4Config: Gemma4,
    Qwen3MoeConfig: Qwen3Moe,
}
