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
    return set_at(buf, (layer, rows, heads, cols), jnp.swapaxes(new, 1, 2))


def set_at(buf: jax.Array, index: tuple, new: jax.Array) -> jax.Array:
    """buf.at[index].set(new in buf's dtype, mode="drop"). On CPU a 16-bit float buffer is written as its bits
    (`as_bits`): XLA:CPU scatters into a bf16 buffer through an f32 copy of the whole buffer and back, so a bf16
    model's every layer write converted the whole stacked cache twice (24 conversions of 3 M elements a step at batch
    16 on the embedded target: half its step time; benchmarks/RESULTS.md, 2026-12-05 session 19). Inside a loop whose
    carry is bf16, XLA:CPU still copies the buffer into its bits and back once an iteration, which is why the decode
    and prefill loops carry 16-bit arrays as bits too. Accelerators scatter 16-bit values natively, and a copy of the
    whole cache there would cost more than it saves: the plain scatter.
    """
    bits = as_bits(buf).at[index].set(as_bits(new.astype(buf.dtype)), mode="drop")
    return as_values(bits, buf.dtype)


def as_bits(tree):
    """On CPU, `tree` with every 16-bit float array as its uint16 bits; elsewhere `tree` itself. Loops that write
    16-bit caches carry them so: with a bf16 carry XLA:CPU copied each cache into its bits and back every iteration
    around `set_at`'s writes (4.5 of 21 ms a step at batch 64 on the embedded target in bf16), while the
    reinterpretations at an iteration's ends and the writes' own cancel out (benchmarks/RESULTS.md, 2026-12-05)."""
    if jax.default_backend() != "cpu":
        return tree

    def bits(a):
        narrow = jnp.issubdtype(a.dtype, jnp.floating) and a.dtype.itemsize == 2
        return jax.lax.bitcast_convert_type(a, jnp.uint16) if narrow else a

    return jax.tree.map(bits, tree)


def as_values(tree, dtypes):
    """`as_bits` undone: each array back in its dtype in `dtypes` (a pytree of dtypes like `tree`'s; one dtype for
    one array)."""
    return jax.tree.map(lambda a, d: a if a.dtype == d else jax.lax.bitcast_convert_type(a, d), tree, dtypes)


def tree_mask(parents: jax.Array, anchor_positions: jax.Array, cache_len: int, depth: int) -> jax.Array:
    """Visibility of a tree verify pass (trees §4): bool[batch, N+1, cache_len].

    parents: i32[batch, N] node parents (-1 = the anchor, parents[j] < j); anchor_positions: i32[batch] P; the pass
    writes row i (row 0 = anchor, row 1 + j = node j) into slot P + i; depth: the deepest path has at most `depth`
    nodes. Row i sees the prefix (slots < P), itself and its ancestors.
    """
    b, n = parents.shape
    prow = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), 1 + jnp.maximum(parents.astype(jnp.int32), -1)], axis=1)
    anc = jnp.broadcast_to(jnp.eye(n + 1, dtype=bool), (b, n + 1, n + 1))
    for _ in range(depth):  # A^{t+1}[i] = A^t[i] | A^t[prow[i]]: after `depth` steps every ancestor is in
        anc = anc | jnp.take_along_axis(anc, jnp.broadcast_to(prow[:, :, None], anc.shape), axis=1)
    slots = jnp.arange(cache_len, dtype=jnp.int32)[None, :]
    rel = slots - anchor_positions[:, None]  # [b, S]
    in_tree = (rel >= 0) & (rel <= n)
    seen = jnp.take_along_axis(anc, jnp.broadcast_to(jnp.clip(rel, 0, n)[:, None, :], (b, n + 1, cache_len)), axis=2)
    return (rel < 0)[:, None, :] | (in_tree[:, None, :] & seen)


def compact_path(cache: KVCache, path: jax.Array, anchor_positions: jax.Array) -> KVCache:
    """Move the accepted path's K/V from its scratch slots into place after a tree round (trees §4).

    path: i32[batch, B] accepted node ids in path order, -1 padded; node j's K/V sit in slot P + 1 + j, and the
    path's d-th node belongs in slot P + 1 + d. One gather then one scatter over every layer; entries past the
    accepted length land beyond the new length (stale, like rolled-back chain rows). Lengths are left alone.
    """
    b, depth = path.shape
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    src = jnp.clip(anchor_positions[:, None] + 1 + jnp.maximum(path, 0), 0, cache.cache_len - 1)
    dst = anchor_positions[:, None] + 1 + jnp.arange(depth, dtype=jnp.int32)[None, :]
    k = set_at(cache.k, (slice(None), rows, slice(None), dst), cache.k[:, rows, :, src])
    v = set_at(cache.v, (slice(None), rows, slice(None), dst), cache.v[:, rows, :, src])
    return dataclasses.replace(cache, k=k, v=v)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressorCache:
    """One DeepSeek-V4 compressor's decoding state (V4 §2.6, §2.9), indexed by absolute position.

    kv, gate: [batch, cache_len, overlap * width] every token's projections a_s and z_s (z with its ape row added);
    the open window is simply the newest of them. entries: [batch, num_entries, width] compressed entry w at row w
    (normed and roped). A pass starting at P rewrites every token >= P and every entry w >= P // ratio, so rows
    past a row's committed length are never read before they are rewritten: rollback is a length update.
    """

    kv: jax.Array
    gate: jax.Array
    entries: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class V4LayerCache:
    """One DeepSeek-V4 layer: raw K=V vectors [batch, cache_len, head_dim] (the sliding window reads the newest W
    below each query), the attention compressor (None in SWA layers) and the indexer's (CSA layers only)."""

    window: jax.Array
    compressor: CompressorCache | None = None
    indexer: CompressorCache | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeepseekV4Cache:
    """Decoding state of every DeepSeek-V4 layer plus per-row lengths i32[batch].

    Everything is stored by absolute position (no ring), so, as with KVCache, a forward at positions >= P sees only
    rows < P and its own chunk, and rolling a row back to P is setting its length: a verify block's rejected rows,
    a compressed entry they closed and the compressor's open window are all rebuilt by the next pass from P.
    """

    layers: tuple[V4LayerCache, ...]
    lengths: jax.Array

    @property
    def cache_len(self) -> int:
        return self.layers[0].window.shape[1]

    @property
    def k(self) -> tuple[jax.Array, ...]:
        """The raw K=V buffers of every layer (what a timing harness may block on)."""
        return tuple(layer.window for layer in self.layers)
