"""How many of a block's drafts to verify (spec §6.5); pure functions of confidences."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax.configs import VerifyPolicy

# Probe interval bounds: while the draft is switched off, a probe round drafts again every `probe_every` rounds
# (starting at PROBE_EVERY) to see whether drafting pays again; each probe that still does not pay doubles the
# interval up to MAX_PROBE_EVERY, so a batch where speculation never pays spends < 1% of its rounds probing.
PROBE_EVERY = 8
MAX_PROBE_EVERY = 128


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SchedulerState:
    """The scheduler's inputs (spec §11) and its draft gate, carried in the decode state.

    temperatures: f32[slots] confidence temperatures (spec §10; ones = uncalibrated);
    width_seconds: f32[widths] seconds of one speculative round (draft included) at each compiled target-pass
      width, measured by running the compiled loop itself; plain_seconds: f32[] seconds of one round without the
      draft (one target position per row) in the same loop;
    prior: f32[batch, slots] each row's prefix confidences s from its latest drafting round (ones before any);
    drafting: bool[] whether the next round runs the draft; idle_rounds: i32[] rounds since the draft last ran;
    probe_every: i32[] the current probe interval; forced: i32[] -1, or a width index every round must use with
      the draft on (how the cost table is measured).
    """

    temperatures: jax.Array
    width_seconds: jax.Array
    plain_seconds: jax.Array
    prior: jax.Array
    drafting: jax.Array
    idle_rounds: jax.Array
    probe_every: jax.Array
    forced: jax.Array

    @classmethod
    def initial(cls, temperatures, width_seconds, plain_seconds, batch: int, *, drafting=True, forced=-1):
        slots = len(temperatures)
        return cls(
            jnp.asarray(temperatures, jnp.float32),
            jnp.asarray(width_seconds, jnp.float32),
            jnp.float32(plain_seconds),
            jnp.ones((batch, slots), jnp.float32),
            jnp.bool_(drafting),
            jnp.int32(0),
            jnp.int32(PROBE_EVERY if drafting else 1 << 30),
            jnp.int32(forced),
        )

    def after_round(self, theta: jax.Array, rows: jax.Array) -> "SchedulerState":
        """The gate for the next round. After a drafting round: keep drafting iff the best plan's expected
        throughput `theta` (from this round's confidences) beats plain decoding of the `rows` live rows; a round
        that does not pay doubles the probe interval, one that pays resets it. After a skipped round: draft again
        once `probe_every` rounds have passed without it."""
        beats_plain = theta > rows / self.plain_seconds
        probe_every = jnp.where(
            self.drafting,
            jnp.where(beats_plain, PROBE_EVERY, jnp.minimum(2 * self.probe_every, MAX_PROBE_EVERY)),
            self.probe_every,
        )
        idle = jnp.where(self.drafting, 0, self.idle_rounds + 1)
        drafting = jnp.where(self.drafting, beats_plain, idle >= probe_every) | (self.forced >= 0)
        return dataclasses.replace(self, drafting=drafting, idle_rounds=idle, probe_every=probe_every)


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


def plan_width(
    s: jax.Array, live: jax.Array, widths: jax.Array, width_seconds: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(i32[] index of the compiled width with the highest expected throughput, f32[] that throughput Θ).

    s: f32[batch, slots] prefix confidences (each slot's calibrated chance to survive with all before it); live:
    bool[batch]; widths: i32[W] compiled target-pass widths; width_seconds: f32[W] measured round times.

    A round's target pass runs every row at one width w (the narrowest compiled width that holds the longest
    verified prefix), so its cost depends on w, not on how many of the w - 1 slots each row verifies: once w is
    paid, verifying all w - 1 drafts of every row only adds expected tokens. The choice therefore reduces to w:
    Θ(w) = Σ_live (1 + Σ_{j < w-1} s_j) / width_seconds[w] (spec §11's objective with the cost of the pass
    actually run). Lossless: the loop plans a round from the confidences of the row's previous drafting round
    (`SchedulerState.prior`), never from the round's own drafts.
    """
    cum = jnp.concatenate([jnp.zeros_like(s[:, :1]), jnp.cumsum(s, axis=1)], axis=1)  # [batch, slots + 1]
    expected = jnp.sum(jnp.where(live[:, None], 1.0 + cum[:, widths - 1], 0.0), axis=0)  # f32[W]
    theta = expected / width_seconds
    best = jnp.argmax(theta).astype(jnp.int32)
    return best, theta[best]
