"""python -m dspark_jax.regenerate: target-written responses for draft training (spec §9.1.2)."""

import json

import numpy as np
import pytest
from conftest import tiny_qwen3_hf

import dspark_jax as dj
from dspark_jax.regenerate import main, sample_prompts
from dspark_jax.training import data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("regen")
    folder, _ = tiny_qwen3_hf(root, vocab=64, hidden=32, layers=2, ffw=64)
    rng = np.random.default_rng(0)
    with open(root / "train.jsonl", "w") as f:
        for n in (40, 8, 90):  # the 8-token row is too short for a 12-token prompt and is never drawn
            f.write(json.dumps({"path": f"f{n}.py", "ids": rng.integers(2, 64, size=n).tolist()}) + "\n")
    return root, folder


def _args(root, folder, out, *extra):
    return ["--target", str(folder), "--data", str(root / "train.jsonl"), "--out", str(out), "--prompt-len", "12",
            "--max-new-tokens", "9", "--num-prompts", "5", "--batch-size", "4", *extra]  # fmt: skip


def test_rows_are_prompt_windows_plus_the_targets_own_continuation(setup):
    root, folder = setup
    out = root / "gen.jsonl"
    assert main(_args(root, folder, out, "--temperature", "0")) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    source = [json.loads(line)["ids"] for line in (root / "train.jsonl").read_text().splitlines()]
    target = dj.load_target(str(folder), dtype="float32")
    for row in rows:
        ids, mask = row["input_ids"], row["loss_mask"]
        prompt = ids[:12]
        assert mask == [0] * 12 + [1] * (len(ids) - 12) and len(ids) == 21
        assert any(prompt == s[i : i + 12] for s in source for i in range(len(s) - 11))
        # greedy: the response is exactly what plain decoding of the target writes
        assert ids[12:] == dj.generate(target, None, prompts=[prompt], max_new_tokens=9).tokens[0]
    # the training CLI reads the file with its masks: only responses are supervised
    corpus = data.load_corpus(str(out), 32)
    assert corpus.loss_mask.sum() == 5 * 9 and not corpus.loss_mask[:, :12].any()


def test_sampled_rows_are_reproducible_and_differ_by_seed(setup):
    root, folder = setup
    a, b, c = root / "a.jsonl", root / "b.jsonl", root / "c.jsonl"
    for out, seed in ((a, "0"), (b, "0"), (c, "1")):
        assert main(_args(root, folder, out, "--seed", seed)) == 0
    assert a.read_text() == b.read_text() != c.read_text()


def test_sample_prompts_never_draws_short_rows():
    rows = [[1] * 5, list(range(100))]
    prompts = sample_prompts(rows, 50, 10, seed=3)
    assert all(p == list(range(p[0], p[0] + 10)) for p in prompts)


@pytest.mark.parametrize(
    "extra, needle",
    [
        (("--num-prompts", "0"), "--num-prompts"),
        (("--prompt-len", "500"), "--prompt-len 500"),
        (("OUT", "no_such_folder/bad.jsonl"), "does not exist"),  # found only when writing, after the work
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(setup, capsys, extra, needle):
    root, folder = setup
    out = root / "bad.jsonl"
    if extra[0] == "OUT":
        out, extra = root / extra[1], ()
    assert main(_args(root, folder, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and needle in err and "\n" not in err
    assert not out.exists() and not list(root.glob("bad.jsonl.partial*"))
