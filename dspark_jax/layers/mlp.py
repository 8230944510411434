"""Gated SiLU MLP: down(silu(gate x) * up x)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.layers.params import declare


class MLP(nnx.Module):
    def __init__(self, hidden: int, ffw: int, *, dtype: str, param_dtype: str, rngs: nnx.Rngs | None):
        self.dtype = dtype
        self.gate_proj = declare(rngs, (hidden, ffw), ("embed", "ffw"), param_dtype)
        self.up_proj = declare(rngs, (hidden, ffw), ("embed", "ffw"), param_dtype)
        self.down_proj = declare(rngs, (ffw, hidden), ("ffw", "embed"), param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [batch, seq, hidden] -> [batch, seq, hidden]."""
        x = x.astype(self.dtype)
        gate = jnp.einsum("btd,df->btf", x, self.gate_proj[...].astype(self.dtype))
        up = jnp.einsum("btd,df->btf", x, self.up_proj[...].astype(self.dtype))
        return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, self.down_proj[...].astype(self.dtype))
