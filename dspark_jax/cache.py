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


def write_rows(buf: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
    """Write new[b] into buf[b, starts[b]:starts[b]+t].

    buf: [batch, cache_len, ...]; new: [batch, t, ...]; starts: i32[batch]. Callers size buffers so that
    starts + t <= cache_len for live rows (dynamic_update_slice would clamp, shifting the write).
    """

    def one(row, chunk, start):
        return jax.lax.dynamic_update_slice_in_dim(row, chunk.astype(row.dtype), start, axis=0)

    return jax.vmap(one)(buf, new, starts)


def causal_mask(q_positions: jax.Array, cache_len: int) -> jax.Array:
    """bool[batch, t, cache_len]: query at position p sees cache slots s <= p."""
    return jnp.arange(cache_len, dtype=jnp.int32)[None, None, :] <= q_positions[:, :, None]


def prefix_mask(lengths: jax.Array, cache_len: int, t: int) -> jax.Array:
    """bool[batch, t, cache_len]: every query of a row sees slots s < lengths[row] (draft context, spec §4.4)."""
    visible = jnp.arange(cache_len, dtype=jnp.int32)[None, :] < lengths[:, None]
    return jnp.broadcast_to(visible[:, None, :], (lengths.shape[0], t, cache_len))
