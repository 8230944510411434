"""Grouped-query attention with per-head q/k RMS norms and RoPE; the score/softmax core is shared with the draft.

The core works on partial softmax results over key segments (running max, sum, weighted values: `Partial`), so a query
can attend to several key sets without concatenating them (the draft's cached context plus its own block) and a
long cache can be read one key block at a time in bounded memory. K and V are heads-major: [batch, kv_heads, s,
head_dim], the cache layout (see cache.py). jax.nn.dot_product_attention is not used. Its XLA path measured 2-8x
slower than this core on a 2-core CPU (decode and prefill-chunk shapes) and, on an H200, 1.2-1.6x slower at 2k slots
and at most 6 % faster at 32k (benchmarks/attention_core.py). Its cuDNN path takes no general mask, and with
is_causal its diagonal does not fit a few queries at the end of a long prefix (its output was wrong there). It also
wants K/V as [batch, s, heads, head_dim] and averages instead of zeroing a query that sees nothing.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.cache import write_layer
from dspark_jax.layers.linear import compact, dense, out_major
from dspark_jax.layers.norms import RMSNorm
from dspark_jax.layers.params import declare
from dspark_jax.layers.rope import apply_rope, rope_frequencies

NEG = float(jnp.finfo(jnp.float32).min)
# Long caches are read in key blocks under an online softmax, and only the blocks below the largest visibility limit
# are read, so the f32 scores stay [b, kv_heads, q_rows, block] whatever the cache length. The block size is
# measured per backend (`key_block_for`):
# - CPU (2 cores, f32, t = 1 / 8 / 256-512 query rows): one dense pass is as fast or faster up to DENSE_CACHE_MAX
#   slots; beyond, KEY_BLOCK-slot blocks beat both the dense pass (2-3x with half the cache valid) and 1024-slot
#   blocks on prefill chunks.
# - GPU (H200, bf16, Qwen3-4B heads, 36 layers, 30000 of 32768 slots valid): each block is a loop iteration of
#   small kernels, so 512-slot blocks took 62 ms for 8 query rows and 31 ms for one, 8192-slot blocks 10.1 / 6.7 ms,
#   one dense pass 5.5 / 4.9 ms. There blocks are as large as ACCEL_SCORE_BYTES of scores allow (a decode or verify
#   pass reads its whole cache in one pass; a 512-row prefill chunk of a 32k prompt in two).
DENSE_CACHE_MAX = 2048
KEY_BLOCK = 512
ACCEL_SCORE_BYTES = 1 << 30


def key_block_for(backend: str, score_rows: int, cache_len: int) -> int:
    """Slots per key block for a cache of `cache_len` slots read by `score_rows` (= batch * q_heads * t) query rows;
    a block of at least `cache_len` means one dense pass."""
    if backend == "cpu":
        return cache_len if cache_len <= DENSE_CACHE_MAX else KEY_BLOCK
    fit = ACCEL_SCORE_BYTES // (4 * score_rows)  # f32 scores
    return max(KEY_BLOCK, 1 << (fit.bit_length() - 1) if fit else 0)


class Partial(NamedTuple):
    """Softmax attention over some keys, not yet normalised. Rows are [batch, kv_heads, groups, t].

    m: f32[b, k, g, t] running max score (NEG where nothing was visible); denom: f32[b, k, g, t] sum of
    exp(score - m) over visible keys; acc: f32[b, k, g, t, head_dim] the same weights applied to the values.
    """

    m: jax.Array
    denom: jax.Array
    acc: jax.Array


def heads_major(x: jax.Array) -> jax.Array:
    """[batch, s, kv_heads, head_dim] (projection order) -> [batch, kv_heads, s, head_dim] (attention order)."""
    return jnp.swapaxes(x, 1, 2)


def group_queries(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [batch, t, q_heads, head_dim] -> [batch, kv_heads, groups, t, head_dim]; query head i reads KV head
    i // groups."""
    b, t, n, h = q.shape
    return q.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def partial_attention(qg: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, scale: float) -> Partial:
    """One key segment. qg [b, k, g, t, h]; k, v [b, k, s, h]; visible: bool broadcastable to [b, k, g, t, s]."""
    b, kh, g, t, h = qg.shape
    # 4-D dots with (batch, kv_heads) leading and head_dim minor on both operands: no transposes of K or V.
    scores = jnp.einsum("bkrh,bksh->bkrs", qg.reshape(b, kh, g * t, h), k, preferred_element_type=jnp.float32)
    scores = jnp.where(visible, scores.reshape(b, kh, g, t, -1) * scale, NEG)
    m = jax.lax.stop_gradient(jnp.max(scores, axis=-1, initial=NEG))  # the result does not depend on m (it cancels)
    p = jnp.where(visible, jnp.exp(scores - m[..., None]), 0.0)
    acc = jnp.einsum(
        "bkrs,bksh->bkrh", p.reshape(b, kh, g * t, -1).astype(v.dtype), v, preferred_element_type=jnp.float32
    )
    return Partial(m, jnp.sum(p, axis=-1), acc.reshape(b, kh, g, t, h))


