"""Training pieces specific to DeepSeek-V4 (V4 §4, spec §9): the draft config of a fresh V4 DSpark draft, its
teacher-forced forward over every block of a sequence, and the DFlash-style twin's frozen (zero) Markov head. The
export in the native V4 layout lives with the CLI (dspark_jax.train), which may use conversion.

The training forward runs each block exactly as decoding does (`DeepseekV4Draft.blocks_forward`): block b sees the
projected context keys of the last `window` positions below its anchor (all positions below it when the window is
0) and its own B rows in both directions (block_causal off, V4 §5 Q2's default), never another block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.configs import DeepseekV4Config, DeepseekV4DraftConfig
from dspark_jax.errors import UsageError
from dspark_jax.layers.v4_attention import read_rows
from dspark_jax.training.data import Blocks
from dspark_jax.training.forward import DraftOutputs, teacher_forced_heads

# Fields of a --draft-config JSON for a V4 target (the names of the -DSpark config.json, V4 §4.1, or our short ones).
V4_DRAFT_FIELDS = {
    "block_size": "block_size",
    "dspark_block_size": "block_size",
    "mask_token_id": "mask_token_id",
    "dspark_noise_token_id": "mask_token_id",
    "target_layer_ids": "dspark_layer_ids",
    "dspark_target_layer_ids": "dspark_layer_ids",
    "markov_rank": "markov_rank",
    "dspark_markov_rank": "markov_rank",
    "enable_confidence_head": "enable_confidence_head",
    "num_anchors": None,  # a training setting, read by draft_settings
    "use_markov": None,
}
V4_DEFAULTS = {"block_size": 5, "mask_token_id": 1, "markov_rank": 64, "num_anchors": 64}


def draft_settings(fields: dict, target: DeepseekV4Config, source: str) -> tuple[DeepseekV4DraftConfig, dict]:
    """A --draft-config JSON over a V4 target -> (DeepseekV4DraftConfig with the V4 §5 default switches, training
    extras {'num_anchors': int, 'use_markov': bool}). `use_markov: false` gives the DFlash-style twin (its Markov
    head is kept at zero and never trained; pair it with `enable_confidence_head: false`)."""
    bad = [k for k in fields if k not in V4_DRAFT_FIELDS]
    if bad:
        raise UsageError(
            f"--draft-config {source}: field {bad[0]!r} is not a V4 draft field; accepted: {', '.join(V4_DRAFT_FIELDS)}"
        )
    kw = {"block_size": V4_DEFAULTS["block_size"], "mask_token_id": V4_DEFAULTS["mask_token_id"]}
    kw["markov_rank"] = V4_DEFAULTS["markov_rank"]
    for k, v in fields.items():
        if V4_DRAFT_FIELDS[k] is not None:
            kw[V4_DRAFT_FIELDS[k]] = tuple(v) if isinstance(v, list) else v
    if "dspark_layer_ids" not in kw:
        raise UsageError(f"--draft-config {source}: a V4 draft needs target_layer_ids (one per draft stage)")
    extras = {
        "num_anchors": fields.get("num_anchors", V4_DEFAULTS["num_anchors"]),
        "use_markov": fields.get("use_markov", True),
    }
    if not isinstance(extras["use_markov"], bool):
        raise UsageError(f"--draft-config {source}: use_markov must be true or false, got {extras['use_markov']!r}")
    return DeepseekV4DraftConfig(model=target, **kw), extras


def trainable_filter(use_markov: bool):
    """The nnx filter of the trained variables: every Param, less the Markov head for the DFlash-style twin."""
    if use_markov:
        return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("markov_head")))


def zero_markov(model) -> None:
    """E1 = E2 = 0: beta = E1[x] E2 is 0 for every token, and (with the head frozen) stays 0 — no Markov term."""
    model.markov_head.markov_w1[...] = jnp.zeros_like(model.markov_head.markov_w1[...])
    model.markov_head.markov_w2[...] = jnp.zeros_like(model.markov_head.markov_w2[...])


# ------------------------------------------------------------------------------------------------------ forward


def block_contexts(draft, features: jax.Array, blocks: Blocks) -> list[tuple[jax.Array, jax.Array]]:
    """Per stage, (context keys [b * anchors, C, head_dim], mask bool[b * anchors, C]) of every block.

    features [b, seq, taps * hidden]. With a window W, C = W: rows a - W .. a - 1 (those >= 0 and of an active
    block); with window 0, C = seq: every row below the anchor.
    """
    b, s = features.shape[:2]
    n = blocks.anchors.shape[1]
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    keys = draft.context_keys(features, pos)  # per stage [b, s, head_dim], computed once per sequence
    a = blocks.anchors.reshape(b * n, 1)
    keep = blocks.keep.reshape(b * n, 1)
    seq_of = jnp.repeat(jnp.arange(b), n)  # block -> its sequence
    w = draft.config.window
    if w:
        rows = a - w + jnp.arange(w, dtype=jnp.int32)[None, :]
        mask = (rows >= 0) & (rows < a) & keep
        return [(read_rows(k[seq_of], rows), mask) for k in keys]
    mask = (jnp.arange(s, dtype=jnp.int32)[None, :] < a) & keep
    return [(k[seq_of], mask) for k in keys]


def v4_draft_forward(draft, features: jax.Array, last_hidden: jax.Array, blocks: Blocks) -> DraftOutputs:
    """The V4 draft over every block of a batch, teacher-forced (spec §9.3.5-§9.3.7 with the V4 dataflow, V4 §4).

    features [b, seq, taps * hidden] (target tap outputs, stream means); last_hidden [b, seq, hidden] (the target's
    final-normed hidden states, whose head logits are pi_j); blocks from data.build_blocks.
    """
    b, n, slots = blocks.tokens.shape
    contexts = block_contexts(draft, features, blocks)
    tokens = blocks.tokens.reshape(b * n, slots)
    positions = blocks.positions.reshape(b * n, slots)
    pre = draft.blocks_forward(tokens, positions, contexts).reshape(b, n, slots, -1)  # h~ (pre-norm)
    base = draft.base_logits(pre)
    logits, confidence = teacher_forced_heads(draft, pre, base, blocks.prev_tokens)
    rows = jax.vmap(lambda x, i: x[i])(last_hidden, blocks.target_index)  # [b, n, j, hidden]
    dt = draft.config.model.dtype
    # The draft's head is the target's array (bound, Frozen), and last_hidden is already final-normed by the target.
    target_logits = jnp.einsum(
        "...d,dv->...v", rows.astype(dt), draft.head[...].astype(dt), preferred_element_type=jnp.float32
    )
    return DraftOutputs(draft.final_hidden(pre), base, logits, jax.lax.stop_gradient(target_logits), confidence)


__all__ = [
    "block_contexts",
    "draft_settings",
    "trainable_filter",
    "v4_draft_forward",
    "zero_markov",
]
