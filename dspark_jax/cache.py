"""KV-cache pytrees: static buffers, per-row lengths, write-at-offset and visibility masks. No commit policy here."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for every row.

    k, v: [layers, batch, cache_len, kv_heads, head_dim]; lengths: i32[batch] = number of valid positions per row.
    Entries at or beyond a row's length are stale and never visible: rolling back is a length update.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array

    @classmethod
    def zeros(cls, num_layers: int, batch: int, cache_len: int, kv_heads: int, head_dim: int, dtype) -> "KVCache":
        shape = (num_layers, batch, cache_len, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def cache_len(self) -> int:
        return self.k.shape[2]


def write_layer(buf: jax.Array, layer: int, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write new[b] into buf[layer, b, starts[b]:starts[b]+t] as one scatter.

    buf: [layers, batch, cache_len, ...]; new: [batch, t, ...]; starts: i32[batch]. A scatter into the stacked
    buffer stays in place inside a while_loop (slicing out a layer and setting it back made XLA copy the whole
    cache every round), and positions past cache_len are dropped rather than clamped onto valid rows.
    """
    b, t = new.shape[:2]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    cols = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    return buf.at[layer, rows, cols].set(new.astype(buf.dtype), mode="drop")


def causal_mask(q_positions: jax.Array, cache_len: int) -> jax.Array:
    """bool[batch, t, cache_len]: query at position p sees cache slots s <= p."""
    return jnp.arange(cache_len, dtype=jnp.int32)[None, None, :] <= q_positions[:, :, None]