def merge(a: Partial, b: Partial) -> Partial:
    """The partial result over the union of two disjoint key sets."""
    m = jnp.maximum(a.m, b.m)
    ca, cb = jnp.exp(a.m - m), jnp.exp(b.m - m)  # 0 for a side that saw nothing next to one that did
    return Partial(m, a.denom * ca + b.denom * cb, a.acc * ca[..., None] + b.acc * cb[..., None])


def finish(p: Partial, dtype) -> jax.Array:
    """Normalise: [b, k, g, t, h] -> [b, t, q_heads, h] in `dtype`. A query that saw nothing gets a zero output (the
    reference's convention for dropped training blocks)."""
    out = p.acc / jnp.where(p.denom > 0, p.denom, 1.0)[..., None]
    b, kh, g, t, h = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kh * g, h).astype(dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Masked softmax attention with grouped KV heads, one dense pass.

    q: [batch, t, q_heads, head_dim]; k, v: [batch, kv_heads, s, head_dim]; mask: bool[batch, t, s].
    Returns [batch, t, q_heads, head_dim] in q's dtype; a query that sees nothing gets a zero output.
    """
    qg = group_queries(q, k.shape[1])
    return finish(partial_attention(qg, k, v, mask[:, None, None], scale), q.dtype)


def cache_attention(
    qg: jax.Array,
    k_all: jax.Array,
    v_all: jax.Array,
    layer: int,
    limits: jax.Array,
    scale: float,
    key_block: int | None = None,
) -> Partial:
    """Attention over one layer of a stacked cache: query (b, i) sees slots s < limits[b, i].

    qg [b, kv_heads, groups, t, h]; k_all, v_all: [layers, batch, kv_heads, cache_len, head_dim]; limits i32[b, t].
    Blocks of `key_block` slots (default `key_block_for` this backend); a cache no longer than one block is read in
    one dense pass. Longer: an online softmax over blocks in a while loop that visits only the blocks below
    max(limits), so memory is bounded by the block and a short context in a long cache reads only its own blocks.
    Blocks are sliced straight from the stacked buffer (no per-layer copy of the cache). Forward only (the loop's
    trip count is data).
    """
    cache_len = k_all.shape[3]
    b, kh, g, t, h = qg.shape
    key_block = key_block or key_block_for(jax.default_backend(), b * kh * g * t, cache_len)
    if cache_len <= key_block:
        visible = jnp.arange(cache_len, dtype=jnp.int32) < limits[..., None]  # [b, t, s]
        return partial_attention(qg, k_all[layer], v_all[layer], visible[:, None, None], scale)
    num_blocks = jnp.minimum(-(-jnp.max(limits) // key_block), -(-cache_len // key_block))

    def block(j, p):
        start = j * key_block
        lo = jnp.minimum(start, cache_len - key_block)  # a short last block overlaps its predecessor ...
        k = jax.lax.dynamic_slice(k_all, (layer, 0, 0, lo, 0), (1, b, kh, key_block, h))[0]
        v = jax.lax.dynamic_slice(v_all, (layer, 0, 0, lo, 0), (1, b, kh, key_block, h))[0]
        slots = lo + jnp.arange(key_block, dtype=jnp.int32)
        visible = (slots >= start) & (slots < limits[..., None])  # ... whose slots it masks out
        return merge(p, partial_attention(qg, k, v, visible[:, None, None], scale))

    empty = Partial(
        jnp.full((b, kh, g, t), NEG, jnp.float32),
        jnp.zeros((b, kh, g, t), jnp.float32),
        jnp.zeros((b, kh, g, t, h), jnp.float32),
    )
    return jax.lax.fori_loop(0, num_blocks, block, empty)


def dense_context(k: jax.Array, v: jax.Array, mask: jax.Array) -> Callable[[jax.Array, float], Partial]:
    """Context keys for `Attention.block`: k, v [batch, s, kv_heads, head_dim] (projection order) seen under
    mask bool[batch, t, s]."""
    k, v, visible = heads_major(k), heads_major(v), mask[:, None, None]
    return lambda qg, scale: partial_attention(qg, k, v, visible, scale)


def cached_context(k_all: jax.Array, v_all: jax.Array, layer: int, limits: jax.Array):
    """Context keys for `Attention.block` from one layer of a stacked cache: slots s < limits[b, i] (see
    cache_attention)."""
    return lambda qg, scale: cache_attention(qg, k_all, v_all, layer, limits, scale)


class Attention(nnx.Module):
    """Qwen3 self-attention: q/k/v projections per head, q/k RMSNorm per head before RoPE, no biases."""

    out_major = False  # True once the kernels are stored [out, in] (the CPU decode copy, layers/linear.py)

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

    def to_out_major(self) -> None:
        """Store the kernels out-major ([heads * head_dim, hidden], o: [hidden, heads * head_dim]), in place (for a
        decode copy: sharding and export expect the declared form). The per-head shapes stay in `head_dim`.

        k and v become one kernel `kv_proj` [2 * kv_heads * head_dim, hidden] (k's rows, then v's): one product
        instead of two. With the MLP's gate|up, on a 2-core AVX2 CPU, a chain of the embedded target's products ran
        15-24 % faster at 1 and 8 rows, and the decode loop 2-15 % faster at batch 1-64 (plain and `full`;
        benchmarks/RESULTS.md, session 27). q stays apart: the draft's context rows need only k and v (fusing it too
        gained nothing)."""
        self.q_proj.value = compact(out_major(self.q_proj[...], 1))
        kv = jnp.concatenate([out_major(self.k_proj[...], 1), out_major(self.v_proj[...], 1)])
        self.kv_proj = nnx.Param(compact(kv))
        del self.k_proj, self.v_proj
        self.o_proj.value = compact(out_major(self.o_proj[...], 2))
        self.out_major = True

    def _project(self, x: jax.Array, w) -> jax.Array:
        """x: [batch, t, hidden] through a q/k/v kernel -> [batch, t, heads, head_dim]."""
        w = w[...]
        w = w if self.out_major else w.reshape(w.shape[0], -1)
        return dense(x.astype(self.dtype), w, self.out_major).reshape(*x.shape[:2], -1, self.head_dim)

    def queries(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [batch, t, hidden], positions i32[batch, t] -> roped q [batch, t, q_heads, head_dim]."""
        return apply_rope(self.q_norm(self._project(x, self.q_proj)), positions, self.inv_freq)

    def keys_values(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [batch, t, hidden] -> roped, normed k and v, each [batch, t, kv_heads, head_dim]."""
        if self.out_major:  # the fused kernel: [batch, t, 2 * kv_heads, head_dim], k's heads first
            k, v = jnp.split(self._project(x, self.kv_proj), 2, axis=2)
        else:
            k, v = self._project(x, self.k_proj), self._project(x, self.v_proj)
        return apply_rope(self.k_norm(k), positions, self.inv_freq), v

    def output(self, a: jax.Array) -> jax.Array:
        """a: [batch, t, q_heads, head_dim] -> [batch, t, hidden]."""
        # One flat [t, n*h] x [n*h, d] dot: with the 3-D einsum XLA:CPU re-laid out (copied) the weight every step.
        b, t, n, h = a.shape
        w = self.o_proj[...]
        w = w if self.out_major else w.reshape(n * h, -1)
        return dense(a.reshape(b, t, n * h), w, self.out_major)

    def __call__(
        self, x: jax.Array, positions: jax.Array, kv: tuple | None = None, layer: int = 0, mask: jax.Array | None = None
    ):
        """Causal self-attention over a chunk, optionally through a cache.

        x: [batch, t, hidden]; positions: i32[batch, t] (consecutive per row). With `kv` = the stacked caches
        (k, v), each [layers, batch, kv_heads, cache_len, head_dim], the chunk's k/v are written into `layer` at
        positions[:, 0] first; then query position p sees cache slots s <= p. The cache's lengths are not read: the
        decode loop writes each chunk at its row's length, so those slots are the committed prefix plus this chunk,
        and a row that rewinds (writes below its old length) no longer sees the stale slots above. Slots past every
        query's position are not read at all (see cache_attention).
        mask: optional bool[batch, t, cache_len] (bool[batch, t, t] without a cache) replacing the causal rule, for
        tree verification (trees §4: chunk row i sits in slot positions[:, 0] + i but sees only its ancestors);
        positions need not be consecutive then. One dense pass over the whole cache.
        Returns (out, kv) with kv updated (None without a cache).
        """
        q = self.queries(x, positions)
        k, v = self.keys_values(x, positions)
        scale = self.head_dim**-0.5
        if kv is None:
            mask = positions[:, None, :] <= positions[:, :, None] if mask is None else mask
            return self.output(attend(q, heads_major(k), heads_major(v), mask, scale)), None
        k_all = write_layer(kv[0], layer, k, positions[:, 0])
        v_all = write_layer(kv[1], layer, v, positions[:, 0])
        if mask is not None:
            p = partial_attention(group_queries(q, k.shape[2]), k_all[layer], v_all[layer], mask[:, None, None], scale)
            return self.output(finish(p, q.dtype)), (k_all, v_all)
        p = cache_attention(group_queries(q, k.shape[2]), k_all, v_all, layer, positions + 1, scale)
        return self.output(finish(p, q.dtype)), (k_all, v_all)

    def block(
        self,
        x: jax.Array,
        positions: jax.Array,
        context: Callable[[jax.Array, float], Partial],
        own_mask: jax.Array,
        scale: float,
    ) -> jax.Array:
        """The draft's attention: block rows attend to context keys and to their own block, nothing is cached.

        x: [batch, t, hidden] (normed block rows); positions i32[batch, t]; context(qg, scale) -> Partial over the
        context keys (qg: [batch, kv_heads, groups, t, head_dim]); own_mask: bool[batch, t, t] over the block's own
        keys.
        Returns [batch, t, hidden].
        """
        q = self.queries(x, positions)
        k, v = self.keys_values(x, positions)
        qg = group_queries(q, k.shape[2])
        own = partial_attention(qg, heads_major(k), heads_major(v), own_mask[:, None, None], scale)
        return self.output(finish(merge(context(qg, scale), own), q.dtype))
