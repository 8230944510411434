"""Verify policies (spec §6.5, §11) and confidence calibration (spec §7.3, §10): the scheduler's width plan against a
literal one, its draft gate, temperature fitting, calibration metrics and files."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax import metrics
from dspark_jax.decoding import calibration, loop
from dspark_jax.decoding.schedule import (
    GAIN_OPTIMISM,
    GAIN_PRIOR_ROUNDS,
    GAIN_WEIGHT,
    GATE_CLOSE,
    GATE_MARGIN,
    MAX_PROBE_EVERY,
    NEVER,
    PRIOR_PROBE_EVERY,
    PROBE_BUDGET,
    PROBE_EVERY,
    PROBE_GAIN_WEIGHT,
    SchedulerState,
    plan_width,
    prefix_confidences,
)


def best_width(s, live, widths, seconds):
    """The width plan written out: for each compiled width, every live row verifies its first w - 1 drafts and
    expects 1 + their prefix confidences; pick the width with the highest expected tokens per second."""
    best, best_theta = None, -1.0
    for i, w in enumerate(widths):
        expected = sum(1 + sum(s[r, : w - 1]) for r in range(len(s)) if live[r])
        if expected / seconds[i] > best_theta:
            best, best_theta = i, expected / seconds[i]
    return best, best_theta


@pytest.mark.parametrize("seed", range(12))
def test_plan_width_matches_the_literal_plan(seed):
    rng = np.random.default_rng(seed)
    batch, slots = int(rng.integers(1, 6)), 7
    widths = np.array([1, 2, 4, 8])
    z = rng.normal(0.5, 2.0, size=(batch, slots)).astype(np.float32)
    temps = rng.uniform(0.5, 2.0, size=slots).astype(np.float32)
    s = np.asarray(prefix_confidences(jnp.asarray(z), jnp.asarray(temps)))
    live = rng.random(batch) < 0.8
    seconds = np.cumsum(rng.uniform(0.1, 1.0, size=4)).astype(np.float32)
    idx, theta = plan_width(jnp.asarray(s), jnp.asarray(live), jnp.asarray(widths), jnp.asarray(seconds))
    want, want_theta = best_width(s.astype(np.float64), live, widths, seconds.astype(np.float64))
    assert int(idx) == want
    assert float(theta) == pytest.approx(want_theta, rel=1e-5)


def test_plan_width_extremes():
    widths = jnp.array([1, 2, 4, 8])
    s = jnp.asarray(np.cumprod(np.full((2, 7), 0.9), axis=1), jnp.float32)
    live = jnp.array([True, True])
    pick = lambda seconds, s=s: int(plan_width(s, live, widths, jnp.asarray(seconds, jnp.float32))[0])  # noqa: E731
    assert pick([1.0, 1.0, 1.0, 1.0]) == 3  # free verification: the whole block
    assert pick([1.0, 2.0, 4.0, 8.0]) == 0  # cost proportional to the width: no drafts pay
    assert pick([1.0, 1.5, 2.0, 8.0]) == 2  # 2 rows x (1 + .9 + .81 + .73) / 2 beats the rest
    assert pick([1.0, 1.0, 1.0, 1.0], jnp.zeros((2, 7))) == 0  # hopeless drafts: the cheapest (first) width


def test_gate_backs_off_and_resets():
    """Probes that barely fail (waste 5% of a round: the cost floor is 3 rounds) back off by doubling."""
    sched = SchedulerState.initial(np.ones(3), [1.0, 1.0], 1.0, 2)
    assert bool(sched.drafting) and int(sched.probe_every) == PROBE_EVERY
    # Just above GATE_CLOSE x plain's 2 tokens/s keeps a drafting gate open, though a probe would need GATE_MARGIN x
    # plain to open it (hysteresis); 1.7 closes it
    kept = 2 * GATE_CLOSE + 0.05
    assert kept < 2 * GATE_MARGIN and bool(sched.after_round(jnp.float32(kept), jnp.int32(2)).drafting)
    off = sched.after_round(jnp.float32(1.7), jnp.int32(2))
    assert not bool(off.drafting) and int(off.probe_every) == 2 * PROBE_EVERY
    for _ in range(2 * PROBE_EVERY - 1):
        off = off.after_round(jnp.float32(0.0), jnp.int32(2))
        assert not bool(off.drafting)
    probe = off.after_round(jnp.float32(0.0), jnp.int32(2))
    assert bool(probe.drafting)  # the probe round
    assert int(probe.after_round(jnp.float32(1.9), jnp.int32(2)).probe_every) == 4 * PROBE_EVERY  # still no
    assert int(probe.after_round(jnp.float32(3.0), jnp.int32(2)).probe_every) == PROBE_EVERY  # pays again
    capped = dataclasses.replace(sched, probe_every=jnp.int32(MAX_PROBE_EVERY))
    assert int(capped.after_round(jnp.float32(0.0), jnp.int32(2)).probe_every) == MAX_PROBE_EVERY
    forced = SchedulerState.initial(np.ones(3), [1.0, 1.0], 1.0, 2, forced=1)
    assert bool(forced.after_round(jnp.float32(0.0), jnp.int32(2)).drafting)  # measuring: the draft stays on


def hopeful_gain(gain, spread, weight):
    """A running mean plus GAIN_OPTIMISM standard errors, written out."""
    return gain + GAIN_OPTIMISM * np.sqrt(spread * weight / (2 - weight))


def test_gate_runs_on_measured_tokens():
    """`observed` keeps each live row's running mean and variance of tokens committed (the first round sets the mean,
    later ones weigh max(GAIN_WEIGHT, 1 / (n + GAIN_PRIOR_ROUNDS))) and prices the slowest live row's mean plus
    GAIN_OPTIMISM standard errors at the round's seconds; the gate closes once that falls below plain decoding by
    GATE_CLOSE, later than the bare mean would, and a probe round weighs PROBE_GAIN_WEIGHT."""
    sched = SchedulerState.initial(np.ones(3), [1.0, 1.0], 1.0, 3, spread=2.0)
    live = jnp.asarray([True, True, False])
    first, delivered = sched.observed(jnp.asarray([4, 2, 7]), live, jnp.float32(2.0))  # the done row is ignored
    np.testing.assert_allclose(first.gain, [4.0, 2.0, 0.0])
    np.testing.assert_allclose(first.spread, [(1 - GAIN_WEIGHT) * 2.0] * 2 + [2.0], rtol=1e-6)
    w1 = 1 / (1 + GAIN_PRIOR_ROUNDS)
    slowest = hopeful_gain(2.0, (1 - GAIN_WEIGHT) * 2.0, w1)  # the slower row, 2 rows / 2 s
    assert float(delivered) == pytest.approx(slowest, rel=1e-5)
    second, delivered = first.observed(jnp.asarray([1, 5, 1]), live, jnp.float32(2.0))
    w = 1 / (2 + GAIN_PRIOR_ROUNDS)
    np.testing.assert_allclose(second.gain, [(1 - w) * 4 + w, (1 - w) * 2 + w * 5, 0.0], rtol=1e-6)
    means, spreads = np.asarray(second.gain[:2]), np.asarray(second.spread[:2])
    assert float(delivered) == pytest.approx(min(hopeful_gain(means, spreads, w)), rel=1e-5)
    assert int(second.drafted) == 2
    # One token a round from a mean of 3 (plain: 2 rows / 1 s, so 2 tokens a round / 2 s is break-even): the gate
    # closes once the mean plus its optimism falls below GATE_CLOSE x 2 tokens, after the bare mean has.
    state, rounds, bare = sched.observed(jnp.asarray([3, 3, 3]), live, jnp.float32(2.0))[0], 0, None
    while bool(state.drafting):
        state, delivered = state.observed(jnp.asarray([1, 1, 1]), live, jnp.float32(2.0))
        state = state.after_round(delivered, jnp.int32(2))
        rounds += 1
        if bare is None and float(state.gain[0]) < 2.0 * GATE_CLOSE:
            bare = rounds
    assert float(delivered) < 2.0 * GATE_CLOSE <= float(state.gain[0]) + 1.0 and rounds > bare
    assert int(state.idle_rounds) == 0
    while not bool(state.drafting):  # the probe's tokens weigh PROBE_GAIN_WEIGHT against the stale means
        state = state.after_round(jnp.float32(0), jnp.int32(2))
    probed, delivered = state.observed(jnp.asarray([7, 7, 1]), live, jnp.float32(2.0))
    expected = (1 - PROBE_GAIN_WEIGHT) * float(state.gain[0]) + PROBE_GAIN_WEIGHT * 7
    np.testing.assert_allclose(probed.gain[:2], [expected, expected], rtol=1e-6)
    # ... and its standard error is that of the steady mean: a stale history is not a fresh estimate
    assert float(delivered) == pytest.approx(hopeful_gain(expected, float(probed.spread[0]), GAIN_WEIGHT), rel=1e-5)


def test_first_round_follows_the_measured_gain():
    """With a gain measured by the cost table's timing run, a one-row batch's first round drafts unless that gain
    dooms it: even a round committing every slot it verifies leaves the running mean, with its optimism, below the
    bar the gate closes on. Without one, the typical confidences decide, by GATE_MARGIN."""
    seconds, widths = [1.1, 1.2, 1.6], [1, 2, 4]
    init = functools.partial(SchedulerState.initial, np.ones(3), seconds, 1.0, 1, widths=widths)
    near = init(prior=[0.0, 0.0, 0.0], gain=1.0, spread=1.0)  # break-even: one round more costs little
    assert bool(near.drafting) and np.allclose(near.gain, 1.0) and np.allclose(near.spread, 1.0)
    assert int(near.idle_rounds) == 0 and int(near.drafted) == 0
    # A round of 4 tokens at 1.6 s after a mean of 1.0: 15/16 + 4/16 = 1.19 tokens (+ 2 x 0.09 standard errors of a
    # variance of 0.25) in 1.6 s, under GATE_CLOSE x plain's 1 token/s whatever the round commits.
    doomed = init(prior=[0.9, 0.9, 0.9], gain=1.0, spread=0.25)
    assert not bool(doomed.drafting) and int(doomed.probe_every) >= PRIOR_PROBE_EVERY
    noisy = init(prior=[0.9, 0.9, 0.9], gain=1.0, spread=4.0)  # ... unless the mean is that uncertain
    assert bool(noisy.drafting)
    off = init(prior=[0.1, 0.0, 0.0])  # unmeasured: 1.1 tokens in 1.2 s at best
    assert not bool(off.drafting) and int(off.probe_every) == PRIOR_PROBE_EVERY
    assert bool(init(prior=[0.9, 0.9, 0.9]).drafting)  # the confidences promise 3.4 tokens in 1.6 s


@pytest.mark.parametrize("rows", [2, 4, 64])
def test_several_rows_start_drafting_only_on_a_paying_gain(rows):
    """With several rows the first round drafts only if the table's gain (its slowest row's tokens a round) beats
    plain decoding as measured: near break-even the optimistic start of one row would lose 2-3 rounds a batch."""
    init = functools.partial(SchedulerState.initial, np.ones(3), [1.1, 1.2, 1.6], 1.0, rows, widths=[1, 2, 4])
    prior = [0.9, 0.9, 0.9]  # width 4 planned: 1.6 s a round
    near = init(prior=prior, gain=1.55, spread=4.0)  # 0.97 tokens/s against plain's 1: shut, however noisy
    assert not bool(near.drafting) and int(near.probe_every) >= PRIOR_PROBE_EVERY
    assert bool(
        SchedulerState.initial(
            np.ones(3), [1.1, 1.2, 1.6], 1.0, 1, widths=[1, 2, 4], prior=prior, gain=1.55, spread=4.0
        ).drafting
    )  # one row: optimistic
    paying = init(prior=prior, gain=1.7, spread=0.25)  # 1.06 tokens/s
    assert bool(paying.drafting) and int(paying.idle_rounds) == 0


def test_first_round_takes_the_planned_widths_gain():
    """A gain per width: the first round is judged on the entry of the width it is planned at. Here width 2 is
    planned (1.9 tokens in 1.6 s beat 3.4 in 3.5 s), its slowest row committed 1 token a round (doomed: 1.24 tokens
    in 1.6 s at best), while the widest width's entry (3 tokens) alone would open the gate."""
    init = functools.partial(SchedulerState.initial, np.ones(3), [1.1, 1.6, 3.5], 1.0, 2, widths=[1, 2, 4])
    prior, spread = [0.9, 0.9, 0.9], [0.25, 0.25, 0.25]
    per_width = init(prior=prior, gain=[1.0, 1.0, 3.0], spread=spread)
    assert not bool(per_width.drafting) and np.allclose(per_width.gain, 1.0)
    assert bool(init(prior=prior, gain=3.0, spread=0.25).drafting)


