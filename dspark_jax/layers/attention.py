"""Grouped-query attention with per-head q/k RMS norms and RoPE; the score/softmax core is shared with the draft."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.cache import causal_mask, write_layer
from dspark_jax.layers.norms import RMSNorm
from dspark_jax.layers.params import declare
from dspark_jax.layers.rope import apply_rope, rope_frequencies


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Masked softmax attention with grouped KV heads.

    q: [batch, t, q_heads, head_dim]; k, v: [batch, s, kv_heads, head_dim]; mask: bool[batch, t, s].
    Returns [batch, t, q_heads, head_dim] in q's dtype. Query head i reads KV head i // (q_heads / kv_heads).
    A query that sees nothing gets a zero output (the reference's convention for dropped training blocks).
    """
    b, t, n, h = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, h)  # [b, t, k, g, h]
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    visible = mask[:, None, None, :, :]
    scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1) * jnp.any(visible, axis=-1, keepdims=True)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)  # [b, t, n, h]


class Attention(nnx.Module):
    """Qwen3 self-attention: q/k/v projections per head, q/k RMSNorm per head before RoPE, no biases."""

    def __init__(
        self,
        hidden: int,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
        rope_theta: float,
        rope_scaling: tuple | None,
        *,
        dtype: str,
        param_dtype: str,
        rngs: nnx.Rngs | None,
    ):
        self.dtype = dtype
        self.head_dim = head_dim
        self.rope = (rope_theta, rope_scaling)  # static: the frequency table is recomputed (constant-folded)
        self.q_proj = declare(rngs, (hidden, q_heads, head_dim), ("embed", "q_heads", "head_dim"), param_dtype)
        self.k_proj = declare(rngs, (hidden, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = declare(rngs, (hidden, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = declare(rngs, (q_heads, head_dim, hidden), ("q_heads", "head_dim", "embed"), param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, axis_name="head_dim")
        self.q_norm = RMSNorm(head_dim, eps, **kw)
        self.k_norm = RMSNorm(head_dim, eps, **kw)

    @property
    def inv_freq(self) -> jax.Array:
        return rope_frequencies(self.head_dim, *self.rope)

    def queries(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [batch, t, hidden], positions i32[batch, t] -> roped q [batch, t, q_heads, head_dim]."""
        q = jnp.einsum("btd,dnh->btnh", x.astype(self.dtype), self.q_proj[...].astype(self.dtype))
        return apply_rope(self.q_norm(q), positions, self.inv_freq)

    def keys_values(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [batch, t, hidden] -> roped, normed k and v, each [batch, t, kv_heads, head_dim]."""
        x = x.astype(self.dtype)
        k = jnp.einsum("btd,dkh->btkh", x, self.k_proj[...].astype(self.dtype))
        v = jnp.einsum("btd,dkh->btkh", x, self.v_proj[...].astype(self.dtype))
        return apply_rope(self.k_norm(k), positions, self.inv_freq), v

    def output(self, a: jax.Array) -> jax.Array:
        """a: [batch, t, q_heads, head_dim] -> [batch, t, hidden]."""
        # One flat [t, n*h] x [n*h, d] dot: with the 3-D einsum XLA:CPU re-laid out (copied) the weight every step.
        b, t, n, h = a.shape
        w = self.o_proj[...].astype(self.dtype).reshape(n * h, -1)
        return jnp.dot(a.reshape(b, t, n * h), w)

    def __call__(self, x: jax.Array, positions: jax.Array, kv: tuple | None = None, layer: int = 0):
        """Causal self-attention over a chunk, optionally through a cache.

        x: [batch, t, hidden]; positions: i32[batch, t] (consecutive per row). With `kv` = the stacked caches
        (k, v), each [layers, batch, cache_len, kv_heads, head_dim], the chunk's k/v are written into `layer` at
        positions[:, 0] first and queries attend to every slot at or before their position.
        Returns (out, kv) with kv updated (None without a cache).
        """
        q = self.queries(x, positions)
        k, v = self.keys_values(x, positions)
        scale = self.head_dim**-0.5
        if kv is None:
            mask = positions[:, None, :] <= positions[:, :, None]
            return self.output(attend(q, k, v, mask, scale)), None
        k_all = write_layer(kv[0], layer, k, positions[:, 0])
        v_all = write_layer(kv[1], layer, v, positions[:, 0])
        mask = causal_mask(positions, k_all.shape[2])
        return self.output(attend(q, k_all[layer], v_all[layer], mask, scale)), (k_all, v_all)
