"""The bench CLI on CPU (tiny random shape with the split, the embedded pair without) and the round pieces of
`decoding.pieces` against the loop. Speed is never asserted here, only that every number is there and sane.

The tiny-shape tests share prompts and lengths with the CLI run, so the compiled loops and pieces are reused.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dspark_jax as dj
from dspark_jax import bench, ops
from dspark_jax.decoding import loop, pieces
from dspark_jax.errors import UsageError

BATCH, NEW = 2, 8
TINY = ["--random-shape", "tiny", "--dtype", "float32", "--batch", str(BATCH), "--max-new-tokens", str(NEW)]
FAST = ["--repeats", "1", "--copy-mib", "8"]


@pytest.fixture(scope="module")
def tiny():
    """The CLI's tiny pair (float32) and its random prompts (seed 0, the default length)."""
    target, draft = bench.random_pair("tiny", "float32", 0)
    prompts = np.random.default_rng(0).integers(0, 256, (BATCH, bench.DEFAULT_PROMPT_LEN)).tolist()
    return target, draft, prompts


def _run(argv, tmp_path, capsys) -> dict:
    out = tmp_path / "bench.json"
    assert bench.main([*argv, "--out", str(out)]) == 0, capsys.readouterr().err
    assert str(out) in capsys.readouterr().out
    return json.loads(out.read_text())


def _check_generate(m: dict) -> None:
    assert m["tokens_per_s"] > 0 and m["median_s"] > 0 and m["new_tokens"] > 0
    assert 0 <= m["compile_s"] <= m["warmup_s"]
    assert m["tau"] >= 1.0 and m["max_rounds"] >= 1
    assert len(m["tokens_sha256"]) == 16


@pytest.mark.slow  # two loops and six pieces to compile
def test_bench_tiny_shape_writes_every_field(tmp_path, capsys):
    report = _run(TINY + FAST, tmp_path, capsys)
    assert report["schema"] == "dspark_jax.bench/2" and report["errors"] == [] and report["skipped"] == []
    assert report["machine"]["platform"] == "cpu" and report["config"]["verify_impl"] == ops.verify_impl()
    assert report["config"]["target"]["weight_bytes"] > 0 and report["config"]["draft"]["block_size"] == 7
    assert report["bandwidth"]["gb_per_s"] > 0
    stages = [s["stage"] for s in report["stages"]]
    assert stages == ["bandwidth", "random weights", "plain b2", "speculative b2", "split b2", "plain split b2"]
    (entry,) = report["results"]
    assert entry["batch"] == BATCH and entry["prompt_lens"] == [bench.DEFAULT_PROMPT_LEN]
    _check_generate(entry["plain"])
    _check_generate(entry["speculative"])
    assert entry["plain"]["tau"] == 1.0
    # Greedy speculative decoding is lossless: the same tokens as plain decoding.
    assert entry["plain"]["tokens_sha256"] == entry["speculative"]["tokens_sha256"]
    assert entry["speedup"] > 0
    split, plain_split = entry["split"], entry["plain_split"]
    # Prefill is taken out of both per-round figures, or (when load made the difference of timings non-positive)
    # out of neither.
    prefill = split["prefill_s"] if entry["prefill_excluded"] else 0.0
    spec = entry["speculative"]
    assert entry["round_s"] == pytest.approx((spec["median_s"] - prefill) / spec["max_rounds"])
    parts = ("draft_backbone_s", "sequential_head_s", "verify_s", "accept_commit_s")
    assert all(split[k] >= 0 for k in parts)  # differences of timings: 0 when noise hides a piece
    assert split["pieces_sum_s"] == pytest.approx(sum(split[k] for k in parts))
    assert split["round_s"] > 0 and split["prefill_s"] > 0 and "loop_overhead_s" in split
    assert plain_split["verify_s"] >= 0 and plain_split["step_s"] > 0 and "draft_backbone_s" not in plain_split
    assert entry["round_s"] == split["round_s"] and entry["plain_step_s"] == plain_split["step_s"]
    taus = {str(t) for t in bench.PAPER_TAUS}
    assert set(entry["projected_speedup"]) == taus and set(entry["projected_tokens_per_s"]) == taus
    assert entry["round_cost_in_plain_steps"] > 0
    roof = entry["roofline"]
    assert roof["weight_bytes"] == report["config"]["target"]["weight_bytes"] and roof["kv_bytes_per_step"] > 0
    assert roof["achieved_gb_per_s"] > 0 and roof["fraction_of_copy"] > 0 and roof["peak_gb_per_s"] is None


