"""The DSpark draft of DeepSeek-V4 -DSpark checkpoints (V4 §4): three V4 blocks over a block of B slots.

Dataflow of one round (V4 §4.3-4.7):
  c_t     = RMSNorm_main(W_main g_t)                        g_t: stream means of the tapped target blocks [taps * H]
  kappa^S = RoPE_t(RMSNorm_kv,S(W_kv,S c_t))                per stage S, written once per committed position
  X       = 4 copies of embed[[anchor, M, ..., M]]          positions a .. a+B-1
  X       <- stage_S(X) for S = 0..S-1                      mHC + attention over [context kappa^S ; block rows] + MoE
  h~_j    = hc_head(X_j);  u_j = W_head RMSNorm_final(h~_j)
Same interface as models/draft.Draft (push_context / block_hidden / base_logits / slot_head / init_cache), so the
decode loop, the tree rounds and the scheduler drive it unchanged. The one difference: `block_hidden` returns the
pre-norm collapse h~_j (the confidence head's input, Q5), and `base_logits` applies the final norm itself.

The embedding and head are the target's arrays (bound at load time, Frozen, never stored in the draft's files).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.cache import set_at
from dspark_jax.configs.deepseek_v4_draft import DeepseekV4DraftConfig
from dspark_jax.layers.linear import take_rows
from dspark_jax.layers.mhc import HyperConnection, HyperHead
from dspark_jax.layers.norms import rms_normalize
from dspark_jax.layers.params import Frozen, declare
from dspark_jax.layers.v4_attention import V4Norm, read_rows, rope_angles, rope_tail, v4_inv_freq
from dspark_jax.models.deepseek_v4 import Block
from dspark_jax.models.heads import MarkovHead


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeepseekV4DraftCache:
    """Per-stage context keys (= values) kappa^S_t, by absolute position.

    kv: [stages, batch, cache_len, head_dim]; lengths i32[batch] committed positions per row. A block reads only the
    last `window` positions below its anchor (V4 §4.4's ring of W); storing by absolute position like
    DeepseekV4Cache keeps rollback a length update, and rows written past a row's length (prefill padding, unused
    pending rows) can never overwrite a position still in some window, as they would in a W-slot ring.
    """

    kv: jax.Array
    lengths: jax.Array

    @property
    def cache_len(self) -> int:
        return self.kv.shape[2]


class ConfidenceHead(nnx.Module):
    """q_j = sigmoid(w . [h_j ; E1[x_{j-1}]]) with no bias (V4 §4.7). weight [hidden + rank, 1]."""

    def __init__(self, n_in: int, *, param_dtype: str, rngs: nnx.Rngs | None):
        self.weight = declare(rngs, (n_in, 1), (None, None), param_dtype)

    def __call__(self, hidden: jax.Array, prev_embed: jax.Array) -> jax.Array:
        x = jnp.concatenate([hidden.astype(jnp.float32), prev_embed.astype(jnp.float32)], axis=-1)
        return (x @ self.weight[...].astype(jnp.float32))[..., 0]


def stage_config(config: DeepseekV4DraftConfig):
    """A one-layer target config whose layer 0 is a draft stage: ratio 0 (SWA-only, no compressor), top-k routing."""
    return dataclasses.replace(config.model, num_hidden_layers=1, compress_ratios=(0,), num_hash_layers=0)


class DeepseekV4Draft(nnx.Module):
    """Params: embed [vocab, hidden], head [hidden, vocab] (Frozen, the target's); main_proj [taps * hidden, hidden],
    main_norm; mtp[S] (V4 blocks: hc_attn, attn_norm, attn, hc_ffn, ffn_norm, ffn); hc_head; norm; markov_head
    (E1 [vocab, rank], E2 [rank, vocab]); confidence_head (when enabled).
    """

    def __init__(self, config: DeepseekV4DraftConfig, *, rngs: nnx.Rngs | None, mesh=None):
        self.config = config
        c = config.model
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.embed = declare(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype, kind=Frozen)
        self.head = declare(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype, kind=Frozen)
        taps = config.num_taps * c.hidden_size
        self.main_proj = declare(rngs, (taps, c.hidden_size), ("taps", "embed"), c.param_dtype)
        self.main_norm = V4Norm(c.hidden_size, c.rms_norm_eps, axis_name="embed", **kw)
        sc = stage_config(config)
        self.mtp = nnx.List([Block(sc, 0, rngs=rngs, mesh=mesh) for _ in range(config.num_stages)])
        for stage in self.mtp:
            stage.ffn.norm_eps = config.router_eps  # Q10
        self.hc_head = HyperHead(c.hidden_size, c.hc_mult, c.hc_eps, c.rms_norm_eps, rngs=rngs)
        self.norm = V4Norm(c.hidden_size, c.rms_norm_eps, axis_name="embed", **kw)
        self.markov_head = MarkovHead(
            c.vocab_size, c.hidden_size, config.markov_rank, "vanilla", param_dtype=c.param_dtype, rngs=rngs
        )
        if config.enable_confidence_head:
            n_in = c.hidden_size + config.markov_rank
            self.confidence_head = ConfidenceHead(n_in, param_dtype=c.param_dtype, rngs=rngs)
        # The stages' RoPE table (Q4): main (the ratio-0 rule, no YaRN) or compress with YaRN.
        if config.stage_rope == "main":
            self.inv_freq = v4_inv_freq(c.qk_rope_head_dim, c.rope_theta)
        else:
            self.inv_freq = v4_inv_freq(c.qk_rope_head_dim, c.compress_rope_theta, c.rope_scaling)

    # ---------------------------------------------------------------------------------------- context (§4.3-4.4)
    def project_context(self, features: jax.Array) -> jax.Array:
        """g [batch, t, taps * hidden] -> c = RMSNorm_main(W_main g) [batch, t, hidden]."""
        dt = self.config.model.dtype
        c = jnp.einsum("btm,md->btd", features.astype(dt), self.main_proj[...].astype(dt))
        return self.main_norm(c)

    def context_keys(self, features: jax.Array, positions: jax.Array) -> list[jax.Array]:
        """Per stage, kappa^S [batch, t, head_dim] of context rows at positions i32[batch, t]."""
        c = self.project_context(features)
        cos, sin = rope_angles(positions, self.inv_freq)
        dt = self.config.model.dtype
        out = []
        for stage in self.mtp:
            k = stage.attn.kv_norm(jnp.einsum("btd,dh->bth", c, stage.attn.wkv[...].astype(dt)))
            out.append(rope_tail(k, cos, sin))
        return out

    def push_context(self, cache: DeepseekV4DraftCache, features: jax.Array, starts: jax.Array):
        """Write the context keys of rows starts..starts+t-1 (features [batch, t, taps * hidden]); rows past a row's
        real count are written too and stay invisible (the caller sets `lengths`)."""
        t = features.shape[1]
        positions = starts[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        rows = jnp.arange(starts.shape[0], dtype=jnp.int32)[:, None]
        kv = cache.kv
        for i, k in enumerate(self.context_keys(features, positions)):
            # One scatter into the stacked buffer (stays in place inside the loop); past cache_len: dropped.
            kv = set_at(kv, (i, rows, positions), k)
        return DeepseekV4DraftCache(kv, cache.lengths)

    def init_cache(self, batch: int, cache_len: int) -> DeepseekV4DraftCache:
        c = self.config.model
        kv = jnp.zeros((self.config.num_stages, batch, cache_len, c.head_dim), c.dtype)
        return DeepseekV4DraftCache(kv, jnp.zeros((batch,), jnp.int32))

    # -------------------------------------------------------------------------------------------- block (§4.5-4.6)
    def block_inputs(self, anchors: jax.Array) -> jax.Array:
        """anchors i32[batch] -> i32[batch, B] = [anchor, M, ..., M]."""
        b = anchors.shape[0]
        masks = jnp.full((b, self.config.block_size - 1), self.config.mask_token_id, jnp.int32)
        return jnp.concatenate([anchors[:, None].astype(jnp.int32), masks], axis=1)

    def stage_attention(self, attn, x, positions, ctx_keys, ctx_mask) -> jax.Array:
        """One stage's attention (V4 §4.6): queries from the block rows, keys = context rows ++ block rows.

        x [b, B, hidden] normed block input; positions i32[b, B]; ctx_keys [b, C, head_dim] (roped kappa);
        ctx_mask bool[b, C] (context rows every slot may see). Returns [b, B, hidden].
        """
        s, dt = attn.s, attn.dtype
        b, t, _ = x.shape
        cos, sin = rope_angles(positions, self.inv_freq)
        xd = x.astype(dt)
        q_r = attn.q_norm(jnp.einsum("btd,dr->btr", xd, attn.wq_a[...].astype(dt)))
        q = jnp.einsum("btr,rnh->btnh", q_r, attn.wq_b[...].astype(dt))
        q = rope_tail(rms_normalize(q, s.eps).astype(dt), cos[:, :, None], sin[:, :, None])
        k = rope_tail(attn.kv_norm(jnp.einsum("btd,dh->bth", xd, attn.wkv[...].astype(dt))), cos, sin)
        keys = jnp.concatenate([ctx_keys.astype(dt), k], axis=1)
        own = jnp.tril(jnp.ones((t, t), bool)) if self.config.block_causal else jnp.ones((t, t), bool)
        mask = jnp.concatenate(
            [jnp.broadcast_to(ctx_mask[:, None, :], (b, t, ctx_keys.shape[1])), jnp.broadcast_to(own, (b, t, t))],
            axis=-1,
        )
        out = attn._attend(q, keys, mask, None)
        out = rope_tail(out, cos[:, :, None], -sin[:, :, None])  # values carry RoPE: undo it at the slot position
        g = s.o_groups
        grouped = out.reshape(b, t, g, -1)
        wo_a = attn.wo_a[...].astype(dt).reshape(grouped.shape[-1], g, s.o_lora_rank)
        u = jnp.einsum("btgi,igr->btgr", grouped, wo_a).reshape(b, t, g * s.o_lora_rank)
        return jnp.einsum("btr,rd->btd", u, attn.wo_b[...].astype(dt))

    def stage_forward(self, stage, streams, positions, ctx_keys, ctx_mask) -> jax.Array:
        """A full V4 block on the block rows: streams [b, B, n_hc, hidden] -> the same."""
        y, post, comb = stage.hc_attn.collapse(streams)
        a = self.stage_attention(stage.attn, stage.attn_norm(y), positions, ctx_keys, ctx_mask)
        streams = HyperConnection.expand(streams, a, post, comb)
        y, post, comb = stage.hc_ffn.collapse(streams)
        f = stage.ffn(stage.ffn_norm(y))  # top-k routing with bias: no token ids needed
        return HyperConnection.expand(streams, f, post, comb)

    def blocks_forward(self, tokens, positions, contexts) -> jax.Array:
        """tokens / positions i32[b, B]; contexts: per stage (keys [b, C, head_dim], mask bool[b, C]).
        Returns h~ = hc_head(X) [b, B, hidden] (pre-norm)."""
        c = self.config.model
        e = take_rows(self.embed[...], tokens).astype(c.dtype)
        streams = jnp.broadcast_to(e[:, :, None, :], (*tokens.shape, c.hc_mult, c.hidden_size))
        for stage, (keys, mask) in zip(self.mtp, contexts):
            streams = self.stage_forward(stage, streams, positions, keys, mask)
        return self.hc_head(streams)

    def block_hidden(self, cache: DeepseekV4DraftCache, anchors: jax.Array, anchor_positions: jax.Array) -> jax.Array:
        """One block per row against the cached context (V4 §4.6): slots see the last `window` committed positions
        below the anchor (all committed positions when window is 0). Returns h~ [batch, B, hidden] (pre-norm)."""
        slots = self.config.block_size
        positions = anchor_positions[:, None] + jnp.arange(slots, dtype=jnp.int32)[None, :]
        w = self.config.window
        limit = jnp.minimum(cache.lengths, anchor_positions)[:, None]
        if w:
            rows = anchor_positions[:, None] - w + jnp.arange(w, dtype=jnp.int32)[None, :]
            mask = (rows >= 0) & (rows < limit)
            contexts = [(read_rows(cache.kv[i], rows), mask) for i in range(self.config.num_stages)]
        else:
            mask = jnp.arange(cache.cache_len, dtype=jnp.int32)[None, :] < limit
            contexts = [(cache.kv[i], mask) for i in range(self.config.num_stages)]
        return self.blocks_forward(self.block_inputs(anchors), positions, contexts)

    def block_from_features(self, features: jax.Array, anchors: jax.Array, anchor_positions: jax.Array) -> jax.Array:
        """The uncached reference: features [batch, T, taps * hidden] of positions 0..T-1, every row's context keys
        recomputed and masked to [a - window, a). Returns h~ [batch, B, hidden]."""
        b, t = features.shape[:2]
        pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        a = anchor_positions[:, None]
        mask = pos < a
        if self.config.window:
            mask = mask & (pos >= a - self.config.window)
        contexts = [(k, mask) for k in self.context_keys(features, pos)]
        slots = self.config.block_size
        positions = a + jnp.arange(slots, dtype=jnp.int32)[None, :]
        return self.blocks_forward(self.block_inputs(anchors), positions, contexts)

    # ------------------------------------------------------------------------------------------------ heads (§4.7)
    def final_hidden(self, hidden: jax.Array) -> jax.Array:
        """h_j = RMSNorm_final(h~_j)."""
        return self.norm(hidden)

    def base_logits(self, hidden: jax.Array) -> jax.Array:
        """u_j = W_head RMSNorm_final(h~_j): [..., hidden] (pre-norm) -> f32[..., vocab]."""
        dt = self.config.model.dtype
        h = self.final_hidden(hidden).astype(dt)
        return jnp.einsum("...d,dv->...v", h, self.head[...].astype(dt), preferred_element_type=jnp.float32)

    def slot_head(self, hidden: jax.Array, base_logits: jax.Array, prev_tokens: jax.Array, state: jax.Array):
        """Vanilla Markov bias and the bias-free confidence for one slot (V4 §4.7).

        hidden [..., hidden] (h~_j, pre-norm); base_logits f32[..., vocab]; prev_tokens i32[...]; state unused
        (carried for the interface). Returns (logits, confidence logit f32[...] or None, state).
        """
        prev_embed = self.markov_head.embed_prev(prev_tokens)
        beta, state = self.markov_head.bias(hidden, prev_embed, state)
        confidence = None
        if self.config.enable_confidence_head:
            x = hidden if self.config.confidence_input == "pre_norm" else self.final_hidden(hidden)
            confidence = self.confidence_head(x, prev_embed)
        return base_logits + beta, confidence, state

    def init_head_state(self, batch_shape: tuple[int, ...]) -> jax.Array:
        return jnp.zeros((*batch_shape, self.config.markov_rank), jnp.float32)
