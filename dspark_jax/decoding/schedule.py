"""How many of a block's drafts to verify (spec §6.5); pure functions of confidences."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.configs import VerifyPolicy

# While the draft is switched off, every PROBE_EVERY-th round drafts again (verifying only what pays) to see whether
# the calibrated confidences now promise enough: a probe costs one draft pass, not a wide verify.
PROBE_EVERY = 8


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SchedulerState:
    """The prefix scheduler's inputs (spec §11) and its draft gate, carried in the decode state.

    temperatures: f32[slots] confidence temperatures (spec §10; ones = uncalibrated); round_seconds:
    f32[batch * (slots + 1) + 1], entry N = seconds of a round (drafting included) whose verification holds N
    tokens; plain_seconds: f32[] seconds of a round without the draft (one target position per row);
    drafting: bool[] whether this round runs the draft; idle_rounds: i32[] rounds since the draft last ran.
    """

    temperatures: jax.Array
    round_seconds: jax.Array
    plain_seconds: jax.Array
    drafting: jax.Array
    idle_rounds: jax.Array

    def after_round(self, theta: jax.Array, rows: jax.Array) -> "SchedulerState":
        """The gate for the next round. After a drafting round: keep drafting iff the chosen plan's expected
        throughput `theta` beats plain decoding of the `rows` live rows (rows / plain_seconds). After a skipped
        round: draft again once PROBE_EVERY rounds have passed without it."""
        beats_plain = theta > rows / self.plain_seconds
        idle = jnp.where(self.drafting, 0, self.idle_rounds + 1)
        drafting = jnp.where(self.drafting, beats_plain, idle >= PROBE_EVERY)
        return dataclasses.replace(self, drafting=drafting, idle_rounds=idle)


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
) -> tuple[jax.Array, jax.Array]:
    """(i32[batch] drafts to verify per row, f32[] the plan's expected throughput Θ): the greedy causal prefix
    scheduler of spec §11.

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
    num_taken = jnp.sum(taken)
    plan_theta = jnp.where(num_taken > 0, theta[jnp.maximum(num_taken - 1, 0)], before[0])
    return jnp.zeros((bsz,), jnp.int32).at[row].add(taken.astype(jnp.int32)), plan_theta