def test_table_gain_is_capped_at_each_width():
    """A round at width w commits min(c, w) of a whole-block round's c, and the slowest row is the slowest at that
    width: a row alternating 8 and 1 is the slowest up to width 4, a steady 3 beyond."""
    mean, var = loop.slowest_row_stats([np.array([8, 1, 8, 1]), np.array([3, 3, 3, 3])], [1, 2, 4, 8])
    np.testing.assert_allclose(mean, [1.0, 1.5, 2.5, 3.0])
    np.testing.assert_allclose(var, [0.0, 0.25, 2.25, 0.0])


def test_probe_interval_follows_the_waste():
    """A probe that wastes a lot waits until its waste is PROBE_BUDGET of the plain rounds in between."""
    sched = SchedulerState.initial(np.ones(3), [1.0, 1.5], 1.0, 4)
    # theta 1 against plain's 4 tokens/s: 3/4 of a 1.5 s probe round is waste, 1.125 s / (0.02 * 1 s) = 57 rounds.
    off = sched.after_round(jnp.float32(1.0), jnp.int32(4), jnp.float32(1.5))
    assert not bool(off.drafting) and int(off.probe_every) == int(np.ceil(1.125 / PROBE_BUDGET))
    default = sched.after_round(jnp.float32(1.0), jnp.int32(4))  # the cheapest round stands in: 0.75 s of waste
    assert int(default.probe_every) == int(np.ceil(0.75 / PROBE_BUDGET))
    huge = sched.after_round(jnp.float32(0.0), jnp.int32(4), jnp.float32(100.0))
    assert int(huge.probe_every) == MAX_PROBE_EVERY


