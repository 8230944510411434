"""dspark_jax: DSpark speculative decoding in JAX / Flax NNX.

    import dspark_jax as dj
    target = dj.load_target("Qwen/Qwen3-4B")
    draft = dj.load_draft("deepseek-ai/dspark_qwen3_4b_block7", target=target)
    result = dj.generate(target, draft, prompts=[[...]], max_new_tokens=256)

Heavy modules load on first use, so `import dspark_jax` stays cheap.
"""

from dspark_jax.configs import DraftConfig, Qwen3Config, SamplingConfig, VerifyPolicy
from dspark_jax.errors import DSparkError, UsageError

__version__ = "0.1.0"

_LAZY = {
    "load_target": "dspark_jax.loading",
    "load_draft": "dspark_jax.loading",
    "load_gemma4_draft": "dspark_jax.loading",
    "Target": "dspark_jax.loading",
    "DraftHandle": "dspark_jax.loading",
    "generate": "dspark_jax.decoding.loop",
    "GenerateResult": "dspark_jax.decoding.loop",
    "TreeConfig": "dspark_jax.decoding.tree",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dspark_jax' has no attribute {name!r}")


__all__ = ["DraftConfig", "Qwen3Config", "SamplingConfig", "VerifyPolicy", "DSparkError", "UsageError", *_LAZY]
