"""Verify policies (spec §6.5, §11) and confidence calibration (spec §7.3, §10): the prefix scheduler against a
literal reading of the spec, its causality, temperature fitting, calibration metrics and files."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax import metrics
from dspark_jax.decoding import calibration
from dspark_jax.decoding.schedule import scheduled_num_to_verify


def walk(z, temps, live, seconds):
    """Spec §11's greedy causal procedure, written out literally (per-request lengths, running best, early stop)."""
    s = np.cumprod(1 / (1 + np.exp(-np.asarray(z, np.float64) / temps)), axis=1)
    s[~live] = 0.0
    k = np.zeros(len(z), np.int64)
    committed = float(live.sum())
    best = committed / seconds[live.sum()]
    pool = sorted(
        ((s[r, j], r, j) for r in range(len(z)) for j in range(z.shape[1])), key=lambda c: (-c[0], c[1], c[2])
    )
    for value, r, j in pool:
        assert k[r] == j  # descending s extends each request's prefix contiguously
        k[r] += 1
        committed += value
        theta = committed / seconds[live.sum() + k.sum()]
        if theta > best:
            best = theta
        else:
            k[r] -= 1
            break
    return k


@pytest.mark.parametrize("seed", range(12))
def test_scheduler_matches_the_spec_walk(seed):
    rng = np.random.default_rng(seed)
    batch, slots = int(rng.integers(1, 5)), int(rng.integers(1, 8))
    z = rng.normal(0.5, 2.0, size=(batch, slots)).astype(np.float32)
    temps = rng.uniform(0.5, 2.0, size=slots).astype(np.float32)
    live = rng.random(batch) < 0.8
    seconds = np.cumsum(rng.uniform(0.0, 0.3, size=batch * (slots + 1) + 1)).astype(np.float32) + 1.0
    got, _ = scheduled_num_to_verify(jnp.asarray(z), jnp.asarray(temps), jnp.asarray(live), jnp.asarray(seconds))
    np.testing.assert_array_equal(np.asarray(got), walk(z, temps, live, seconds.astype(np.float64)))


def test_scheduler_extremes():
    z = jnp.array([[3.0, 2.0, 0.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    ones, live = jnp.ones(4), jnp.array([True, True])
    verify = lambda seconds, live=live: np.asarray(scheduled_num_to_verify(z, ones, live, jnp.asarray(seconds))[0])  # noqa: E731
    np.testing.assert_array_equal(verify([1.0] * 11), [4, 4])  # free verification: everything
    np.testing.assert_array_equal(verify(np.arange(11.0)), [0, 0])  # cost proportional to tokens: nothing pays
    # 0.1 s per token: candidates s = .95 .84 .73 .53 .42 .39 pay for themselves, the next (.29) does not
    np.testing.assert_array_equal(verify(np.r_[1.0, 1.0, 1.0 + 0.1 * np.arange(1, 10)]), [3, 3])
    np.testing.assert_array_equal(verify([1.0] * 11, jnp.array([True, False])), [4, 0])  # finished rows: nothing


@pytest.mark.parametrize("seed", range(8))
def test_scheduler_is_causal(seed):
    """Whether slot j is verified never depends on the confidences of slots after j (spec §11): changing them
    leaves min(k, j + 1) unchanged."""
    rng = np.random.default_rng(100 + seed)
    slots = 7
    z = rng.normal(1.0, 2.0, size=(1, slots)).astype(np.float32)
    seconds = jnp.asarray(np.cumsum(rng.uniform(0.0, 0.2, size=slots + 2)) + 1.0, jnp.float32)  # batch 1
    args = (jnp.ones(slots), jnp.array([True]), seconds)
    k = int(scheduled_num_to_verify(jnp.asarray(z), *args)[0][0])
    for j in range(slots - 1):
        changed = z.copy()
        changed[0, j + 1 :] = rng.normal(1.0, 4.0, size=slots - j - 1)
        k2 = int(scheduled_num_to_verify(jnp.asarray(changed), *args)[0][0])
        assert min(k, j + 1) == min(k2, j + 1), (j, k, k2)


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
