"""The paper's evaluation protocol in python -m dspark_jax.evaluate (spec §8): prompt sets by name (shared JSONL
folder, local files, hub datasets through a mocked huggingface_hub), selection, the results files and plots, and
one-line errors for bad input."""

import csv
import json
import pathlib
import random

import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax import eval_data
from dspark_jax.errors import UsageError
from dspark_jax.evaluate import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
EVAL_DATASETS = ROOT.parent / "shared" / "eval_datasets"
needs_shared = pytest.mark.skipif(
    not (EVAL_DATASETS / "gsm8k.jsonl").is_file(),
    reason=f"the shared prompt sets are not at {EVAL_DATASETS} (../shared/eval_datasets beside the repository)",
)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _main(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line_error(code, out, err, *words):
    assert code == 2 and out == "", (code, out)
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


# ------------------------------------------------------------------------------------------------ real decoding


@needs_shared
@pytest.mark.slow
def test_three_shared_sets_write_json_csv_and_plots(tmp_path, capsys):
    """The embedded pair over three of the paper's sets: one row per set, the macro average, the CSV mirroring the
    JSON, and the PNGs (the DSpark draft has a confidence head, so the reliability diagram too)."""
    out = tmp_path / "results"
    code, stdout, err = _main(
        capsys,
        "--data-dir", str(EVAL_DATASETS),
        "--benchmarks", "gsm8k,math500,mbpp",
        "--num-prompts", "2",
        "--max-new-tokens", "8",
        "--batch-size", "2",
        "--out", str(out),
        "--json",
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert json.loads(stdout)["rows"] == results["rows"]
    rows = results["rows"]
    assert [(r["benchmark"], r["draft"], r["verify"]) for r in rows] == [
        ("gsm8k", "dspark", "full"),
        ("math500", "dspark", "full"),
        ("mbpp", "dspark", "full"),
    ]
    for r in rows:
        assert r["num_prompts"] == 2 and r["skipped_prompts"] == 0 and r["rounds"] > 0
        assert 1.0 <= r["tau"] <= 8.0 and len(r["conditional_acceptance"]) == len(r["prefix_survival"]) == 7
        assert r["tokens_per_s"] > 0 and r["timed_warm"] and r["speedup"] is None
        assert 2 <= r["new_tokens"] <= 16 and 0.0 <= r["ece"] <= 1.0
    # Table 1's macro average: the plain mean over benchmarks.
    (macro,) = results["macro_average"]
    assert macro["tau"] == pytest.approx(np.mean([r["tau"] for r in rows]))
    np.testing.assert_allclose(macro["prefix_survival"], np.mean([r["prefix_survival"] for r in rows], axis=0))
    assert results["config"]["temperature"] == 1.0 and results["config"]["seed"] == 980406  # the protocol's
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["benchmark"] for t in table] == ["gsm8k", "math500", "mbpp", "macro-average"]
    for t, r in zip(table, rows + [macro]):
        assert float(t["tau"]) == pytest.approx(r["tau"], rel=1e-5)
        assert float(t["survival@1"]) == pytest.approx(r["prefix_survival"][1], rel=1e-5, abs=1e-9)
        assert float(t["accept@0"]) == pytest.approx(r["conditional_acceptance"][0], rel=1e-5, abs=1e-9)
    assert results["calibration"]["dspark"]["rounds"] == sum(r["rounds"] for r in rows)
    for name in ("conditional_acceptance.png", "prefix_survival.png", "reliability.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert not (out / "tokens_per_s.png").exists()  # one verify policy: nothing to compare


# ------------------------------------------------------------------------------------------------ plumbing


class FakeGenerate:
    """Stands in for dj.generate: deterministic rounds per prompt, a confidence logit per slot; records calls."""

    def __init__(self):
        self.calls = []

    def __call__(self, target, draft, prompts, max_new_tokens=8, seed=0, verify="full", **kw):
        name = None if draft is None else pathlib.Path(draft.path).name
        self.calls.append((name, verify, len(prompts), max(map(len, prompts)), seed))
        rng = np.random.default_rng([seed, len(prompts), 0 if draft is None else 1])
        acc, prop, conf, tokens = [], [], [], []
        for _ in prompts:
            if draft is None:  # plain decoding: no rounds
                acc.append([])
                prop.append([])
                conf.append([])
                tokens.append([5] * max_new_tokens)
                continue
            a = rng.integers(1, 9, size=3).tolist()
            acc.append(a)
            prop.append([7] * 3)
            conf.append(rng.normal(size=(3, 7)).tolist())
            tokens.append([5] * sum(a))
        seconds = 0.5 if draft is None else 0.25
        tau = float(np.mean([x for row in acc for x in row])) if draft is not None else 0.0
        return dj.GenerateResult(tokens, acc, prop, tau, seconds, conf)


@pytest.fixture
def sets(tmp_path):
    """Two local sets with prompts of distinct lengths."""
    folder = tmp_path / "sets"
    folder.mkdir()
    for name, texts in (("alpha", ["a b", "c d e f g h", "i"]), ("beta", ["def f():", "x = 1"])):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"turns": [t, "2nd"]}) + "\n" for t in texts))
    return folder


