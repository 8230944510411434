"""Teacher-forced training forward of a draft over every block of a batch (spec §9.3.5-§9.3.7), and the target's
features (taps + final-normed last hidden state) that condition it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.models.draft import Draft
from dspark_jax.models.qwen3 import Qwen3
from dspark_jax.training.data import Blocks, training_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftOutputs:
    """hidden: [batch, anchors, slots, hidden] after the final draft norm; base_logits / logits / target_logits:
    f32[batch, anchors, slots, vocab] (u_j, u_j + beta_j teacher-forced, and the target's pi_j logits);
    confidence_logits: f32[batch, anchors, slots] pre-sigmoid, or None without a confidence head."""

    hidden: jax.Array
    base_logits: jax.Array
    logits: jax.Array
    target_logits: jax.Array
    confidence_logits: jax.Array | None


def target_features(target: Qwen3, tokens: jax.Array, tap_layer_ids: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """The frozen target over whole sequences: tokens i32[batch, seq] -> (features [batch, seq, taps * hidden] raw
    tap outputs in tap order, last_hidden [batch, seq, hidden] after the final norm), gradients stopped."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, taps, _ = target(tokens, positions, tap_layer_ids=tap_layer_ids)
    return jax.lax.stop_gradient(taps), jax.lax.stop_gradient(hidden)


def teacher_forced_heads(draft: Draft, hidden: jax.Array, base_logits: jax.Array, prev_tokens: jax.Array):
    """Sequential + confidence heads slot by slot with the ground-truth previous tokens (spec §9.3.6).

    hidden [..., slots, hidden]; base_logits f32[..., slots, vocab]; prev_tokens i32[..., slots].
    Returns (logits f32[..., slots, vocab], confidence logits f32[..., slots] or None).
    """
    slots = hidden.shape[-2]
    state = draft.init_head_state(hidden.shape[:-2])
    logits, confidence = [], []
    for j in range(slots):  # B is small and static; the RNN head carries state from slot to slot
        lj, cj, state = draft.slot_head(hidden[..., j, :], base_logits[..., j, :], prev_tokens[..., j], state)
        logits.append(lj)
        confidence.append(cj)
    conf = None if confidence[0] is None else jnp.stack(confidence, axis=-1)
    return jnp.stack(logits, axis=-2), conf


def draft_forward(draft: Draft, features: jax.Array, last_hidden: jax.Array, blocks: Blocks) -> DraftOutputs:
    """All blocks of each sequence in one pass against the shared context (spec §9.3.7).

    features: [batch, seq, taps * hidden] raw target taps; last_hidden: [batch, seq, hidden] (target, final-normed);
    blocks from data.build_blocks. Queries are the anchors*slots block rows; keys/values are the seq context rows
    (projected by fc + hidden_norm) followed by the block rows, under data.training_mask.
    """
    bsz, seq = features.shape[:2]
    n, slots = blocks.tokens.shape[1:]
    ctx_positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (bsz, seq))
    context_kv = draft.context_kv(features, ctx_positions)
    mask = training_mask(blocks.anchors, blocks.keep, seq, slots)
    h = draft.layers_forward(
        blocks.tokens.reshape(bsz, n * slots), blocks.positions.reshape(bsz, n * slots), context_kv, mask
    )
    h = h.reshape(bsz, n, slots, -1)  # [b, n, j, d]
    base = draft.base_logits(h)
    logits, confidence = teacher_forced_heads(draft, h, base, blocks.prev_tokens)
    rows = jax.vmap(lambda x, i: x[i])(last_hidden, blocks.target_index)  # [b, n, j, d]
    # pi_j: the frozen LM-head copy equals the target's (spec §5.3), so it gives the target's logits.
    target_logits = jax.lax.stop_gradient(draft.base_logits(rows))
    return DraftOutputs(h, base, logits, target_logits, confidence)