@pytest.mark.parametrize(
    "seconds, plain, prior, drafting, probe_every",
    [
        ([1.1, 1.2, 1.6], 1.0, None, True, PROBE_EVERY),  # unknown prior (ones): width 4 gives 4 tokens in 1.6 s
        ([1.1, 1.2, 1.6], 1.0, [0.9, 0.8, 0.7], True, PROBE_EVERY),  # 3.4 tokens in 1.6 s beat 1 in 1 s
        ([1.1, 1.2, 1.6], 1.0, [0.1, 0.0, 0.0], False, PRIOR_PROBE_EVERY),  # best 1.1 tokens in 1.2 s
        ([1.5, 2.0, 3.0], 1.0, [0.0, 0.0, 0.0], False, PRIOR_PROBE_EVERY),  # 1 token in 1.5 s: waste 0.5 s
        ([2.0, 3.0, 5.0], 1.0, None, False, NEVER),  # even accepted drafts lose (4 tokens take 5 plain rounds)
    ],
)
def test_first_round_is_planned_on_the_prior(seconds, plain, prior, drafting, probe_every):
    sched = SchedulerState.initial(np.ones(3), seconds, plain, 2, prior=prior, widths=[1, 2, 4])
    assert bool(sched.drafting) == drafting
    assert int(sched.probe_every) == probe_every
    assert int(sched.idle_rounds) == 0
    if prior is not None:
        assert np.allclose(np.asarray(sched.prior), np.broadcast_to(prior, (2, 3)))


