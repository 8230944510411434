"""`python -m dspark_jax.generate` with a draft: the --json contract (interfaces.md §4) and bad input (exit 2)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import GOLDENS, golden_arrays, golden_folder, tiny_qwen3_hf

from dspark_jax.generate import main

RNN = GOLDENS / "rnn"
TARGET = golden_folder("rnn", "target")  # the three variants share one target
MARKOV_DRAFT = str(GOLDENS / "markov" / "draft")
JSON_KEYS = {"prompts", "tau", "new_tokens", "seconds", "tokens_per_s", "plain_tokens_per_s", "speedup", "config"}
PROMPT_KEYS = {"prompt_ids", "tokens", "text", "acceptance_lengths", "proposal_lengths"}


@pytest.fixture(scope="module")
def goldens():
    return golden_arrays("rnn")


@pytest.fixture(scope="module")
def prompt_ids(goldens):
    return ",".join(map(str, goldens["prompt_ids"].tolist()))


def assert_usage_error(capsys, argv, *needles):
    capsys.readouterr()  # drop what fixtures printed (transformers' progress bars)
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_happy_path_compare_json(capsys, goldens, prompt_ids):
    # The rnn goldens' distilled pair with the goldens' prompt and length: the loop compiled for test_loop.py is
    # reused, and the output must be the golden loop.
    argv = [
        "--target",
        str(TARGET),
        "--draft",
        str(RNN / "draft_distilled"),
        "--prompt-ids",
        prompt_ids,
        "--max-new-tokens",
        "48",
        "--compare",
        "--json",
    ]
    assert main(argv) == 0
    out, _ = capsys.readouterr()
    result = json.loads(out)  # exactly one JSON object on stdout
    assert set(result) == JSON_KEYS
    (row,) = result["prompts"]
    assert set(row) == PROMPT_KEYS
    assert row["prompt_ids"] == goldens["prompt_ids"].tolist()
    assert row["tokens"] == goldens["dist_e2e_new_ids"].tolist()
    assert row["acceptance_lengths"] == goldens["dist_e2e_acceptance_lengths"].tolist()
    assert row["proposal_lengths"] == goldens["dist_e2e_proposal_lengths"].tolist()
    assert row["text"] is None  # the goldens' target has no tokenizer
    assert result["tau"] == pytest.approx(np.mean(goldens["dist_e2e_acceptance_lengths"]))
    assert result["new_tokens"] == 48
    assert result["seconds"] > 0 and result["tokens_per_s"] > 0 and result["plain_tokens_per_s"] > 0
    assert result["speedup"] == pytest.approx(result["tokens_per_s"] / result["plain_tokens_per_s"])
    assert result["config"]["draft"] == str(RNN / "draft_distilled") and result["config"]["verify"] == "full"
    json.dumps(result["config"])


@pytest.mark.parametrize(
    "verify, needle", [("threshold:2", "threshold"), ("bogus", "bogus"), ("threshold:x", "threshold")]
)
def test_bad_verify_flag(capsys, verify, needle):
    assert_usage_error(
        capsys,
        ["--target", str(TARGET), "--draft", str(RNN / "draft"), "--prompt-ids", "1,2", "--verify", verify],
        needle,
    )


def test_unknown_draft_path(capsys, tmp_path):
    missing = str(tmp_path / "no_such_draft")
    assert_usage_error(capsys, ["--target", str(TARGET), "--draft", missing, "--prompt-ids", "1,2"], "no_such_draft")


def test_draft_for_another_target(capsys, tmp_path):
    folder, _ = tiny_qwen3_hf(tmp_path, vocab=128, hidden=32, heads=4, kv_heads=2, head_dim=8, ffw=64)
    assert_usage_error(
        capsys, ["--target", str(folder), "--draft", MARKOV_DRAFT, "--prompt-ids", "1,2"], "another target"
    )


def test_scheduler_keeps_the_golden_output(capsys, goldens, prompt_ids):
    """--verify scheduler (spec §11, cost table measured here) cuts blocks by confidence; greedy output stays the
    target's own."""
    argv = ["--target", str(TARGET), "--draft", str(RNN / "draft_distilled"), "--prompt-ids", prompt_ids]
    assert main(argv + ["--max-new-tokens", "48", "--verify", "scheduler", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (row,) = result["prompts"]
    assert row["tokens"] == goldens["dist_e2e_new_ids"].tolist()
    assert all(0 <= k <= 7 for k in row["proposal_lengths"]) and result["config"]["verify"] == "scheduler"


@pytest.mark.parametrize("verify", ["threshold:0.5", "scheduler"])
def test_confidence_policies_need_a_confidence_head(capsys, verify):
    # dflash drafts have no confidence head (spec §4.9): such policies are refused before anything is generated.
    assert_usage_error(
        capsys,
        [
            "--target",
            str(golden_folder("dflash", "target")),
            "--draft",
            str(GOLDENS / "dflash" / "draft"),
            "--prompt-ids",
            "1,2",
            "--verify",
            verify,
        ],
        "confidence head",
    )


def test_bad_input_in_a_real_process():
    """The same contract end to end in a fresh interpreter: exit 2, one stderr line, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dspark_jax.generate",
            "--target",
            str(TARGET),
            "--draft",
            MARKOV_DRAFT + "_missing",
            "--prompt-ids",
            "1,2",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
