"""How many of a block's drafts to verify (spec §6.5); pure functions of confidences."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.configs import VerifyPolicy


def num_to_verify(policy: VerifyPolicy, confidence_logits: jax.Array) -> jax.Array:
    """i32[batch] drafts to verify out of f32[batch, slots] confidence logits.

    `full` verifies every slot; `threshold:X` stops at the first slot whose own confidence sigmoid(z_j) is below X
    (per-slot, as the reference does; 0 is allowed: the target then only extends the anchor).
    """
    bsz, slots = confidence_logits.shape
    if policy.kind == "full":
        return jnp.full((bsz,), slots, jnp.int32)
    below = jax.nn.sigmoid(confidence_logits) < policy.threshold
    first = jnp.argmax(below, axis=1).astype(jnp.int32)
    return jnp.where(jnp.any(below, axis=1), first, slots)
