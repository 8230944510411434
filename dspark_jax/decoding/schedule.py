"""How many of a block's drafts to verify (spec §6.5); pure functions of confidences."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.configs import VerifyPolicy


def policy_threshold(policy: VerifyPolicy) -> float:
    """The confidence threshold of `policy`: X for `threshold:X`, 0 otherwise (`full`; `scheduler` ignores it).

    A threshold is a traced per-row value, so every `threshold:X` shares one compiled loop.
    """
    return float(policy.threshold) if policy.kind == "threshold" else 0.0


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


def prefix_confidences(confidence_logits: jax.Array, temperatures: jax.Array) -> jax.Array:
    """f32[batch, slots] s_j = prod_{i<=j} sigmoid(z_i / t_i): the calibrated chance that slots 0..j all survive."""
    return jnp.cumprod(jax.nn.sigmoid(confidence_logits.astype(jnp.float32) / temperatures), axis=-1)


def scheduled_num_to_verify(
    confidence_logits: jax.Array, temperatures: jax.Array, live: jax.Array, round_seconds: jax.Array
) -> jax.Array:
    """i32[batch] drafts to verify per row: the greedy causal prefix scheduler of spec §11.

    confidence_logits: f32[batch, slots]; temperatures: f32[slots] (spec §10; ones = uncalibrated); live:
    bool[batch] (finished rows verify nothing); round_seconds: f32[batch * (slots + 1) + 1], entry N = seconds of a
    round whose verification holds N tokens (the spec's 1 / SPS(N), drafting included). A choice verifies
    N = Σ_live (1 + k) tokens and commits E = Σ_live (1 + Σ_{j<k} s_j) on average: throughput Θ = E / round_seconds[N].

    Candidates (row, slot) are taken in descending s (ties: lower slot first, so each row's prefix grows
    contiguously); each is kept while Θ strictly improves and the walk stops at the first that does not. The
    stop is what keeps the output lossless: whether slot j is verified never depends on a confidence computed
    from the token drafted at slot j or later.
    """
    bsz, slots = confidence_logits.shape
    s = jnp.where(live[:, None], prefix_confidences(confidence_logits, temperatures), 0.0).reshape(-1)
    order = jnp.argsort(-s, stable=True)  # row-major flattening + stable sort: lower slot first among ties
    row = order // slots
    rows = jnp.sum(live)
    expected = rows + jnp.cumsum(s[order])  # E[committed] after taking candidates 0..i
    tokens = rows + 1 + jnp.arange(s.shape[0])
    theta = expected / round_seconds[tokens]
    before = jnp.concatenate([(rows / round_seconds[rows])[None], theta[:-1]])
    improves = theta > before
    taken = jnp.cumprod(improves.astype(jnp.int32)).astype(bool)  # the leading run of improvements
    return jnp.zeros((bsz,), jnp.int32).at[row].add(taken.astype(jnp.int32))
