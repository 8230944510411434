"""Frozen, hashable configs (target, draft, decoding) built from HF `config.json` dicts, validated on creation.

One module per family (qwen3, gemma4, draft, decode; _common holds the shared field checks); everything public is
re-exported here, so `from dspark_jax.configs import X` is the import to use.
"""

from dspark_jax.configs._common import DTYPES, read_config_json
from dspark_jax.configs.decode import SamplingConfig, VerifyPolicy
from dspark_jax.configs.deepseek_v4 import DeepseekV4Config
from dspark_jax.configs.deepseek_v4_draft import DeepseekV4DraftConfig
from dspark_jax.configs.draft import MARKOV_HEAD_TYPES, DraftConfig
from dspark_jax.configs.gemma4 import (
    GEMMA4_ACTIVATIONS,
    GEMMA4_LAYER_TYPES,
    GEMMA4_ROPE_TYPES,
    Gemma4Config,
    Gemma4DraftGeometry,
)
from dspark_jax.configs.qwen3 import Qwen3Config
from dspark_jax.configs.qwen3_moe import Qwen3MoeConfig

__all__ = [
    "DTYPES",
    "GEMMA4_ACTIVATIONS",
    "GEMMA4_LAYER_TYPES",
    "GEMMA4_ROPE_TYPES",
    "MARKOV_HEAD_TYPES",
    "DeepseekV4Config",
    "DeepseekV4DraftConfig",
    "DraftConfig",
    "Gemma4Config",
    "Gemma4DraftGeometry",
    "Qwen3Config",
    "Qwen3MoeConfig",
    "SamplingConfig",
    "VerifyPolicy",
    "read_config_json",
]