@pytest.mark.slow  # two loops to compile
def test_bench_embedded_pair_without_split(tmp_path, capsys):
    report = _run(["--batch", "1", "--max-new-tokens", "4", "--no-split", *FAST], tmp_path, capsys)
    assert report["errors"] == [] and report["config"]["dtype"] == "float32"
    assert [s["stage"] for s in report["stages"]] == ["bandwidth", "plain b1", "speculative b1"]
    (entry,) = report["results"]
    assert entry["plain"]["tokens_per_s"] > 0 and entry["speculative"]["tau"] >= 1.0
    assert entry["plain"]["tokens_sha256"] == entry["speculative"]["tokens_sha256"]
    assert "split" not in entry and entry["roofline"]["achieved_gb_per_s"] > 0 and not entry["prefill_excluded"]
    assert "1.0" in entry["projected_speedup"]


@pytest.mark.slow  # two loops to compile (plain and a tree)
def test_bench_tree_rounds(tmp_path, capsys):
    """--tree: the speculative entry carries the trees §9 metrics, greedy trees equal plain decoding, and the
    chain-only split is skipped with its reason."""
    report = _run([*TINY, *FAST, "--tree", "7,2,2"], tmp_path, capsys)
    assert report["errors"] == [] and report["config"]["tree"] == "7,2,2"
    assert [s["stage"] for s in report["skipped"]] == ["split"] and "chain" in report["skipped"][0]["reason"]
    (entry,) = report["results"]
    spec = entry["speculative"]
    _check_generate(spec)
    assert spec["tokens_sha256"] == entry["plain"]["tokens_sha256"]  # lossless at T = 0
    assert (spec["tree"], spec["tree_mode"]) == ("7,2,2", "auto")
    assert spec["nodes_verified_per_round"] == pytest.approx(spec["mean_proposal"])
    assert spec["tau_per_verified_node"] == pytest.approx(spec["tau"] / (spec["nodes_verified_per_round"] + 1))
    hist = np.array(spec["accepted_rank_histogram"])
    assert hist.shape == (7, 2) and hist.sum() == sum(i * n for i, n in enumerate(spec["acceptance_histogram"][1:]))
    assert 0 <= spec["share_rounds_off_rank0"] <= 1 and "split" not in entry


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--tree", "0,2"], ["tree nodes", "0"]),
        (["--tree", "7", "--tree-mode", "beam"], ["--tree-mode", "'beam'"]),
        (["--copy-mib", "0"], ["--copy-mib", "0"]),
        (["--time-budget", "-1"], ["--time-budget", "-1"]),
    ],
)
def test_bad_tree_is_one_line_exit_2(tmp_path, capsys, extra, words):
    assert bench.main([*TINY, *extra, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "x.json").exists()


def test_out_that_is_a_folder_is_refused_before_work(tmp_path, capsys):
    assert bench.main([*TINY, "--out", str(tmp_path)]) == 2  # was an IsADirectoryError when the JSON was written
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a folder" in err and len(err.strip().splitlines()) == 1, err


def test_bad_verify_impl_is_a_usage_error(tmp_path, monkeypatch, capsys):
    if "DSPARK_VERIFY_IMPL" not in os.environ:
        assert ops.VERIFY_IMPL == "reference"  # the decode loop's default until the kernel has passed on a device
    with pytest.raises(UsageError, match="impl must be one of reference, pallas, auto"):
        ops.verify_impl("triton")
    monkeypatch.setattr(ops, "VERIFY_IMPL", "bogus")
    assert bench.main([*TINY, "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: DSPARK_VERIFY_IMPL must be one of") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("speculative", [True, False], ids=["speculative", "plain"])
def test_pieces_reproduce_generate(tiny, speculative):
    """Rounds run piece by piece (sampled, T = 1) give exactly the loop's tokens; `repeat` changes nothing."""
    target, draft, prompts = tiny
    draft = draft if speculative else None
    want = dj.generate(target, draft, prompts, max_new_tokens=NEW, temperature=1.0, seed=3)
    prep = loop.prepare(target, draft, prompts, max_new_tokens=NEW, temperature=1.0, seed=3)
    state = prep.prefill(target, draft)
    for _ in range(NEW + 1):
        if bool(jnp.all(state.done)):
            break
        state = pieces.one_round(target, draft, state, prep.spec)
    tokens, lengths = np.asarray(state.tokens), np.asarray(state.lengths)
    got = [tokens[i, len(p) : min(lengths[i], len(p) + NEW)].tolist() for i, p in enumerate(prompts)]
    assert got == want.tokens
    if speculative:
        rounds = np.asarray(state.rounds)
        assert [np.asarray(state.acceptance)[i, : rounds[i]].tolist() for i in range(BATCH)] == want.acceptance_lengths

    state = prep.prefill(target, draft)
    proposal = draft_cache = None
    if speculative:
        hidden, draft_cache = pieces.draft_backbone(draft, state)
        assert _same(pieces.draft_backbone(draft, state, repeat=2), (hidden, draft_cache))
        proposal = pieces.draft_head(draft, state, hidden)
        assert _same(pieces.draft_head(draft, state, hidden, repeat=2), proposal)
    drafts = None if proposal is None else proposal.tokens
    logits, taps, target_cache = pieces.verify_pass(target, state, drafts, prep.spec)
    assert _same(pieces.verify_pass(target, state, drafts, prep.spec, repeat=2), (logits, taps, target_cache))
    args = (state, prep.spec, proposal, logits, taps, target_cache, draft_cache)
    assert _same(pieces.accept_commit(*args, repeat=2), pieces.accept_commit(*args))
    if speculative:
        # The verify pass equals the target's plain forward over prompt + anchor + drafts at the block's positions.
        anchors, pos = pieces.anchors_of(state)
        for i, p in enumerate(prompts):
            seq = [*p, int(anchors[i]), *np.asarray(drafts[i]).tolist()]
            full, _ = target.forward([seq])
            np.testing.assert_allclose(logits[i], full[0, int(pos[i]) :], rtol=2e-5, atol=2e-5)


def _same(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        bool(jnp.array_equal(x, y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def test_compile_time_script_at_tiny_shape(tmp_path, monkeypatch, capsys):
    """benchmarks/compile_time.py (the issue's compile-time measure at Qwen3-4B / V4 shapes, abstract parameters)
    still lowers and compiles prefill and loop with the package's current signatures: plain and a 4-width loop."""
    import runpy

    out = tmp_path / "compile.json"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "compile_time.py")
    argv = ["compile_time.py", "--shape", "tiny", "--dtype", "float32", "--policies", "plain", "threshold"]
    monkeypatch.setattr("sys.argv", [*argv, "--max-new-tokens", "16", "--out", str(out)])
    runpy.run_path(script, run_name="__main__")
    report = json.loads(out.read_text())
    assert [r["verify"] for r in report["runs"]] == ["plain", "threshold:0.5"]
    for run in report["runs"]:
        assert all(run[k] > 0 for k in ("prefill_lower_s", "prefill_compile_s", "loop_lower_s", "loop_compile_s"))
    plain, narrow = report["runs"]
    assert narrow["loop_hlo_chars"] > plain["loop_hlo_chars"]  # four target widths against one


def test_draft_weight_bytes_leave_out_the_targets_arrays(tiny):
    """The report's draft weight_bytes count what the draft holds of its own: its bound embedding and head (the tiny
    target is tied, so both are the target's embedding) are the target's buffers."""
    target, draft, _ = tiny
    theirs, own = target.decode_parts()[1], draft.decode_parts()[1]
    table = target.config.vocab_size * target.config.hidden_size * 4  # f32
    assert bench._state_bytes(own) - bench._state_bytes(own, shared=theirs) == 2 * table
