"""How many of a block's drafts to verify (spec §6.5); pure functions of confidences."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.configs import VerifyPolicy


def policy_threshold(policy: VerifyPolicy) -> float:
    """The confidence threshold that implements `policy`: X for `threshold:X`, 0 for `full`.

    A threshold is a traced per-row value, so `full` and every `threshold:X` share one compiled loop.
    """
    if policy.kind == "full":
        return 0.0
    assert policy.kind == "threshold", f"no threshold form for verify policy {policy.kind!r}"
    return float(policy.threshold)


def num_to_verify(confidence_logits: jax.Array, thresholds: jax.Array) -> jax.Array:
    """i32[batch] drafts to verify out of f32[batch, slots] confidence logits and f32[batch] thresholds.

    Stops at the first slot whose own confidence sigmoid(z_j) is below the row's threshold (per-slot, as the
    reference does; 0 is allowed: the target then only extends the anchor). A threshold of 0 verifies every slot,
    since a sigmoid is never below 0.
    """
    slots = confidence_logits.shape[1]
    below = jax.nn.sigmoid(confidence_logits.astype(jnp.float32)) < thresholds[:, None]
    first = jnp.argmax(below, axis=1).astype(jnp.int32)
    return jnp.where(jnp.any(below, axis=1), first, slots)
