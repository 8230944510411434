"""How many of a block's drafts to verify (spec §6.5); pure functions of confidences."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.configs import VerifyPolicy

# Probe interval bounds: while the draft is switched off, a probe round drafts again every `probe_every` rounds to
# see whether drafting pays again. A probe that does not pay wastes part of a drafting round, so the interval is at
# least that waste over PROBE_BUDGET plain rounds (probes then cost plain decoding at most ~PROBE_BUDGET of its
# throughput), at least PROBE_EVERY, doubles while probes keep failing, and stops at MAX_PROBE_EVERY.
PROBE_EVERY = 8
MAX_PROBE_EVERY = 512
PROBE_BUDGET = 0.02
# A gate shut from the start by the prior (the pair's confidences over many rounds) waits at least this long for its
# first probe: one probe round adds little to that evidence, and on the CPU a lone probe costs more than the table's
# steady-state round (it enters and leaves its loop).
PRIOR_PROBE_EVERY = 64
NEVER = 1 << 30  # a probe interval no decode reaches: the draft stays off
# A probe that opens the gate pays back over the drafting rounds after it, so one due within the batch's last
# PROBE_PAYBACK_ROUNDS rounds is not run, and the draft context it would read is not kept (`loop._may_draft_again`).
PROBE_PAYBACK_ROUNDS = 8
# Hysteresis of the draft gate: drafting starts (first round, probes) only when it beats plain decoding by
# GATE_MARGIN, and stops once it falls below GATE_CLOSE times plain. The cost table moves 10-20% with machine load and
# a round's tokens vary from 1 to block + 1, so near break-even a single threshold would flip the gate back and forth
# (each flip costs a change of inner loop) for no throughput; the measure the gate closes on is the slowest row's
# (`observed`, with GAIN_OPTIMISM standard errors), pessimistic for a batch already. GATE_CLOSE was 0.9 until
# 2026-12-04: a gate that stays open down to 0.9x plain lets a batch near break-even run below the 0.95x bar (bf16
# on a Zen 5 CPU, batch 16 / 64: 0.87 / 0.82-0.95x plain at 0.9; 0.98 / 0.91 at 1.0). Replayed at batch 1
# (gate_replay.py, 30 held-out prompts) it costs 0.002-0.017 of the mean speedup where a widest round costs 2-3 plain
# steps (benchmarks/RESULTS.md, session 18).
GATE_MARGIN = 1.05
GATE_CLOSE = 1.0
# Weight of the newest drafting round in each row's running mean of tokens committed (`SchedulerState.gain`): a
# round commits anywhere from 1 to block + 1 tokens, so the mean must span many rounds before it decides. The gain
# the cost table measured (16 rounds of other prompts, or of this request's first ones) counts as GAIN_PRIOR_ROUNDS
# of the request's own rounds: the request's n-th drafting round weighs max(GAIN_WEIGHT, 1 / (n + GAIN_PRIOR_ROUNDS)).
# A probe round (the first after a shut spell) weighs PROBE_GAIN_WEIGHT: the history it joins is stale.
GAIN_WEIGHT = 1 / 16
GAIN_PRIOR_ROUNDS = 4
PROBE_GAIN_WEIGHT = 1 / 2
# The gate compares each row's running mean plus GAIN_OPTIMISM standard errors of that mean (from the row's running
# variance of tokens a round, `SchedulerState.spread`) with plain decoding: it closes only once drafting loses
# beyond the noise. A round's tokens are not stationary: on the embedded pair the first 16 rounds of an answer
# commit 0.85x the answer's mean (lower on 29 of 31 prompts), and runs of whole-block rounds come later, so a gate
# that closes on a noisy early dip misses them. Replayed on every start position of 31 prompts (benchmarks/
# RESULTS.md, 2026-12-03 session 11), a gate with no optimism fell up to 0.5x behind `full` at batch 1 while one at
# 2 standard errors stayed within 0.05x; where drafting loses clearly (a batch whose round costs 3-7 plain ones)
# the mean is far below plain and the margin changes nothing.
GAIN_OPTIMISM = 2.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SchedulerState:
    """The scheduler's inputs (spec §11) and its draft gate, carried in the decode state.

    temperatures: f32[slots] confidence temperatures (spec §10; ones = uncalibrated);
    width_seconds: f32[widths] seconds of one speculative round (draft included) at each compiled target-pass
      width, measured by running the compiled loop itself; plain_seconds: f32[] seconds of one round without the
      draft (one target position per row) in the same loop;
    prior: f32[batch, slots] each row's prefix confidences s from its latest drafting round (before any: the
      pair's typical confidences, or ones when unknown);
    drafting: bool[] whether the next round runs the draft; idle_rounds: i32[] rounds since the draft last ran;
    probe_every: i32[] the current probe interval (NEVER: the draft stays off); forced: i32[] -1, or a width index
      every round must use with the draft on (how the cost table is measured); gain: f32[batch] each row's running
      mean of the tokens its drafting rounds committed (0 before the first), what drafting delivered as measured
      rather than as the confidences predict (`observed`); spread: f32[batch] each row's running variance of those
      tokens; drafted: i32[] drafting rounds so far.
    """

    temperatures: jax.Array
    width_seconds: jax.Array
    plain_seconds: jax.Array
    prior: jax.Array
    drafting: jax.Array
    idle_rounds: jax.Array
    probe_every: jax.Array
    forced: jax.Array
    gain: jax.Array
    spread: jax.Array
    drafted: jax.Array

    @classmethod
    def initial(
        cls,
        temperatures,
        width_seconds,
        plain_seconds,
        batch: int,
        *,
        drafting=True,
        forced=-1,
        prior=None,
        gain=None,
        spread=None,
        widths=None,
    ):
        """The state before the first round. prior: f32[slots] the pair's typical prefix confidences (default ones);
        gain: the tokens per round that the slowest row committed when the cost table was measured, one value or
        one per width (a round at width w commits at most w: `loop.slowest_row_stats`), or None; spread: the
        variance of that row's tokens a round, likewise (default: that of a uniform draw from 1 .. slots + 1);
        widths: the compiled target-pass widths (default 1, 2, ... one per width_seconds entry). The first round's
        planned width picks the entries the state starts from.

        drafting=False shuts the draft off for good. Otherwise, with a measured `gain`, the first round of a
        one-row batch drafts unless that gain dooms it: even a round committing every slot it verifies would leave
        the running mean, GAIN_OPTIMISM standard errors included, below the bar the gate closes on. One round more
        costs little where drafting is near break-even, and from there the request's own rounds decide. With
        several rows the first round drafts only if the measured gain itself beats plain decoding. Without a
        gain, it drafts if a round planned on `prior` beats plain decoding by GATE_MARGIN. A gate that starts shut
        waits a probe interval of at least PRIOR_PROBE_EVERY rounds for its first probe (a batch where drafting
        does not pay then runs as plain decoding from the first round).
        """
        widths = np.arange(1, len(width_seconds) + 1) if widths is None else widths
        slots = len(temperatures)
        prior = np.ones((slots,), np.float32) if prior is None else prior
        spread = ((slots + 1) ** 2 - 1) / 12 if spread is None else spread
        measured = gain is not None
        gain = 0 if gain is None else gain
        gain, spread = (np.broadcast_to(np.asarray(a, np.float32), (len(widths),)) for a in (gain, spread))
        args = (temperatures, width_seconds, plain_seconds, prior, gain, spread)
        args = tuple(jnp.asarray(a, jnp.float32) for a in args) + (jnp.asarray(widths, jnp.int32),)
        # One compiled call: as eager operations this took ~7 ms, paid by every request before its first round.
        return _initial(*args, batch=batch, drafting=bool(drafting), forced=int(forced), measured=measured)

    def observed(self, committed: jax.Array, live: jax.Array, seconds: jax.Array) -> tuple["SchedulerState", jax.Array]:
        """After a drafting round that took `seconds` (its width's table entry) and committed i32[batch] tokens in
        the bool[batch] live rows: (the state with the live rows' `gain` and `spread` updated (a row's first
        measurement sets the gain, unless the cost table's timing run did), f32[] the throughput drafting delivers to
        these rows as the batch decodes: rows x the smallest live gain, GAIN_OPTIMISM standard errors included, /
        seconds). A batch runs until its slowest row is done, so the slowest row's rate, not the mean, is what
        drafting rounds buy over plain ones (on the embedded pair at batch 8 the mean row commits 3.9 tokens a
        round, the batch finishes at 2.5 tokens a round per row). The gate runs on this measurement, not on the
        confidences' forecast: a confidence head miscalibrated on the prompts at hand (held-out ECE 0.08 on the
        embedded pair, under-confident there) would otherwise switch off a draft that pays, or keep one that does
        not."""
        probe = self.idle_rounds > 0
        steady = jnp.maximum(GAIN_WEIGHT, 1.0 / (self.drafted + 1 + GAIN_PRIOR_ROUNDS).astype(jnp.float32))
        weight = jnp.where(probe, PROBE_GAIN_WEIGHT, steady)
        mixed = jnp.where(self.gain > 0, (1 - weight) * self.gain + weight * committed, committed)
        gain = jnp.where(live, mixed, self.gain)
        deviation = (committed - gain) ** 2
        spread = jnp.where(live, (1 - GAIN_WEIGHT) * self.spread + GAIN_WEIGHT * deviation, self.spread)
        # A probe joins a stale history, so it is judged at the steady weight's error, not at its own weight's.
        hopeful = gain + _optimism(spread, jnp.where(probe, GAIN_WEIGHT, steady))
        rows = jnp.sum(live)
        slowest = jnp.min(jnp.where(live, hopeful, jnp.inf))
        state = dataclasses.replace(self, gain=gain, spread=spread, drafted=self.drafted + 1)
        return state, jnp.where(rows > 0, slowest * rows / seconds, 0.0)

    def after_round(self, theta: jax.Array, rows: jax.Array, probe_seconds=None) -> "SchedulerState":
        """The gate for the next round. After a drafting round: keep drafting iff the throughput `theta` that
        drafting delivers (`observed`; a forecast from the confidences before any measurement) clears plain
        decoding of the `rows` live rows: by a factor GATE_MARGIN after a probe (or for the first round), or by
        GATE_CLOSE (below 1) after a drafting round. A round that does not pay sets the probe interval to the
        larger of twice the last one and the round's waste (`probe_seconds`, the seconds of the planned drafting
        round, default the cheapest one, times the share of it plain decoding would not need) over PROBE_BUDGET
        plain rounds; one that pays resets it. After a skipped round: draft again once `probe_every` rounds have
        passed without it (never, at NEVER)."""
        rows = jnp.asarray(rows, jnp.float32)
        plain_rate = rows / self.plain_seconds
        # A round after a shut spell (a probe; the first round) must win clearly to open the gate; rounds after
        # drafting rounds keep it open until drafting clearly loses.
        bar = jnp.where(self.idle_rounds > 0, GATE_MARGIN, GATE_CLOSE) * plain_rate
        beats_plain = theta > bar
        if probe_seconds is None:
            probe_seconds = jnp.min(self.width_seconds)
        waste = probe_seconds * jnp.maximum(1.0 - theta / jnp.maximum(plain_rate, 1e-30), 0.0)
        cost_interval = jnp.ceil(waste / (PROBE_BUDGET * self.plain_seconds))
        backed_off = jnp.maximum(2.0 * self.probe_every.astype(jnp.float32), cost_interval)
        backed_off = jnp.clip(backed_off, PROBE_EVERY, MAX_PROBE_EVERY).astype(jnp.int32)
        probe_every = jnp.where(
            self.drafting & (self.probe_every < NEVER),
            jnp.where(beats_plain, PROBE_EVERY, backed_off),
            self.probe_every,
        )
        idle = jnp.where(self.drafting, 0, self.idle_rounds + 1)
        drafting = jnp.where(self.drafting, beats_plain, idle >= probe_every) | (self.forced >= 0)
        return dataclasses.replace(self, drafting=drafting, idle_rounds=idle, probe_every=probe_every)


def _optimism(spread: jax.Array, weight) -> jax.Array:
    """GAIN_OPTIMISM standard errors of a running mean that weighs its newest round `weight`, over rounds whose tokens
    have variance `spread`: sqrt(spread weight / (2 - weight)) each."""
    return GAIN_OPTIMISM * jnp.sqrt(spread * weight / (2 - weight))


@functools.partial(jax.jit, static_argnames=("batch", "drafting", "forced", "measured"))
def _initial(
    temperatures, width_seconds, plain_seconds, prior, gain, spread, widths, *, batch, drafting, forced, measured
):
    """SchedulerState.initial's state (its arguments as arrays, gain and spread f32[widths]; `measured`: whether
    `gain` was measured)."""
    slots = temperatures.shape[0]
    # Per row (every row has the same prior), so the live-row count cancels: one row stands for the batch. A
    # first drafting round that does not pay costs one round: after it the measured tokens decide (`observed`).
    planned, theta = plan_width(prior[None], jnp.ones((1,), bool), widths, width_seconds)
    seconds = width_seconds[planned]
    gain, spread = gain[planned], spread[planned]
    state = SchedulerState(
        temperatures,
        width_seconds,
        plain_seconds,
        jnp.broadcast_to(prior, (batch, slots)),
        jnp.bool_(True),
        jnp.int32(1),  # the first round is judged like a probe (`after_round`); reset below
        jnp.int32(PROBE_EVERY // 2),
        jnp.int32(forced),
        jnp.full((batch,), gain, jnp.float32),
        jnp.full((batch,), spread, jnp.float32),
        jnp.int32(0),
    )
    off = dataclasses.replace(state, drafting=jnp.bool_(False), idle_rounds=jnp.int32(0), probe_every=jnp.int32(NEVER))
    if not drafting:
        return off
    if measured:
        if batch == 1:
            # If even a round committing all its `widths[planned]` slots leaves the running mean (at the steady
            # weight, with its optimism) below the bar the gate closes on, the round is a certain waste: the gate
            # starts shut. Otherwise the first round drafts: the table's gain is the first rounds of one answer,
            # which commit less than the answer's mean (0.85x on the embedded pair), and one round more costs little.
            best = (1 - GAIN_WEIGHT) * gain + GAIN_WEIGHT * widths[planned].astype(jnp.float32)
            best = best + _optimism(spread, GAIN_WEIGHT)
        else:
            # Several rows: the table's gain is its slowest row's, the pace a batch keeps, and the first round drafts
            # only if that gain as measured beats plain decoding. Replayed near break-even (gate_replay_batch.py,
            # held-out rounds), the optimistic start above kept the gate open for 2-3 losing rounds: batch 4 with a
            # widest round at 3.1-3.7 plain steps ran at 0.944-0.960x plain with it and 0.979-0.990x without; batch 8
            # at width 4 and 2.4-2.8 steps at 0.949-0.973x with it and 1.00x without (benchmarks/RESULTS.md,
            # session 22).
            best = gain
        theta = jnp.where(best / seconds <= GATE_CLOSE / plain_seconds, best / seconds, jnp.inf)
    opened = state.after_round(theta, jnp.int32(1), seconds)
    probe_every = jnp.where(opened.drafting, opened.probe_every, jnp.maximum(opened.probe_every, PRIOR_PROBE_EVERY))
    opened = dataclasses.replace(opened, idle_rounds=jnp.int32(0), probe_every=probe_every)
    if forced >= 0:  # the cost table's timing runs draft whatever the table says
        return opened
    # Drafts that are always accepted give w tokens per row at width w: if no width beats plain decoding so, no
    # drafting round can ever pay, and the draft stays off.
    hopeless = ~jnp.any(width_seconds < plain_seconds * widths.astype(jnp.float32))
    return jax.tree.map(lambda a, b: jnp.where(hopeless, a, b), off, opened)


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