def drafted_rounds(sched, n, theta, rows):
    """bool[n]: which of n rounds draft under the gate, when a drafting round's plan makes `theta` tokens/s."""

    def step(state, _):
        return state.after_round(jnp.where(state.drafting, theta, 0.0), rows), state.drafting

    return np.asarray(jax.lax.scan(step, sched, None, length=n)[1])


def test_hopeless_and_switched_off_gates_never_probe():
    hopeless = SchedulerState.initial(np.ones(3), [2.0, 3.0, 5.0], 1.0, 2, widths=[1, 2, 4])
    off = SchedulerState.initial(np.ones(3), [1.0, 1.0, 1.0], 1.0, 2, drafting=False, widths=[1, 2, 4])
    for sched in (hopeless, off):
        assert not drafted_rounds(sched, 4 * MAX_PROBE_EVERY, jnp.float32(0.0), jnp.int32(2)).any()
    measuring = SchedulerState.initial(np.ones(3), [2.0, 3.0, 5.0], 1.0, 2, widths=[1, 2, 4], forced=2)
    assert bool(measuring.drafting)  # the cost table's timing runs draft whatever the table says


def replay_batch_one(commits, ratio, gain, spread, n):
    """Plain steps the gate takes for n tokens at batch 1 when a whole-block round costs `ratio` plain steps and
    commits commits[L - 1] tokens at answer length L (greedy decoding: where a round starts fixes what it commits);
    the loop's calls, in the loop's order."""
    sched = SchedulerState.initial(np.ones(7), [ratio], 1.0, 1, gain=gain, spread=spread, widths=[8])
    length, steps, live = 1, 0.0, jnp.ones((1,), bool)
    while length <= n:
        if bool(sched.drafting):
            c = commits[length - 1]
            sched, delivered = sched.observed(jnp.asarray([c]), live, jnp.float32(ratio))
            sched = sched.after_round(delivered, jnp.int32(1), jnp.float32(ratio))
            steps, length = steps + ratio, length + c
        else:
            sched = sched.after_round(jnp.float32(0), jnp.int32(1))
            steps, length = steps + 1.0, length + 1
    return steps


