"""Draft losses (CE, L1 distribution matching, confidence BCE with detached soft labels; spec §9.4), the target's
next-token loss, and the teacher-forced training metrics of spec §7.2. Everything here computes in f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.training.data import Blocks
from dspark_jax.training.forward import DraftOutputs

DSPARK_LOSS_WEIGHTS = (0.1, 0.9, 1.0)  # CE, L1, confidence (spec §3.1)
DFLASH_LOSS_WEIGHTS = (1.0, 0.0, 0.0)  # CE only (spec §4.9)
EPS = 1e-6  # the reference's normaliser guard


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(w * l) / (sum(w) + 1e-6) over every element (spec §9.4). Entries with w == 0 never enter the sum, so a
    non-finite value there (an inactive block) cannot poison the loss: 0 * NaN would be NaN."""
    w = weights.astype(jnp.float32)
    safe = jnp.where(w > 0, values.astype(jnp.float32), 0.0)
    return jnp.sum(safe * w) / (jnp.sum(w) + EPS)


def bce_with_logits(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Elementwise binary cross-entropy of sigmoid(logits) against soft labels in [0, 1] (torch's stable form)."""
    x = logits.astype(jnp.float32)
    return jnp.maximum(x, 0.0) - x * labels + jnp.log1p(jnp.exp(-jnp.abs(x)))


def slot_losses(
    logits: jax.Array, target_logits: jax.Array, labels: jax.Array, confidence_logits: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Per-slot loss terms, filled for every slot (supervised or not).

    logits, target_logits: [..., vocab] (draft u_j + beta_j, target); labels: i32[...]; confidence_logits: [...].
    Returns ce = -log p_j(label), l1 = sum_v |p_j - pi_j| (twice the TV distance), alpha = clamp(1 - l1/2, 0, 1)
    (no gradient) and, with a confidence head, bce = BCE(confidence logit, alpha); all f32[...].
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    pi = jax.lax.stop_gradient(jax.nn.softmax(target_logits.astype(jnp.float32), axis=-1))
    l1 = jnp.sum(jnp.abs(jnp.exp(logp) - pi), axis=-1)
    alpha = jnp.clip(1.0 - 0.5 * jax.lax.stop_gradient(l1), 0.0, 1.0)
    out = {"ce": ce, "l1": l1, "alpha": alpha}
    if confidence_logits is not None:
        out["bce"] = bce_with_logits(confidence_logits, alpha)
    return out


def draft_loss(
    outputs: DraftOutputs,
    blocks: Blocks,
    loss_weights: tuple[float, float, float] = DSPARK_LOSS_WEIGHTS,
    candidates: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss = w_ce * CE + w_l1 * L1 + w_conf * BCE, each term normalised by the slot weights of every block of
    the batch (spec §9.4). `candidates` (bool[batch, seq], optional) only feeds the anchor statistics.

    Returns (loss f32[], metrics: loss terms, weight sum, per-slot acceptance, tau and the rest of spec §7.2).
    """
    terms = slot_losses(outputs.logits, outputs.target_logits, blocks.labels, outputs.confidence_logits)
    w = blocks.loss_weights
    w_ce, w_l1, w_conf = loss_weights
    metrics = {
        "loss_ce": weighted_mean(terms["ce"], w),
        "loss_l1": weighted_mean(terms["l1"], w),
        "loss_weight_sum": jnp.sum(w),
    }
    total = w_ce * metrics["loss_ce"] + w_l1 * metrics["loss_l1"]
    if "bce" in terms:
        metrics["loss_confidence"] = weighted_mean(terms["bce"], w)
        total = total + w_conf * metrics["loss_confidence"]
    metrics["loss"] = total
    metrics.update(acceptance_metrics(terms["alpha"], blocks.eval_mask, outputs.confidence_logits))
    metrics["anchors"] = jnp.sum(blocks.keep).astype(jnp.float32)
    metrics["supervised_slots_per_block"] = jnp.sum(blocks.eval_mask) / jnp.maximum(jnp.sum(blocks.keep), 1)
    if candidates is not None:
        metrics["anchor_candidates"] = jnp.sum(candidates).astype(jnp.float32)
    return total, metrics


def acceptance_metrics(
    alpha: jax.Array, eval_mask: jax.Array, confidence_logits: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Teacher-forced acceptance (spec §7.2) from alpha f32[..., anchors, slots] and eval_mask bool[..., slots].

    accept_rate f32[slots]: mean alpha_j over supervised slots; tau: mean over blocks with at least one supervised
    slot of 1 + sum_j prod_{i<=j} alpha_i v_i. With confidences: mean |q - alpha| and mean (q - alpha) over
    supervised slots, and the same for the prefix products.
    """
    slots = alpha.shape[-1]
    v = eval_mask.astype(jnp.float32).reshape(-1, slots)
    a = jnp.where(v > 0, alpha.reshape(-1, slots), 0.0)
    count = jnp.sum(v, axis=0)
    out = {"accept_rate": jnp.sum(a * v, axis=0) / jnp.maximum(count, 1.0)}
    blocks_used = jnp.any(v > 0, axis=-1)
    per_block = 1.0 + jnp.sum(jnp.cumprod(a * v, axis=-1), axis=-1)
    out["tau"] = jnp.sum(jnp.where(blocks_used, per_block, 0.0)) / jnp.maximum(jnp.sum(blocks_used), 1)
    if confidence_logits is not None:
        q = jax.nn.sigmoid(confidence_logits.astype(jnp.float32)).reshape(-1, slots)
        n = jnp.maximum(jnp.sum(v), 1.0)
        out["confidence_abs_err"] = jnp.sum(jnp.abs(q - a) * v) / n
        out["confidence_bias"] = jnp.sum((q - a) * v) / n
        sq, sa = jnp.cumprod(q, axis=-1), jnp.cumprod(a, axis=-1)
        out["confidence_prefix_abs_err"] = jnp.sum(jnp.abs(sq - sa) * v) / n
        out["confidence_prefix_bias"] = jnp.sum((sq - sa) * v) / n
    return out


def target_loss(logits: jax.Array, tokens: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, dict]:
    """Plain next-token CE for training a target: logits f32[batch, seq, vocab] at every position, tokens
    i32[batch, seq], loss_mask [batch, seq] marks supervised *labels*. Position t predicts tokens[t + 1]."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    labels = tokens[:, 1:].astype(jnp.int32)
    ce = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    w = loss_mask[:, 1:].astype(jnp.float32)
    loss = weighted_mean(ce, w)
    accuracy = weighted_mean((jnp.argmax(logp, axis=-1) == labels).astype(jnp.float32), w)
    return loss, {"loss": loss, "loss_ce": loss, "accuracy": accuracy, "loss_weight_sum": jnp.sum(w)}
