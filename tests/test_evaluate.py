"""python -m dspark_jax.evaluate: offline metrics (spec §7.1), calibration metrics (§7.3) and fitting (§10)."""

import csv
import json
import shutil

import numpy as np
import pytest
from conftest import GOLDENS, golden_folder

import dspark_jax as dj
from dspark_jax.evaluate import main

PAIR = GOLDENS / "markov"
TARGET = golden_folder("markov", "target")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    shutil.copytree(PAIR / "draft_distilled", root / "draft")
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(6):
            f.write(json.dumps({"ids": rng.integers(2, 500, size=40).tolist()}) + "\n")
    return root


def _run(setup, capsys, *extra, data=None):
    data = data or setup / "data.jsonl"
    args = ["--target", str(TARGET), "--draft", str(setup / "draft"), "--data", str(data)]
    code = main(args + ["--num-prompts", "6", "--prompt-len", "24", "--max-new-tokens", "48", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_metrics_then_calibration_fit_round_trip(setup, capsys):
    code, out, _ = _run(setup, capsys)
    assert code == 0
    first = json.loads(out)
    m = first["metrics"]
    assert m["rounds"] > 0 and 1.0 <= m["tau"] <= 8.0 and len(m["conditional_acceptance"]) == 7
    raw = m["calibration_raw"]
    assert len(raw["per_slot"]) == 7 and 0.0 <= raw["summary"]["ece"] <= 1.0
    assert raw["per_slot"][0]["count"] == m["rounds"]  # full blocks: every round offers slot 0
    assert "calibration" not in m  # no calibration.json yet

    code, out, _ = _run(setup, capsys, "--save-calibration")
    assert code == 0
    saved = json.loads(out)
    stored = json.loads((setup / "draft" / "calibration.json").read_text())
    assert saved["calibration_file"].endswith("calibration.json") and len(stored["temperatures"]) == 7
    assert stored["ece_fitted"] <= stored["ece_raw"] + 1e-12  # fitted on these very rounds
    assert saved["metrics"]["calibration"]["summary"]["ece"] == pytest.approx(stored["ece_fitted"])

    target = dj.load_target(str(TARGET), dtype="float32")
    draft = dj.load_draft(str(setup / "draft"), target=target)
    np.testing.assert_allclose(draft.calibration, stored["temperatures"], rtol=1e-6)
    code, out, _ = _run(setup, capsys)  # a later evaluation reports the calibrated metrics beside the raw ones
    assert json.loads(out)["metrics"]["calibration"]["temperatures"] == pytest.approx(stored["temperatures"])


def test_save_calibration_needs_full_blocks(setup, capsys):
    code, out, err = _run(setup, capsys, "--save-calibration", "--verify", "threshold:0.5")
    assert code == 2 and out == "" and err.startswith("error:") and "full" in err and "\n" not in err.strip()


# ------------------------------------------------------------------------------------------------ trees (trees §3, §9)

# The same prompts and lengths as _run: the chain loop compiled above is reused (a tree loop compiles in ~20 s).


@pytest.mark.slow  # a tree loop compiles (~20 s of CPU)
def test_tree_rows_carry_the_tree_metrics(setup, capsys, tmp_path):
    code, out, err = _run(setup, capsys, "--tree", "7,2,2", "--temperature", "1", "--out", str(tmp_path))
    assert code == 0, err
    out = json.loads(out)
    (row,) = out["rows"]
    assert (row["tree"], row["tree_mode"]) == ("7,2,2", "auto")
    assert row["nodes_verified_per_round"] == pytest.approx(row["mean_proposal_length"])
    assert 1 <= row["nodes_verified_per_round"] <= 7 and row["rounds"] > 0
    assert row["tau_per_verified_node"] == pytest.approx(row["verify_rate"])
    assert row["tau_per_verified_node"] == pytest.approx(row["tau"] / (row["nodes_verified_per_round"] + 1))
    hist = np.array(row["accepted_rank_histogram"])
    assert hist.shape == (7, 2) and (hist >= 0).all()
    # Every accepted node is in the histogram once: tau - 1 accepted drafts per round (the pair has no stop token).
    assert hist.sum() == pytest.approx((row["tau"] - 1) * row["rounds"])
    assert 0 <= row["share_rounds_off_rank0"] <= 1 and len(row["per_depth_acceptance"]) == 7
    assert "calibration_raw" not in row and row["ece"] is None  # chain measurements, not tree ones
    assert out["macro_average"][0]["nodes_verified_per_round"] == pytest.approx(row["nodes_verified_per_round"])
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert {"tree", "nodes_verified_per_round", "tau_per_verified_node"} <= set(table[0])
    assert table[0]["timed_warm"] == str(row["timed_warm"])  # tokens/s of a compiling run says so in the CSV too


@pytest.mark.slow  # the 63-node probe tree compiles its own loop
def test_rank_factors_measured_saved_and_loaded(setup, capsys, tmp_path):
    """--save-calibration at T > 0 measures c_{d,r} on the full tree and stores them beside the temperatures;
    load_draft reads them and generate()'s tree check hands them to the builder instead of the 0.5^r fallback."""
    from dspark_jax.decoding.calibration import factors_for
    from dspark_jax.decoding.loop import _check_tree
    from dspark_jax.decoding.tree import TreeConfig
    from dspark_jax.metrics import rank_factors

    folder = tmp_path / "draft"
    shutil.copytree(setup / "draft", folder)
    code, out, err = _run(tmp_path, capsys, "--temperature", "1", "--save-calibration", data=setup / "data.jsonl")
    assert code == 0, err
    measured = json.loads(out)["rank_factors"]
    stored = json.loads((folder / "calibration.json").read_text())
    assert measured["tree"] == "63,4,4" and measured["rounds"] > 0
    factors = np.array(stored["rank_factors"])
    assert factors.shape == (7, 4) and np.all(factors[:, 0] == 1) and np.all((factors > 0) & (factors <= 1))
    assert np.all(np.diff(factors, axis=1) <= 0)  # non-increasing in rank
    np.testing.assert_allclose(factors, rank_factors(measured["accepted_rank_histogram"]))
    assert stored["rank_factors_measured"]["accepted_rank_histogram"] == measured["accepted_rank_histogram"]

    target = dj.load_target(str(TARGET), dtype="float32")
    draft = dj.load_draft(str(folder), target=target)
    np.testing.assert_allclose(draft.rank_factors, factors, rtol=1e-6)
    policy = dj.VerifyPolicy.parse("full")
    tree = _check_tree(TreeConfig(15, 6, 2), draft, policy, target.config)
    np.testing.assert_allclose(np.array(tree.rank_factors)[:, :4], factors, rtol=1e-6)
    np.testing.assert_allclose(np.array(tree.rank_factors)[:, 4:], factors[:, 3:] * [0.5, 0.25], rtol=1e-6)
    assert factors_for(factors, 7, 2) == tuple(tuple(float(c) for c in row[:2]) for row in factors)
    given = TreeConfig(15, 4, 4, rank_factors=((1.0,) * 4,) * 7)
    assert _check_tree(given, draft, policy, target.config).rank_factors == given.rank_factors  # given ones win

    code, _, err = _run(tmp_path, capsys, "--save-calibration", data=setup / "data.jsonl")  # T = 0: none measured
    assert code == 0, err
    refitted = json.loads((folder / "calibration.json").read_text())
    assert refitted["rank_factors"] == stored["rank_factors"]  # kept
    assert refitted["rank_factors_measured"] == stored["rank_factors_measured"]


def test_rank_factors_are_smoothed_and_monotone():
    from dspark_jax.metrics import rank_factors, tree_metrics

    hist = np.array([[100, 50, 60, 0], [0, 0, 0, 0]])
    c = rank_factors(hist)
    assert c[0].tolist() == pytest.approx([1.0, 50.5 / 101, 50.5 / 101, 0.125 / 101])  # 60 > 50 is cut to 50
    assert c[1].tolist() == pytest.approx([1.0, 0.5, 0.25, 0.125])  # no rounds: the fallback
    ranks = [[[0, 1], [], [0, 0, 0]], [[1]]]
    m = tree_metrics([[3, 1, 4], [2]], [[7, 7, 7], [5]], ranks, block_size=3, branch=2)
    assert m["accepted_rank_histogram"] == [[2, 1], [1, 1], [1, 0]]
    assert m["nodes_verified_per_round"] == 26 / 4 and m["tau_per_verified_node"] == 10 / 30
    assert m["share_rounds_off_rank0"] == 0.5 and m["per_depth_acceptance"] == [0.75, 2 / 3, 0.5]


def test_bad_rank_factors_file_is_one_line_error(tmp_path):
    from dspark_jax.decoding.calibration import load_rank_factors
    from dspark_jax.errors import UsageError

    assert load_rank_factors(str(tmp_path), 7) is None
    (tmp_path / "calibration.json").write_text(json.dumps({"temperatures": [1.0] * 7}))
    assert load_rank_factors(str(tmp_path), 7) is None
    (tmp_path / "calibration.json").write_text(json.dumps({"rank_factors": [[1.0, 0.5]] * 6}))
    with pytest.raises(UsageError, match=r"shape \[6, 2\]; expected \[7\]\[K\]"):
        load_rank_factors(str(tmp_path), 7)


def test_v4_folder_without_draft_is_its_own_draft(tmp_path):
    """What has_own_draft reads of a V4 -DSpark folder (V4 §4.1): the model type and the draft's tap layers."""
    from dspark_jax.errors import UsageError
    from dspark_jax.evaluate import EvalArgs, _draft_paths

    for name, config in (("v4", {"dspark_target_layer_ids": [3, 4, 5]}), ("plain", {})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "deepseek_v4", **config}))
    assert _draft_paths(EvalArgs(target=str(tmp_path / "v4"))) == [("v4", str(tmp_path / "v4"))]
    with pytest.raises(UsageError, match="--target without --draft"):
        _draft_paths(EvalArgs(target=str(tmp_path / "plain")))