def test_gate_rides_out_an_early_dip():
    """Batch 1, a widest round at 2.6 plain steps: an answer whose first ~20 rounds commit about break-even (2.1
    tokens a round, from 1 to 5, as the embedded pair's early rounds do on the main command's prompt) and whose later
    rounds commit whole blocks. The table measured the dip (its timing run is the answer's first 16 rounds); the gate
    keeps drafting through it and finishes with always-drafting's time, where closing on the dip would take the
    rest of the answer at plain speed."""
    dip = [1, 5, 2, 1, 1, 3, 1, 4, 1, 2, 1, 3]
    commits = [dip[i % len(dip)] for i in range(48)] + [8] * 160
    n, ratio = 128, 2.6
    always, length = 0.0, 1
    while length <= n:
        always, length = always + ratio, length + commits[length - 1]
    first, lengths = [], [1]
    while len(first) < 16:
        first.append(commits[lengths[-1] - 1])
        lengths.append(lengths[-1] + first[-1])
    gain, spread = float(np.mean(first)), float(np.var(first))
    assert gain / ratio < 0.9  # below the bar the gate closes on: without its optimism it would close
    assert replay_batch_one(commits, ratio, gain, spread, n) <= always
    # ... yet where drafting clearly loses for good, it still ends near plain decoding's n steps
    assert replay_batch_one([1] * 200, ratio, 1.0, 0.0, n) <= 1.05 * n


