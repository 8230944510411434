"""Gemma4 target (the text stack of Gemma4ForCausalLM / Gemma4ForConditionalGeneration): tokens -> final hidden
states, tapped layer outputs and the updated KV cache; soft-capped logits on demand.

Built from the draft's Gemma4 pieces (models/gemma4.py). Sliding-window layers keep a full-length cache and mask by
window; they read only the window's slots. Sliding and full-attention layers differ in head dim and KV heads, so the
cache holds one stack per layer type.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.cache import write_layer
from dspark_jax.configs import Gemma4Config
from dspark_jax.errors import UsageError
from dspark_jax.layers.attention import (
    Partial,
    attend,
    cache_attention,
    finish,
    group_queries,
    heads_major,
    partial_attention,
)
from dspark_jax.layers.linear import dense, take_rows
from dspark_jax.layers.params import declare
from dspark_jax.models.gemma4 import Gemma4Attention, Gemma4MLP, Gemma4RMSNorm, LayerScalar, embed_scale, soft_cap


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Gemma4KVCache:
    """Keys and values of a Gemma4 target, one stack per layer type (cache.py's KVCache layout within each).

    k, v: [sliding_layers, batch, kv_heads, cache_len, head_dim] (sliding-window layers, in layer order);
    global_k, global_v: [full_layers, batch, global_kv_heads, cache_len, global_head_dim] (full-attention layers);
    lengths: i32[batch]. Same contract as KVCache: slots at or past a row's length are stale and never visible.
    """

    k: jax.Array
    v: jax.Array
    global_k: jax.Array
    global_v: jax.Array
    lengths: jax.Array

    @property
    def cache_len(self) -> int:
        return self.k.shape[3]


def window_attention(
    qg: jax.Array, k_all: jax.Array, v_all: jax.Array, layer: int, positions: jax.Array, window: int, scale: float
) -> Partial:
    """Sliding-window attention over one layer of a stacked cache: query at position p sees slots p - window < s <= p.

    qg [b, kv_heads, groups, t, h]; k_all, v_all: [layers, batch, kv_heads, cache_len, head_dim]; positions i32[b, t]
    consecutive per row. Only the window + t - 1 slots a chunk can see are read (one dynamic slice per row), so the
    cost does not grow with the cache.
    """
    cache_len, kh, h = k_all.shape[3], k_all.shape[2], k_all.shape[4]
    span = min(window + positions.shape[1] - 1, cache_len)
    lo = jnp.clip(positions[:, 0] - window + 1, 0, cache_len - span)  # i32[b] first slot read per row
    rows = jnp.arange(positions.shape[0], dtype=jnp.int32)

    def read(buf):
        def one(row, start):
            return jax.lax.dynamic_slice(buf, (layer, row, 0, start, 0), (1, 1, kh, span, h))[0, 0]

        return jax.vmap(one)(rows, lo)  # [b, kv_heads, span, head_dim]

    slots = lo[:, None, None] + jnp.arange(span, dtype=jnp.int32)[None, None, :]  # [b, 1, span]
    p = positions[:, :, None]  # [b, t, 1]
    visible = (slots <= p) & (slots > p - window)  # [b, t, span]
    return partial_attention(qg, read(k_all), read(v_all), visible[:, None, None], scale)


class Gemma4TargetAttention(Gemma4Attention):
    """Gemma4 self-attention of the target: the draft's q/k/v norms, scale 1, k_eq_v and RoPE, causal over a chunk
    and a cache, with an optional sliding window (positions p - window < s <= p, as transformers)."""

    def __init__(self, *args, sliding_window: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sliding_window = sliding_window

    def __call__(self, x: jax.Array, positions: jax.Array, kv: tuple | None = None, layer: int = 0):
        """x: [batch, t, hidden]; positions i32[batch, t] (consecutive per row); kv: this layer type's stacked
        (k, v) [layers, batch, kv_heads, cache_len, head_dim] with `layer` its index there. The chunk is written at
        positions[:, 0] first (Attention.__call__'s contract). Returns (out [batch, t, hidden], kv or None)."""
        q = self.queries(x, positions)
        k, v = self.keys_values(x, positions)
        window = self.sliding_window
        if kv is None:
            diff = positions[:, :, None] - positions[:, None, :]  # [b, t, s] query minus key position
            mask = (diff >= 0) & (diff < window) if window is not None else diff >= 0
            return self.output(attend(q, heads_major(k), heads_major(v), mask, 1.0)), None
        k_all = write_layer(kv[0], layer, k, positions[:, 0])
        v_all = write_layer(kv[1], layer, v, positions[:, 0])
        qg = group_queries(q, k.shape[2])
        if window is None:
            p = cache_attention(qg, k_all, v_all, layer, positions + 1, 1.0)
        else:
            p = window_attention(qg, k_all, v_all, layer, positions, window, 1.0)
        return self.output(finish(p, q.dtype)), (k_all, v_all)


class Gemma4TargetLayer(nnx.Module):
    """One Gemma4 decoder layer: sandwich norms, attention per its layer type, gated MLP, times layer_scalar.
    Params are named as in the transformers checkpoint (models.layers.i.*)."""

    def __init__(self, config: Gemma4Config, layer_type: str, *, rngs: nnx.Rngs | None):
        c = config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.dtype = c.dtype
        sliding = layer_type == "sliding_attention"
        self.input_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.self_attn = Gemma4TargetAttention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads if sliding else c.num_global_key_value_heads,
            c.head_dim if sliding else c.global_head_dim,
            c.rms_norm_eps,
            c.sliding_rope if sliding else c.full_rope,
            c.attention_k_eq_v and not sliding,  # transformers: key-equals-value only on full-attention layers
            sliding_window=c.sliding_window if sliding else None,
            **kw,
        )
        self.post_attention_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.mlp = Gemma4MLP(c.hidden_size, c.intermediate_size, c.hidden_activation, **kw)
        self.post_feedforward_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.layer_scalar = declare(rngs, (1,), (None,), c.param_dtype, init="ones", kind=LayerScalar)

    def __call__(self, x, positions, kv=None, layer: int = 0):
        a, kv = self.self_attn(self.input_layernorm(x), positions, kv, layer)
        x = x + self.post_attention_layernorm(a)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar[...].astype(self.dtype), kv


class Gemma4(nnx.Module):
    """Gemma4 text target. Params: embed_tokens [vocab, hidden] (scaled by sqrt(hidden) on lookup), layers, norm,
    lm_head [hidden, vocab] only when untied. Same protocol as models.qwen3.Qwen3 (the decode loop's target)."""

    def __init__(self, config: Gemma4Config, *, rngs: nnx.Rngs | None):
        c = self.config = config
        self.embed_tokens = declare(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype)
        self.layers = nnx.List([Gemma4TargetLayer(c, t, rngs=rngs) for t in c.layer_types])
        self.norm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        if not c.tie_word_embeddings:
            self.lm_head = declare(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """i32[batch, t] -> [batch, t, hidden] in the compute dtype, x sqrt(hidden) rounded to the table's dtype
        (spec §4.1: tap -1 is this scaled output)."""
        c = self.config
        x = take_rows(self.embed_tokens[...], tokens)
        return (x * embed_scale(c.hidden_size, c.param_dtype)).astype(c.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [..., hidden] -> soft-capped f32[..., vocab] (cap * tanh(logits / cap))."""
        c = self.config
        # A tied head is the embedding, out-major as it stands, through `dense`: an einsum with `.T` made XLA:CPU
        # transpose a widened copy of a bf16 table every one-row step (a [32768, 256] bf16 head ran 2.2-2.4x slower
        # at 1 row and 4-5x at 8 rows; benchmarks/RESULTS.md, session 22).
        tied = c.tie_word_embeddings
        w = self.embed_tokens[...] if tied else self.lm_head[...]
        logits = dense(hidden.astype(c.dtype), w, tied, preferred_element_type=jnp.float32)
        return soft_cap(logits, c.final_logit_softcapping)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: Gemma4KVCache | None = None,
        tap_layer_ids: tuple[int, ...] = (),
        mask: jax.Array | None = None,
    ):
        """Run the stack over a chunk (contract of models.qwen3.Qwen3.__call__).

        Args:
          tokens: i32[batch, t]; positions: i32[batch, t], consecutive per row.
          cache: optional Gemma4KVCache; the chunk's k/v are written at positions[:, 0]. `lengths` are not touched.
          tap_layer_ids: decoder layers whose raw (pre-final-norm) outputs to return; -1 = the scaled embedding.
          mask: tree-verification visibility (models.qwen3.Qwen3); not supported here: the tree path's cache
            compaction knows one K/V stack, this cache has one per layer type.
        Returns:
          hidden [batch, t, hidden] after the final norm; taps [batch, t, taps * hidden] in tap order (None without
          taps); the cache with this chunk written (None without a cache).
        """
        if mask is not None:
            raise UsageError("tree verification is not supported for Gemma4 targets (accepted: chain decoding)")
        x = self.embed(tokens)
        outputs = {-1: x}
        stacks = (
            None
            if cache is None
            else {"sliding_attention": (cache.k, cache.v), "full_attention": (cache.global_k, cache.global_v)}
        )
        index = {"sliding_attention": 0, "full_attention": 0}  # position of each layer within its type's stack
        wanted = set(tap_layer_ids)
        for i, (layer, kind) in enumerate(zip(self.layers, self.config.layer_types)):
            x, kv = layer(x, positions, None if stacks is None else stacks[kind], index[kind])
            if stacks is not None:
                stacks[kind] = kv
            index[kind] += 1
            if i in wanted:
                outputs[i] = x
        taps = jnp.concatenate([outputs[i] for i in tap_layer_ids], axis=-1) if tap_layer_ids else None
        new_cache = None
        if cache is not None:
            (k, v), (gk, gv) = stacks["sliding_attention"], stacks["full_attention"]
            new_cache = Gemma4KVCache(k, v, gk, gv, cache.lengths)
        return self.norm(x), taps, new_cache

    def init_cache(self, batch: int, cache_len: int) -> Gemma4KVCache:
        c = self.config
        sliding = (len(c.sliding_layers), batch, c.num_key_value_heads, cache_len, c.head_dim)
        full = (len(c.full_layers), batch, c.num_global_key_value_heads, cache_len, c.global_head_dim)
        k, v, gk, gv = (jnp.zeros(shape, c.dtype) for shape in (sliding, sliding, full, full))
        return Gemma4KVCache(k, v, gk, gv, jnp.zeros((batch,), jnp.int32))