def test_drafts_side_by_side_with_compare(sets, tmp_path, capsys, monkeypatch):
    """--drafts dspark,dflash --compare: every draft on the same prompts, plain decoding once per set, the speedup;
    calibration only for the draft with a confidence head; one untimed warm-up call per new compiled shape."""
    fake = FakeGenerate()
    monkeypatch.setattr(dj, "generate", fake, raising=False)
    out = tmp_path / "out"
    code, stdout, err = _main(
        capsys, "--drafts", "dspark,dflash", "--data-dir", str(sets), "--benchmarks", "alpha,beta",
        "--compare", "--num-prompts", "2", "--max-new-tokens", "4", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    rows = results["rows"]
    assert [(r["draft"], r["benchmark"]) for r in rows] == [
        ("dspark", "alpha"),
        ("dspark", "beta"),
        ("dflash", "alpha"),
        ("dflash", "beta"),
    ]
    for r in rows:
        assert r["num_prompts"] == 2 and r["plain_tokens_per_s"] == pytest.approx(4 / 0.5)
        assert r["speedup"] == pytest.approx(r["tokens_per_s"] / r["plain_tokens_per_s"])
    assert [m["draft"] for m in results["macro_average"]] == ["dspark", "dflash"]
    assert [r["ece"] is None for r in rows] == [False, False, True, True]
    assert list(results["calibration"]) == ["dspark"]
    # Batches of one with seed = eval seed + prompt index; the first batch of each compiled shape (model, policy,
    # batch size, power-of-two prompt length) runs twice, untimed then timed; a known shape runs once.
    assert {c[4] for c in fake.calls} == {980406, 980406 + 1}
    seen, i, timed = set(), 0, 0
    while i < len(fake.calls):
        call = fake.calls[i]
        key = (*call[:3], 1 << (call[3] - 1).bit_length())
        if key not in seen:
            seen.add(key)
            assert fake.calls[i + 1] == call, fake.calls
            i += 1
        i, timed = i + 1, timed + 1
    assert timed == 3 * 2 * 2  # (plain + 2 drafts) x 2 sets x 2 prompts
    assert [c[0] for c in fake.calls[:2]] == [None, None]  # plain decoding first, once per set
    assert "macro-average" in stdout and "dflash" in stdout
    for name in ("conditional_acceptance.png", "prefix_survival.png", "reliability.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC


def test_several_verify_policies_plot_tokens_per_s(sets, tmp_path, capsys, monkeypatch):
    fake = FakeGenerate()
    monkeypatch.setattr(dj, "generate", fake, raising=False)
    out = tmp_path / "out"
    code, _, err = _main(
        capsys, "--benchmarks", f"{sets / 'alpha.jsonl'},{sets / 'beta.jsonl'}", "--verify", "full,threshold:0.5",
        "--batch-size", "8", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert [(r["benchmark"], r["verify"]) for r in results["rows"]] == [
        ("alpha", "full"),
        ("beta", "full"),
        ("alpha", "threshold:0.5"),
        ("beta", "threshold:0.5"),
    ]
    assert [r["num_prompts"] for r in results["rows"]] == [3, 2, 3, 2]  # small sets: every row, batch of all
    assert {c[2] for c in fake.calls} == {3, 2}
    assert (out / "tokens_per_s.png").read_bytes()[:8] == PNG_MAGIC
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4 + 2  # rows + one macro average per policy


def test_policy_needing_confidence_head_refused_before_decoding(sets, capsys, monkeypatch):
    fake = FakeGenerate()
    monkeypatch.setattr(dj, "generate", fake, raising=False)
    args = ["--drafts", "dspark,dflash", "--data-dir", str(sets), "--benchmarks", "alpha", "--verify", "threshold:0.5"]
    _one_line_error(*_main(capsys, *args), "threshold:0.5", "dflash", "confidence head")
    assert fake.calls == []


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--benchmarks", "gsm8k,nosuchset"], ["'nosuchset'", "gsm8k", "--data-dir"]),
        (["--benchmarks", "missing.jsonl"], ["missing.jsonl", "does not exist"]),
        (["--benchmarks", "gsm8k,gsm8k"], ["twice"]),
        (["--data-dir", "/nonexistent/eval_sets", "--benchmarks", "gsm8k"], ["--data-dir", "does not exist"]),
        (["--verify", "sometimes"], ["sometimes"]),
        (["--num-prompts", "0"], ["--num-prompts", "0"]),
        (["--out", "results.json"], ["--out", "folder"]),
        (["--data", "x.jsonl", "--data-dir", "."], ["--data"]),
        (["--tree", "0"], ["tree nodes", "positive", "0"]),
        (["--tree", "a,b"], ["N[,K[,W]]", "'a,b'"]),
        (["--tree", "7,2,3"], ["tree beam", "branch factor 2", "3"]),
        (["--tree", "15", "--tree-mode", "beam"], ["--tree-mode", "swor", "'beam'"]),
        (["--tree", "15", "--save-calibration"], ["--save-calibration", "--tree 15"]),
        (["--data", "x.jsonl", "--save-calibration"], ["--save-calibration", "ships with the package"]),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, argv, words):
    _one_line_error(*_main(capsys, *argv), *words)


def test_data_dir_problems(tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _one_line_error(*_main(capsys, "--data-dir", str(a_file)), "is a file")
    folder = tmp_path / "sets"
    folder.mkdir()
    (folder / "good.jsonl").write_text('{"turns": ["hi"]}\n')
    _one_line_error(*_main(capsys, "--data-dir", str(folder), "--benchmarks", "gsm8k"), "no gsm8k.jsonl", "good")
    (folder / "bad.jsonl").write_text('{"turns": ["hi"]}\n{"prompt": "no turns"}\n')
    _one_line_error(*_main(capsys, "--data-dir", str(folder), "--benchmarks", "bad"), "bad.jsonl line 2", "turns")


def test_data_rows_are_checked_like_generate_prompts_files(tmp_path):
    """--data: every row is ids or turns, or a one-line error naming the line (a bad row was a traceback, a row
    without either key was dropped unseen); rows too short for a window are counted in a warning."""
    from dspark_jax.evaluate import load_prompts

    cases = [
        ('{"ids": [1, 2, 3, 4, 5]}\n{not json\n', "line 2 is not JSON"),
        ('{"turns": [5]}\n', "line 1 needs"),
        ('{"ids": "xxxx"}\n', "list of token ids"),
        ('{"ids": [1, 2, 3, 4, 5]}\n{"prompt": "x"}\n', "line 2 needs"),
    ]
    for text, words in cases:
        path = tmp_path / "d.jsonl"
        path.write_text(text)
        with pytest.raises(dj.UsageError, match=words):
            load_prompts(str(path), 8, 2, 0)
    path.write_text('{"ids": [1, 2, 3, 4, 5]}\n{"prompt_ids": [7, 8]}\n')
    with pytest.warns(UserWarning, match="skipped 1 token row"):
        assert len(load_prompts(str(path), 8, 2, 0)) == 1


def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--benchmarks" in text and "--drafts dspark,dflash" in text


# ------------------------------------------------------------------------------------------------ prompt sets


def test_selection_follows_the_reference():
    rows = list(range(20))
    assert eval_data.select(rows, 20, 1) == rows  # fits: file order
    expected = list(rows)
    random.Random(7).shuffle(expected)
    assert eval_data.select(rows, 5, 7) == expected[:5]


@needs_shared
def test_paper_caps_on_the_shared_sets():
    """Without --num-prompts each set takes its paper size (spec §8): MBPP 256 of its 257 rows, AIME25 all 30."""
    sets = eval_data.load_sets(["mbpp", "aime25", "gsm8k"], str(EVAL_DATASETS), None, eval_data.EVAL_SEED)
    assert [(s.name, s.total_rows, len(s.prompts)) for s in sets] == [
        ("mbpp", 257, 256),
        ("aime25", 30, 30),
        ("gsm8k", 1319, 500),
    ]
    assert all(p.endswith(eval_data.MATH_SUFFIX) for p in sets[2].prompts)  # the hub conversion's suffix


def _fake_snapshot(files: dict, calls: list):
    """A snapshot_download stand-in that lays out `files` (relative path -> rows) like a hub snapshot folder."""

    def snapshot_download(repo_id, repo_type=None, allow_patterns=None, cache_dir=None, **kw):
        calls.append((repo_id, repo_type, tuple(allow_patterns)))
        folder = pathlib.Path(cache_dir) / "snapshots" / "0123abcd"
        for rel, rows in files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(folder)

    return snapshot_download


@pytest.mark.parametrize(
    "name, files, first",
    [
        ("math500", {"test.jsonl": [{"problem": "1+1?"}, {"problem": "2+2?"}]}, ["1+1?" + eval_data.MATH_SUFFIX]),
        (
            "mt-bench",
            {"raw/question.jsonl": [{"question_id": 81, "turns": ["Write.", "Rewrite."]}]},
            ["Write.", "Rewrite."],
        ),
        (
            "arena-hard-v2",
            {"data/arena-hard-v2.0/question.jsonl": [{"uid": "x", "prompt": "Zig?"}], "data/other.jsonl": []},
            ["Zig?"],
        ),
        (
            "livecodebench",
            {"test.jsonl": [{"question_content": "Q", "starter_code": ""}], "test2.jsonl": [{"question_content": "R"}]},
            [
                eval_data.LCB_INSTRUCTION + "\n\n### Question:\nQ\n\n### Format: Write your code in the following "
                "format:\n```python\n# YOUR CODE HERE\n```\n\n### Answer: (use the provided format with backticks)"
            ],
        ),
    ],
)
def test_hub_sets_convert_once_then_read_the_cache(tmp_path, monkeypatch, name, files, first):
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", _fake_snapshot(files, calls))
    out_dir = tmp_path / "converted"
    path = eval_data.hub_jsonl(name, cache_dir=str(tmp_path / "hub"), out_dir=str(out_dir))
    rows = eval_data.read_turns_jsonl(path)
    assert rows[0] == first and len(rows) == sum(len(r) for r in files.values())
    assert calls == [(eval_data.HUB_SETS[name].repo, "dataset", eval_data.HUB_SETS[name].files)]
    source = json.loads((out_dir / f"{name}.source.json").read_text())
    assert source["repo"] == eval_data.HUB_SETS[name].repo and source["revision"] == "0123abcd"
    assert "data/other.jsonl" not in source["files"]
    assert eval_data.hub_jsonl(name, cache_dir=str(tmp_path / "hub"), out_dir=str(out_dir)) == path
    assert len(calls) == 1  # the converted file is reused without asking the hub


def test_hub_parquet_sets_need_pyarrow_or_read_it(tmp_path, monkeypatch):
    """gsm8k is parquet on the hub: with pyarrow it converts; without, a one-line error names pyarrow and
    --data-dir."""
    import huggingface_hub

    folder = tmp_path / "hub" / "snapshots" / "feed"
    (folder / "main").mkdir(parents=True)
    parquet = folder / "main" / "test-00000-of-00001.parquet"
    try:
        import pyarrow
        import pyarrow.parquet as pq

        pq.write_table(pyarrow.table({"question": ["How many?"], "answer": ["4"]}), parquet)
        has_pyarrow = True
    except ImportError:
        parquet.write_bytes(b"PAR1")
        has_pyarrow = False
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(folder))
    if has_pyarrow:
        path = eval_data.hub_jsonl("gsm8k", out_dir=str(tmp_path / "converted"))
        assert eval_data.read_turns_jsonl(path) == [["How many?" + eval_data.MATH_SUFFIX]]
    else:
        with pytest.raises(UsageError, match="pyarrow.*--data-dir"):
            eval_data.hub_jsonl("gsm8k", out_dir=str(tmp_path / "converted"))


def test_offline_without_cache_says_use_data_dir(tmp_path, capsys, monkeypatch):
    """HF_HUB_OFFLINE=1 (conftest) and an empty cache: the CLI fails in one line pointing at --data-dir."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(eval_data, "converted_dir", lambda: str(tmp_path / "converted"))
    _one_line_error(*_main(capsys, "--benchmarks", "gsm8k"), "'gsm8k'", "openai/gsm8k", "--data-dir")