def test_probes_cost_at_most_the_budget():
    """Over a long decode where drafting never pays, the probes' waste stays within PROBE_BUDGET of plain time."""
    seconds, plain, rows, theta = np.float32([1.5, 1.8, 2.5]), 1.0, 16, 8.0  # a probe makes 8 tokens/s, plain 16
    sched = SchedulerState.initial(np.ones(3), seconds, plain, rows, widths=[1, 2, 4])
    n = 4000
    drafted = drafted_rounds(sched, n, jnp.float32(theta), jnp.int32(rows))
    assert drafted[0] and 3 <= drafted.sum() <= 12  # the first round (planned on ones), then probes backing off
    waste = drafted.sum() * seconds[0] * (1 - theta / rows * plain)  # each probe's seconds beyond plain's
    assert waste <= seconds[0] + PROBE_BUDGET * n * plain


# ------------------------------------------------------------------------------------------------- calibration


def synthetic_rounds(rng, n, true_temps):
    """Confidence logits whose true per-slot acceptance is sigmoid(z_j / t_j); returns (z, accepted, proposed)."""
    slots = len(true_temps)
    z = rng.normal(1.0, 2.5, size=(n, slots))
    ok = rng.random((n, slots)) < 1 / (1 + np.exp(-z / np.asarray(true_temps)))
    accepted = np.argmin(np.concatenate([ok, np.zeros((n, 1), bool)], axis=1), axis=1)  # leading run of accepts
    return z, accepted, np.full(n, slots)


def test_fit_recovers_the_temperatures_and_lowers_ece():
    true = [2.0, 0.5, 3.0]
    z, accepted, proposed = synthetic_rounds(np.random.default_rng(0), 40000, true)
    temps = calibration.fit_temperatures(z, accepted, proposed)
    np.testing.assert_allclose(temps, true, rtol=0.2)
    raw = metrics.calibration_metrics(z, accepted, proposed)
    fitted = metrics.calibration_metrics(z, accepted, proposed, temps)
    assert fitted["summary"]["ece"] < 0.02 < raw["summary"]["ece"]
    # a temperature rescales its own logit monotonically: slot 0's ranking (AUROC) is unchanged
    assert raw["per_slot"][0]["auroc"] == pytest.approx(fitted["per_slot"][0]["auroc"], abs=1e-12)


def test_ece_and_auroc_by_hand():
    assert metrics.ece([0.1, 0.1, 0.9, 0.9], [0, 1, 1, 1]) == pytest.approx((2 * 0.4 + 2 * 0.1) / 4)
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 5, size=300) / 4  # many ties
    label = rng.random(300) < pred
    pos, neg = pred[label], pred[~label]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert metrics.auroc(pred, label) == pytest.approx(pairs)
    assert metrics.auroc([0.5, 0.6], [True, True]) is None


def test_calibration_file_round_trip_and_errors(tmp_path):
    calibration.save_calibration(str(tmp_path), [1.5, 0.7], 2, {"rounds": 10})
    np.testing.assert_allclose(calibration.load_calibration(str(tmp_path), 2), [1.5, 0.7])
    assert calibration.load_calibration(str(tmp_path / "none"), 2) is None
    with pytest.raises(dj.UsageError, match="expected 3 positive"):
        calibration.load_calibration(str(tmp_path), 3)
    (tmp_path / "calibration.json").write_text(json.dumps({"temps": [1]}))
    with pytest.raises(dj.UsageError, match="not a calibration file"):
        calibration.load_calibration(str(tmp_path), 2)
    with pytest.raises(dj.UsageError, match="positive"):
        calibration.save_calibration(str(tmp_path), [1.0, -1.0], 2)
