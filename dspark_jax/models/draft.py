"""DSpark / DFlash draft backbone (spec §4): context projection, the block forward, base logits and the heads.

The draft reuses the target family's decoder layer. Context rows enter every layer only as keys and values
(projected once by `fc` + `hidden_norm`, spec §4.1); queries come from the block's slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.cache import KVCache, write_layer
from dspark_jax.configs import DraftConfig
from dspark_jax.layers.attention import cached_context, dense_context
from dspark_jax.layers.linear import compact, dense, out_major, take_rows
from dspark_jax.layers.norms import RMSNorm
from dspark_jax.layers.params import Frozen, declare
from dspark_jax.models.gemma4 import Gemma4DecoderLayer, Gemma4RMSNorm, embed_scale, soft_cap
from dspark_jax.models.heads import ConfidenceHead, MarkovHead
from dspark_jax.models.qwen3 import DecoderLayer


def decoder_layer(config: DraftConfig, rngs: nnx.Rngs | None) -> nnx.Module:
    """The draft layer of the target's family: Qwen3 (spec §4.4) or Gemma4 (spec §4.5)."""
    return DecoderLayer(config.model, rngs=rngs) if config.gemma4 is None else Gemma4DecoderLayer(config, rngs=rngs)


class Draft(nnx.Module):
    """Params: embed_tokens [vocab, hidden] and lm_head [hidden, vocab] (Frozen copies of the target's, spec §5.3;
    a `tied_head` draft's lm_head is the target's embedding, [vocab, hidden]),
    fc [taps * hidden, hidden], hidden_norm, layers, norm, and optionally markov_head / confidence_head.
    """

    out_major = False  # True once fc and lm_head are stored [out, in] (the CPU decode copy, layers/linear.py)

    def __init__(self, config: DraftConfig, *, rngs: nnx.Rngs | None):
        self.config = config
        c = config.model
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.embed_tokens = declare(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype, kind=Frozen)
        self.fc = declare(rngs, (config.num_taps * c.hidden_size, c.hidden_size), ("taps", "embed"), c.param_dtype)
        norm = RMSNorm if config.gemma4 is None else Gemma4RMSNorm  # Gemma4 scales in f32 before the cast (§4.5)
        self.hidden_norm = norm(c.hidden_size, c.rms_norm_eps, **kw)
        self.layers = nnx.List([decoder_layer(config, rngs) for _ in range(c.num_hidden_layers)])
        self.norm = norm(c.hidden_size, c.rms_norm_eps, **kw)
        if config.tied_head:  # the tied target's embedding itself, out-major as it stands (no [hidden, vocab] copy)
            self.lm_head = declare(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype, kind=Frozen)
        else:
            self.lm_head = declare(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype, kind=Frozen)
        if config.use_markov:
            self.markov_head = MarkovHead(
                c.vocab_size,
                c.hidden_size,
                config.markov_rank,
                config.markov_head_type,
                param_dtype=c.param_dtype,
                rngs=rngs,
            )
        if config.enable_confidence_head:
            n_in = c.hidden_size + (config.markov_rank if config.confidence_head_with_markov else 0)
            self.confidence_head = ConfidenceHead(n_in, param_dtype=c.param_dtype, rngs=rngs)

    def to_out_major(self) -> None:
        """Store fc and lm_head out-major, in place (for a decode copy; the layers convert themselves). A tied head is
        out-major already."""
        self.fc.value = compact(out_major(self.fc[...], 1))
        head = self.lm_head[...]
        self.lm_head.value = compact(head if self.config.tied_head else out_major(head, 1))
        self.out_major = True

    # ---------------------------------------------------------------------------------------------- context (§4.1)

    def project_context(self, features: jax.Array) -> jax.Array:
        """features [batch, t, taps * hidden] (raw target layer outputs) -> c [batch, t, hidden]."""
        dtype = self.config.model.dtype
        return self.hidden_norm(dense(features.astype(dtype), self.fc[...], self.out_major))

    def context_kv(self, features: jax.Array, positions: jax.Array) -> list[tuple[jax.Array, jax.Array]]:
        """Per layer, roped keys and values of context rows: each [batch, t, kv_heads, head_dim]."""
        c = self.project_context(features)
        return [layer.self_attn.keys_values(c, positions) for layer in self.layers]

    def push_context(self, cache: KVCache, features: jax.Array, starts: jax.Array) -> KVCache:
        """Append context rows to the draft cache (spec §6.3 step 2-4).

        features: [batch, t, taps * hidden] for positions starts..starts+t-1 of each row (starts = cache.lengths).
        Rows past a row's real count are written too but stay invisible: the caller sets `lengths`.
        """
        t = features.shape[1]
        positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        k_all, v_all = cache.k, cache.v
        for i, (k, v) in enumerate(self.context_kv(features, positions)):
            k_all = write_layer(k_all, i, k, starts)
            v_all = write_layer(v_all, i, v, starts)
        return KVCache(k_all, v_all, cache.lengths)

    # ------------------------------------------------------------------------------------------ block (§4.2-§4.4)

    def block_inputs(self, anchors: jax.Array) -> jax.Array:
        """anchors i32[batch] -> block tokens i32[batch, slots] = [anchor, mask, ..., mask] (spec §4.2)."""
        b = anchors.shape[0]
        masks = jnp.full((b, self.config.block_size - 1), self.config.mask_token_id, jnp.int32)
        return jnp.concatenate([anchors[:, None].astype(jnp.int32), masks], axis=1)

    def layers_forward(self, tokens: jax.Array, positions: jax.Array, context_kv, mask: jax.Array) -> jax.Array:
        """Run the draft layers over block rows against explicit context keys (the training path).

        tokens/positions: i32[batch, t] block rows; context_kv: per layer (k, v) [batch, s, kv_heads, head_dim]
        (from `context_kv`); mask: bool[batch, t, s + t] (context columns, then block columns). Returns h
        [batch, t, hidden] after the final norm.
        """
        s = context_kv[0][0].shape[1]
        context = [dense_context(k, v, mask[:, :, :s]) for k, v in context_kv]
        return self.blocks_forward(tokens, positions, context, mask[:, :, s:])

    def blocks_forward(self, tokens: jax.Array, positions: jax.Array, context, own_mask: jax.Array) -> jax.Array:
        """The draft layers over block rows.

        tokens/positions: i32[batch, t]; context: per layer, the context keys as a function (qg, scale) -> Partial
        (layers.attention: dense_context / cached_context); own_mask: bool[batch, t, t] over the block rows' own
        keys. Returns h [batch, t, hidden] after the final norm.
        """
        c = self.config.model
        z = take_rows(self.embed_tokens[...], tokens)
        if self.config.gemma4 is not None:  # x sqrt(hidden), in the table's dtype like the target (spec §4.2)
            z = z * embed_scale(c.hidden_size, c.param_dtype)
        z = z.astype(c.dtype)
        for i, layer in enumerate(self.layers):
            if self.config.gemma4 is not None:
                z = layer.block_step(z, positions, context[i], own_mask)
                continue
            attn = layer.self_attn
            z = z + attn.block(layer.input_layernorm(z), positions, context[i], own_mask, c.head_dim**-0.5)
            z = z + layer.mlp(layer.post_attention_layernorm(z))
        return self.norm(z)

    def block_hidden(self, cache: KVCache, anchors: jax.Array, anchor_positions: jax.Array) -> jax.Array:
        """One block per row through the cached context (spec §6.3).

        anchors, anchor_positions: i32[batch]. Slots see cache rows s < cache.lengths (all < the anchor) and every
        slot of their own block. Returns h [batch, slots, hidden]; the block's own k/v are never cached.
        """
        bsz, slots = anchors.shape[0], self.config.block_size
        positions = anchor_positions[:, None] + jnp.arange(slots, dtype=jnp.int32)[None, :]
        limits = jnp.broadcast_to(cache.lengths[:, None], (bsz, slots))
        context = [cached_context(cache.k, cache.v, i, limits) for i in range(len(self.layers))]
        own = jnp.ones((bsz, slots, slots), bool)
        return self.blocks_forward(self.block_inputs(anchors), positions, context, own)

    def base_logits(self, hidden: jax.Array) -> jax.Array:
        """u_j = W_lm h_j (spec §4.6): [..., hidden] -> f32[..., vocab]."""
        dtype = self.config.model.dtype
        head_out_major = self.out_major or self.config.tied_head
        logits = dense(hidden.astype(dtype), self.lm_head[...], head_out_major, preferred_element_type=jnp.float32)
        return logits if self.config.gemma4 is None else soft_cap(logits, self.config.gemma4.final_logit_softcapping)

    # ------------------------------------------------------------------------------------------- heads (§4.7-4.8)

    def slot_head(self, hidden: jax.Array, base_logits: jax.Array, prev_tokens: jax.Array, state: jax.Array):
        """One slot of the sequential and confidence heads.

        hidden [..., hidden], base_logits f32[..., vocab], prev_tokens i32[...], state f32[..., rank] (RNN).
        Returns (adjusted logits f32[..., vocab], confidence logit f32[...] or None, new state).
        """
        prev_embed = None
        logits = base_logits
        if self.config.use_markov:
            prev_embed = self.markov_head.embed_prev(prev_tokens)
            beta, state = self.markov_head.bias(hidden, prev_embed, state)
            logits = base_logits + beta
        confidence = None
        if self.config.enable_confidence_head:
            features = prev_embed if self.config.confidence_head_with_markov else None
            confidence = self.confidence_head(hidden, features)
        return logits, confidence, state

    def init_head_state(self, batch_shape: tuple[int, ...]) -> jax.Array:
        rank = self.config.markov_rank if self.config.use_markov else 1
        return jnp.zeros((*batch_shape, rank), jnp.float32)

    def init_cache(self, batch: int, cache_len: int) -> KVCache:
        c = self.config.model
        return KVCache.zeros(c.num_hidden_layers, batch, cache_len, c.num_key_value_heads, c.head_dim, c.dtype)
