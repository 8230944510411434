"""KV-cache pytrees: static buffers, per-row lengths, write-at-offset. No commit policy here."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for every row.

    k, v: [layers, batch, kv_heads, cache_len, head_dim]; lengths: i32[batch] = number of valid positions per row.
    Heads before slots: one layer's [batch, kv_heads, cache_len, head_dim] is already in the batch-major order the
    attention dots contract over (batch dims (batch, kv_heads), head_dim minor), so XLA does not transpose K and V
    every decode step (it did with [.., cache_len, kv_heads, ..]). Entries at or beyond a row's length are stale and
    never visible: rolling back is a length update.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, cache_len: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (num_layers, batch, kv_heads, cache_len, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def cache_len(self) -> int:
        return self.k.shape[3]


def write_layer(buf: jax.Array, layer: int, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write new[b] into buf[layer, b, :, starts[b]:starts[b]+t] as one scatter.

    buf: [layers, batch, kv_heads, cache_len, head_dim]; new: [batch, t, kv_heads, head_dim] (the projections'
    order); starts: i32[batch]; `layer` may be traced. A scatter into the stacked buffer stays in place inside a
    while_loop (slicing out a layer and setting it back made XLA copy the whole cache every round), and positions
    past cache_len are dropped rather than clamped onto valid rows.
    """
    b, t, kh = new.shape[:3]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None, None]
    heads = jnp.arange(kh, dtype=jnp.int32)[None, :, None]
    cols = starts[:, None, None] + jnp.arange(t, dtype=jnp.int32)[None, None, :]
    return buf.at[layer, rows, heads, cols].set(jnp.swapaxes(new, 1, 2).astype(buf.dtype), mode="drop")
