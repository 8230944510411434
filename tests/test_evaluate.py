"""python -m dspark_jax.evaluate: offline metrics (spec §7.1), calibration metrics (§7.3) and fitting (§10)."""

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


def _run(setup, capsys, *extra):
    args = ["--target", str(TARGET), "--draft", str(setup / "draft"), "--data", str(setup / "data.jsonl")]
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
