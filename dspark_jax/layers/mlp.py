"""Gated SiLU MLP: down(silu(gate x) * up x)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.layers.linear import compact, dense, out_major
from dspark_jax.layers.params import declare


class MLP(nnx.Module):
    out_major = False  # True once the kernels are stored [out, in] (the CPU decode copy, layers/linear.py)

    def __init__(self, hidden: int, ffw: int, *, dtype: str, param_dtype: str, rngs: nnx.Rngs | None):
        self.dtype = dtype
        self.gate_proj = declare(rngs, (hidden, ffw), ("embed", "ffw"), param_dtype)
        self.up_proj = declare(rngs, (hidden, ffw), ("embed", "ffw"), param_dtype)
        self.down_proj = declare(rngs, (ffw, hidden), ("ffw", "embed"), param_dtype)

    def to_out_major(self) -> None:
        """Store the kernels out-major, in place (for a decode copy: sharding and export expect the declared form),
        gate and up as one kernel `gate_up_proj` [2 * ffw, hidden] (gate's rows first): one product instead of two
        (layers/attention.py `Attention.to_out_major`)."""
        gate_up = jnp.concatenate([out_major(self.gate_proj[...], 1), out_major(self.up_proj[...], 1)])
        self.gate_up_proj = nnx.Param(compact(gate_up))
        del self.gate_proj, self.up_proj
        self.down_proj.value = compact(out_major(self.down_proj[...], 1))
        self.out_major = True

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [batch, seq, hidden] -> [batch, seq, hidden]."""
        x = x.astype(self.dtype)
        if self.out_major:
            gate, up = jnp.split(dense(x, self.gate_up_proj[...], True), 2, axis=-1)
        else:
            gate, up = dense(x, self.gate_proj[...], False), dense(x, self.up_proj[...], False)
        return dense(jax.nn.silu(gate) * up, self.down_proj[...], self.out_major)
