"""RMSNorm with a learned scale that multiplies (`weight`, not `1 + weight`), statistics in f32."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from dspark_jax.layers.params import declare


def rms_normalize(x: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x / rms(x) over the last axis, computed in f32 and returned in f32."""
    x = x.astype(jnp.float32)
    return x * jnp.reciprocal(jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


class RMSNorm(nnx.Module):
    """Qwen3 RMSNorm: normalise in f32, cast to the compute dtype, then scale (the order transformers uses)."""

    def __init__(
        self,
        size: int,
        eps: float,
        *,
        dtype: str,
        param_dtype: str,
        rngs: nnx.Rngs | None,
        axis_name: str | None = "embed",
    ):
        self.eps = eps
        self.dtype = dtype
        self.weight = declare(rngs, (size,), (axis_name,), param_dtype, init="ones")

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return rms_normalize(x, self.eps).astype(self.dtype) * self.weight[...].astype(self.dtype)
