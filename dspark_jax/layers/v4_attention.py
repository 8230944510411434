"""DeepSeek-V4 attention (V4 §2.4-2.7): interleaved tail RoPE with YaRN, low-rank queries, one shared K=V vector,
sinks, grouped low-rank output, the sliding window, the compressors (CSA 1:4 overlapped, HCA 1:128) and the
Lightning indexer's top-k.

Every layer runs through a `V4LayerCache` whose buffers are indexed by absolute position (cache.py): the chunk's
K=V vectors and compressor projections are written at its positions first, entries whose window closes inside the
chunk are computed from those buffers, and the queries then read the window below them and the compressed entries
they may see. The full (uncached) forward is the same code on a fresh cache as long as the chunk.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.cache import CompressorCache, V4LayerCache, set_at
from dspark_jax.layers.norms import rms_normalize
from dspark_jax.layers.params import declare

NEG = float(jnp.finfo(jnp.float32).min)


# ----------------------------------------------------------------------------------------------------------- RoPE
def v4_inv_freq(rope_dim: int, base: float, yarn: tuple | None = None) -> tuple[float, ...]:
    """f_i = base^(-2i/rope_dim), i < rope_dim/2, with V4's YaRN correction when `yarn` (sorted pairs) is given.

    YaRN (V4 §2.4): pairs below `lo` keep f_i, pairs from `hi` on are divided by `factor`, a linear ramp between;
    lo/hi from the correction dims of beta_fast / beta_slow at original_max_position_embeddings. Computed in f32
    like the reference so the tables agree bit for bit; returned as a static tuple.
    """
    exponents = np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim)
    pos_freqs = np.power(np.float32(base), exponents, dtype=np.float32)
    inv = (np.float32(1.0) / pos_freqs).astype(np.float32)
    if yarn:
        p = dict(yarn)
        factor, l0 = float(p["factor"]), float(p["original_max_position_embeddings"])

        def corr(rotations):
            return rope_dim * math.log(l0 / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo = max(math.floor(corr(float(p.get("beta_fast", 32.0)))), 0)
        hi = min(math.ceil(corr(float(p.get("beta_slow", 1.0)))), rope_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - lo) / np.float32(hi - lo), 0, 1).astype(np.float32)
        keep = (np.float32(1.0) - ramp).astype(np.float32)
        interpolated = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
        inv = (interpolated * (np.float32(1.0) - keep) + inv * keep).astype(np.float32)
    return tuple(float(v) for v in inv)


def rope_angles(positions: jax.Array, inv_freq: tuple[float, ...]) -> tuple[jax.Array, jax.Array]:
    """positions i32[...] -> (cos, sin) f32[..., rope_dim / 2]."""
    # Highest precision: a bf16 product of a large position and a frequency loses whole radians.
    freqs = jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.einsum("...,f->...f", positions.astype(jnp.float32), freqs, precision=jax.lax.Precision.HIGHEST)
    return jnp.cos(angles), jnp.sin(angles)


def rope_tail(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Interleaved RoPE on the last 2 * cos.shape[-1] dims of x (pairs (2i, 2i+1)), the rest untouched.

    x: [..., dim]; cos, sin: f32 broadcastable to x[..., :rope_dim / 2] (pass -sin to undo the rotation).
    """
    half = cos.shape[-1]
    head, tail = x[..., : x.shape[-1] - 2 * half], x[..., x.shape[-1] - 2 * half :]
    pairs = tail.astype(jnp.float32).reshape(*tail.shape[:-1], half, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(tail.shape)
    return jnp.concatenate([head, rotated.astype(x.dtype)], axis=-1)


# ---------------------------------------------------------------------------------------------------- helpers
def write_rows(buf: jax.Array, starts: jax.Array, new: jax.Array) -> jax.Array:
    """buf[b, starts[b] + i] = new[b, i]; buf [batch, len, ...], new [batch, t, ...]; rows past len are dropped."""
    b, t = new.shape[:2]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    cols = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
    return set_at(buf, (rows, cols), new)


def read_rows(buf: jax.Array, index: jax.Array) -> jax.Array:
    """buf [batch, len, ...] at index i32[batch, ...] (clipped into range) -> [batch, ..., rest]."""
    index = jnp.clip(index, 0, buf.shape[1] - 1)
    return jax.vmap(lambda a, i: a[i])(buf, index)


class V4Norm(nnx.Module):
    """V4 RMSNorm: normalise and multiply by the weight in f32, cast once at the end (V4 §2.1)."""

    def __init__(self, size: int, eps: float, *, dtype: str, param_dtype: str, rngs, axis_name: str | None = None):
        self.eps, self.dtype = eps, dtype
        self.weight = declare(rngs, (size,), (axis_name,), param_dtype, init="ones")

    def __call__(self, x: jax.Array, dtype=None) -> jax.Array:
        out = rms_normalize(x, self.eps) * self.weight[...].astype(jnp.float32)
        return out.astype(dtype or self.dtype)


class AttentionShape(NamedTuple):
    """What one V4 attention layer needs from the config (static)."""

    hidden: int
    heads: int
    head_dim: int
    rope_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    window: int
    ratio: int  # 0 SWA, 4 CSA, 128 HCA
    index_heads: int
    index_head_dim: int
    index_topk: int
    eps: float
    inv_freq: tuple[float, ...]  # this layer's RoPE table: main for ratio 0, compress (with YaRN) otherwise


# ------------------------------------------------------------------------------------------------ compressor
class Compressor(nnx.Module):
    """Gated pooling of `ratio` tokens into one `width`-wide entry (V4 §2.6); ratio 4 overlaps two windows.

    Params: wkv, wgate [hidden, c * width] (x @ W), ape f32[ratio, c * width], norm.weight [width]; c = 2 for ratio 4
    (slots: A halves [0:width] of window w-1 and B halves [width:2 width] of window w), else 1.
    """

    def __init__(self, hidden: int, width: int, ratio: int, eps: float, *, dtype, param_dtype, rngs):
        self.width, self.ratio, self.dtype = width, ratio, dtype
        self.overlap = 2 if ratio == 4 else 1
        c = self.overlap
        self.wkv = declare(rngs, (hidden, c * width), ("embed", None), param_dtype)
        self.wgate = declare(rngs, (hidden, c * width), ("embed", None), param_dtype)
        self.ape = declare(rngs, (ratio, c * width), (None, None), "float32", init="zeros")
        self.norm = V4Norm(width, eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def init_cache(self, batch: int, cache_len: int) -> CompressorCache:
        c, w = self.overlap, self.width
        z = jnp.zeros((batch, cache_len, c * w), self.dtype)
        return CompressorCache(z, z, jnp.zeros((batch, -(-cache_len // self.ratio), w), self.dtype))

    def __call__(
        self, x: jax.Array, positions: jax.Array, cache: CompressorCache, inv_freq: tuple[float, ...]
    ) -> CompressorCache:
        """Write the chunk's a_s, z_s at its positions and (re)compute every entry that may close in the chunk.

        x: [batch, t, hidden] normed attention input; positions i32[batch, t] consecutive per row.
        Entries w >= positions[:, 0] // ratio are rewritten: those whose window closes inside the chunk come out
        right; later ones are stale until a pass closes them, and no query sees them before (visibility w <
        (p + 1) // ratio).
        """
        b, t, _ = x.shape
        m, c, width = self.ratio, self.overlap, self.width
        xd = x.astype(self.dtype)
        a = jnp.einsum("btd,dc->btc", xd, self.wkv[...].astype(self.dtype))
        z = jnp.einsum("btd,dc->btc", xd, self.wgate[...].astype(self.dtype))
        z = z + self.ape[...][positions % m].astype(self.dtype)
        start = positions[:, 0]
        kv_buf = write_rows(cache.kv, start, a)
        gate_buf = write_rows(cache.gate, start, z)
        first = start // m
        n_new = t // m + 1
        w_idx = first[:, None] + jnp.arange(n_new, dtype=jnp.int32)[None, :]  # [b, n]
        slot = jnp.arange(c * m, dtype=jnp.int32)
        pos = (w_idx[..., None] - (c - 1)) * m + slot  # [b, n, c*m] token of each slot
        half = slot // m  # 0: A half (window w-1 when c = 2, or the only half), 1: B half (window w)
        flat_index = jnp.clip(pos, 0, kv_buf.shape[1] - 1) * c + half  # rows of the [b, len * c, width] view
        a_sel = read_rows(kv_buf.reshape(b, -1, width), flat_index)  # [b, n, c*m, width]
        z_sel = read_rows(gate_buf.reshape(b, -1, width), flat_index).astype(jnp.float32)
        z_sel = jnp.where((pos >= 0)[..., None], z_sel, -jnp.inf)  # entry 0 has no window -1
        weights = jax.nn.softmax(z_sel, axis=2)  # per channel, over the slots
        pooled = jnp.sum(a_sel * weights.astype(a_sel.dtype), axis=2)  # [b, n, width]
        cos, sin = rope_angles(w_idx * m, inv_freq)
        new_entries = rope_tail(self.norm(pooled), cos, sin)
        return CompressorCache(kv_buf, gate_buf, write_rows(cache.entries, first, new_entries))


class Indexer(nnx.Module):
    """Lightning indexer (V4 §2.7): scores each query against the 1:4 indexer keys and keeps the top `topk` visible.

    Params: wq_b [q_lora_rank, index_heads, index_head_dim], weights_proj [hidden, index_heads], compressor.
    """

    def __init__(self, s: AttentionShape, *, dtype, param_dtype, rngs):
        self.dtype, self.heads, self.head_dim, self.topk = dtype, s.index_heads, s.index_head_dim, s.index_topk
        self.wq_b = declare(rngs, (s.q_lora_rank, s.index_heads, s.index_head_dim), ("rank", None, None), param_dtype)
        self.weights_proj = declare(rngs, (s.hidden, s.index_heads), ("embed", None), param_dtype)
        self.compressor = Compressor(
            s.hidden, s.index_head_dim, 4, s.eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def select(
        self, x: jax.Array, q_r: jax.Array, positions: jax.Array, keys: jax.Array, cos, sin
    ) -> tuple[jax.Array, jax.Array]:
        """Top-k entries per query: (index i32[b, t, k], valid bool[b, t, k]); k = min(topk, entries).

        x: [b, t, hidden]; q_r: [b, t, q_lora_rank]; keys: indexer entries [b, entries, index_head_dim].
        Ties: lax.top_k on the index list (never a threshold), so at most k picks; masked picks are invalid.
        """
        q = jnp.einsum("btr,rnh->btnh", q_r.astype(self.dtype), self.wq_b[...].astype(self.dtype))
        q = rope_tail(q, cos[:, :, None], sin[:, :, None])
        w = jnp.einsum("btd,dn->btn", x.astype(self.dtype), self.weights_proj[...].astype(self.dtype))
        w = w.astype(jnp.float32) * self.heads**-0.5
        s = jnp.einsum("btnh,beh->btne", q, keys, preferred_element_type=jnp.float32)
        s = jax.nn.relu(s) * self.head_dim**-0.5
        scores = jnp.einsum("btn,btne->bte", w, s)
        limit = ((positions + 1) // 4)[..., None]  # entries w < limit are complete for query p
        entry = jnp.arange(keys.shape[1], dtype=jnp.int32)
        scores = jnp.where(entry < limit, scores, -jnp.inf)
        _, index = jax.lax.top_k(scores, min(self.topk, keys.shape[1]))
        return index, index < limit


# ------------------------------------------------------------------------------------------------- attention
class V4Attention(nnx.Module):
    """One V4 attention layer (V4 §2.5): window + (HCA: all visible entries | CSA: indexer top-k) + sink.

    Params: attn_sink f32[heads]; wq_a [hidden, q_lora_rank]; q_norm; wq_b [q_lora_rank, heads, head_dim];
    wkv [hidden, head_dim]; kv_norm; wo_a [heads * head_dim / G, G * o_lora_rank] (x @ W of the checkpoint's
    [G * d_g, heads * head_dim / G]: group g uses columns g*d_g .. (g+1)*d_g - 1); wo_b [G * o_lora_rank, hidden];
    compressor (ratio > 0) and indexer (ratio 4).
    """

    def __init__(self, s: AttentionShape, *, dtype: str, param_dtype: str, rngs):
        self.s, self.dtype = s, dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn_sink = declare(rngs, (s.heads,), ("q_heads",), "float32", init="zeros")
        self.wq_a = declare(rngs, (s.hidden, s.q_lora_rank), ("embed", "rank"), param_dtype)
        self.q_norm = V4Norm(s.q_lora_rank, s.eps, **kw)
        self.wq_b = declare(rngs, (s.q_lora_rank, s.heads, s.head_dim), ("rank", "q_heads", "head_dim"), param_dtype)
        self.wkv = declare(rngs, (s.hidden, s.head_dim), ("embed", "head_dim"), param_dtype)
        self.kv_norm = V4Norm(s.head_dim, s.eps, **kw)
        group_in = s.heads * s.head_dim // s.o_groups
        self.wo_a = declare(rngs, (group_in, s.o_groups * s.o_lora_rank), (None, None), param_dtype)
        self.wo_b = declare(rngs, (s.o_groups * s.o_lora_rank, s.hidden), (None, "embed"), param_dtype)
        if s.ratio:
            self.compressor = Compressor(s.hidden, s.head_dim, s.ratio, s.eps, **kw)
        if s.ratio == 4:
            self.indexer = Indexer(s, **kw)

    def init_cache(self, batch: int, cache_len: int) -> V4LayerCache:
        s = self.s
        return V4LayerCache(
            jnp.zeros((batch, cache_len, s.head_dim), self.dtype),
            self.compressor.init_cache(batch, cache_len) if s.ratio else None,
            self.indexer.compressor.init_cache(batch, cache_len) if s.ratio == 4 else None,
        )

    def __call__(self, x: jax.Array, positions: jax.Array, cache: V4LayerCache) -> tuple[jax.Array, V4LayerCache]:
        """x: [batch, t, hidden] (normed); positions i32[batch, t], consecutive per row, starting at each row's
        committed length. Returns ([batch, t, hidden], the cache with the chunk written)."""
        s, dt = self.s, self.dtype
        b, t, _ = x.shape
        start = positions[:, 0]
        cos, sin = rope_angles(positions, s.inv_freq)  # [b, t, rope_dim / 2]
        xd = x.astype(dt)
        q_r = self.q_norm(jnp.einsum("btd,dr->btr", xd, self.wq_a[...].astype(dt)))
        q = jnp.einsum("btr,rnh->btnh", q_r, self.wq_b[...].astype(dt))
        q = (rms_normalize(q, s.eps)).astype(dt)  # per-head norm without weight
        q = rope_tail(q, cos[:, :, None], sin[:, :, None])
        k = rope_tail(self.kv_norm(jnp.einsum("btd,dh->bth", xd, self.wkv[...].astype(dt))), cos, sin)

        # Sliding window: the W - 1 committed positions below the chunk, then the chunk itself. The history is read
        # from the cache after the chunk's write (it lies below the chunk, so the write leaves it as it was): read
        # from the buffer before the write, XLA kept both and copied each layer's window twice a round.
        window = write_rows(cache.window, start, k)
        hist_pos = start[:, None] - (s.window - 1) + jnp.arange(s.window - 1, dtype=jnp.int32)[None, :]
        keys = jnp.concatenate([read_rows(window, hist_pos).astype(dt), k], axis=1)  # [b, W-1+t, h]
        key_pos = jnp.concatenate([hist_pos, positions], axis=1)
        qp, kp = positions[:, :, None], key_pos[:, None, :]
        window_mask = (kp >= 0) & (kp <= qp) & (kp > qp - s.window)  # [b, t, W-1+t]
        new_cache = V4LayerCache(window, cache.compressor, cache.indexer)

        compressed = None
        if s.ratio:
            comp = self.compressor(xd, positions, cache.compressor, s.inv_freq)
            new_cache = V4LayerCache(new_cache.window, comp, None)
            limit = ((positions + 1) // s.ratio)[..., None]
            if s.ratio == 4:
                idx = self.indexer.compressor(xd, positions, cache.indexer, s.inv_freq)
                new_cache = V4LayerCache(new_cache.window, comp, idx)
                index, valid = self.indexer.select(xd, q_r, positions, idx.entries, cos, sin)
                compressed = ("per_query", read_rows(comp.entries, index), valid)  # [b, t, k, h]
            else:
                entry = jnp.arange(comp.entries.shape[1], dtype=jnp.int32)
                compressed = ("shared", comp.entries, entry < limit)  # [b, e, h], mask [b, t, e]

        out = self._attend(q, keys, window_mask, compressed)
        out = rope_tail(out, cos[:, :, None], -sin[:, :, None])  # values carry RoPE: undo it at the query position
        g = s.o_groups
        grouped = out.reshape(b, t, g, -1)  # contiguous heads per group
        wo_a = self.wo_a[...].astype(dt).reshape(grouped.shape[-1], g, s.o_lora_rank)
        u = jnp.einsum("btgi,igr->btgr", grouped, wo_a).reshape(b, t, g * s.o_lora_rank)
        return jnp.einsum("btr,rd->btd", u, self.wo_b[...].astype(dt)), new_cache

    def _attend(self, q, keys, window_mask, compressed):
        """Softmax over window keys, compressed keys and the sink column (zero value), in f32.

        q [b, t, n, h]; keys [b, s, h] with window_mask [b, t, s]; compressed: None, ("shared", [b, e, h],
        mask [b, t, e]) or ("per_query", [b, t, k, h], mask [b, t, k]). Returns [b, t, n, h] in the compute dtype.
        """
        scale = self.s.head_dim**-0.5
        parts = [jnp.einsum("btnh,bsh->btns", q, keys, preferred_element_type=jnp.float32)]
        masks = [window_mask]
        if compressed is not None:
            kind, ck, cmask = compressed
            spec = "btnh,beh->btne" if kind == "shared" else "btnh,btkh->btnk"
            parts.append(jnp.einsum(spec, q, ck.astype(q.dtype), preferred_element_type=jnp.float32))
            masks.append(cmask)
        scores = jnp.concatenate(parts, axis=-1) * scale
        mask = jnp.concatenate(masks, axis=-1)[:, :, None, :]
        scores = jnp.where(mask, scores, NEG)
        sink = self.attn_sink[...].astype(jnp.float32)[None, None, :]  # [1, 1, n]
        m = jnp.maximum(jnp.max(scores, axis=-1), sink)
        p = jnp.where(mask, jnp.exp(scores - m[..., None]), 0.0)
        denom = jnp.sum(p, axis=-1) + jnp.exp(sink - m)
        p = (p / denom[..., None]).astype(q.dtype)
        s_len = keys.shape[1]
        out = jnp.einsum("btns,bsh->btnh", p[..., :s_len], keys, preferred_element_type=jnp.float32)
        if compressed is not None:
            kind, ck, _ = compressed
            spec = "btne,beh->btnh" if kind == "shared" else "btnk,btkh->btnh"
            out = out + jnp.einsum(spec, p[..., s_len:], ck.astype(q.dtype), preferred_element_type=jnp.float32)
        return out.astype(q.dtype)
