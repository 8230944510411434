"""Plain decoding (no draft) through `python -m dspark_jax.generate` and `dj.generate`: greedy output equals
transformers token for token, the --json report, and bad input as one `error:` line with exit 2 (API: UsageError)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_qwen3 import NEW_TOKENS, build_pair, hf_greedy  # noqa: E402

import dspark_jax as dj  # noqa: E402
import dspark_jax.generate as cli  # noqa: E402
from dspark_jax.errors import DSparkError, UsageError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT = [3, 17, 101, 5, 64, 9]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("cli"), "gqa2_tied")


def _run(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_no_draft_json_matches_transformers(pair, capsys):
    code, out, err = _run(
        [
            "--target",
            pair.folder,
            "--no-draft",
            "--prompt-ids",
            ",".join(map(str, PROMPT)),
            "--max-new-tokens",
            str(NEW_TOKENS),
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads(out)  # exactly one JSON object on stdout
    (row,) = report["prompts"]
    assert row["prompt_ids"] == PROMPT
    assert row["tokens"] == hf_greedy(pair.model, PROMPT)
    assert row["text"] is None  # the tiny checkpoint has no tokenizer
    # Plain decoding: one token per round. Rows stop once the anchor reaches prompt + max_new_tokens (the reference
    # loop's rule), so the prefill token plus NEW_TOKENS rounds make one more token than is returned.
    assert row["acceptance_lengths"] == [1] * NEW_TOKENS
    assert report["new_tokens"] == NEW_TOKENS and report["tokens_per_s"] > 0 and report["seconds"] > 0
    assert report["plain_tokens_per_s"] is None and report["speedup"] is None
    assert report["config"]["no_draft"] is True and report["config"]["dtype"] == "float32"
    assert report["config"]["draft"] is None


def test_cli_prompts_file_and_human_output(pair, tmp_path, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt_ids": PROMPT}) + "\n\n")
    code, out, err = _run(
        ["--target", pair.folder, "--no-draft", "--prompts-file", str(path), "--max-new-tokens", str(NEW_TOKENS)],
        capsys,
    )
    assert code == 0, err
    assert " ".join(map(str, hf_greedy(pair.model, PROMPT))) in out and "tok/s" in out


# ---------------------------------------------------------------------------------------------------------- bad input

API_ERRORS = [
    (dict(prompts=[[]]), "empty"),
    (dict(prompts=[]), "non-empty"),
    (dict(prompts=[[1] * 512]), "context"),  # max_position_embeddings = 512
    (dict(prompts=[[1, 128]]), "vocabulary"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(verify="threshold:0.5"), "needs a draft"),
    (dict(verify="sometimes"), "verify"),
]


@pytest.mark.parametrize(
    "kwargs, needle", API_ERRORS, ids=[f"{next(iter(k))}-{i}" for i, (k, _) in enumerate(API_ERRORS)]
)
def test_generate_api_bad_input_is_one_line_usage_error(pair, kwargs, needle):
    kwargs = {"prompts": [PROMPT], "max_new_tokens": 4, **kwargs}
    with pytest.raises(UsageError) as info:
        dj.generate(pair.target, None, **kwargs)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def _truncated_copy(pair, tmp_path) -> str:
    import shutil

    folder = tmp_path / "truncated"
    shutil.copytree(pair.folder, folder)
    path = folder / "model.safetensors"
    os.truncate(path, os.path.getsize(path) // 2)
    return str(folder)


CLI_ERRORS = [
    (["--no-draft", "--verify", "threshold:0.5", "--prompt-ids", "1"], "needs a draft"),
    (["--target", "/nonexistent/qwen3", "--no-draft", "--prompt-ids", "1"], "does not exist"),
    ([None, "--no-draft", "--prompt-ids", "1"], "truncated"),
    (["--no-draft", "--prompt-ids", ""], "empty"),
    (["--no-draft", "--prompt-ids", "1,x"], "--prompt-ids"),
    (["--no-draft", "--prompt-ids", ",".join(["1"] * 512)], "context"),
    (["--no-draft", "--prompt-ids", "1,999"], "vocabulary"),
    (["--no-draft", "--prompt-ids", "1", "--temperature", "-1"], "temperature"),
    (["--no-draft", "--prompt-ids", "1", "--top-p", "0"], "top_p"),
    (["--no-draft", "--prompt-ids", "1", "--top-p", "1.5"], "top_p"),
    (["--no-draft", "--prompt-ids", "1", "--top-k", "-2"], "top_k"),
    (["--no-draft", "--prompt-ids", "1", "--max-new-tokens", "0"], "max-new-tokens"),
    (["--no-draft", "--prompt-ids", "1", "--verify", "threshold:7"], "threshold"),
    (["--no-draft", "--prompt-ids", "1", "--dtype", "float16"], "--dtype"),
    (["--no-draft", "--prompt-ids", "1", "--top-p", "high"], "--top-p"),
    (["--no-draft", "--prompts-file", "/nonexistent/p.jsonl"], "does not exist"),
    (["--no-draft", "--prompts-file", 'FILE:{"prompt_ids": ["a", "b"]}'], "line 1"),
    (["--no-draft", "--prompts-file", 'FILE:{"turns": [5]}'], "line 1 needs"),  # was a TypeError traceback
    (["--no-draft", "--prompts-file", 'FILE:{"turns": "def f():"}'], "list of strings"),  # was its first letter
    (["--no-draft", "--prompts-file", 'FILE:{"prompt_ids": [1]}\n{"prompt": "x"}'], "line 2"),
    (["--no-draft", "--prompt", "hello"], "tokenizer"),
    (["--no-draft"], "default text prompt"),  # blamed a text prompt the user never gave
    (["--prompt-ids", "1"], "--no-draft"),  # --target without --draft
    (["--no-draft", "--prompt-ids", "1,-2,3"], "vocabulary"),  # streamed output decoded it first: a traceback
    (["--no-draft", "--prompts-file", "."], "is a folder"),
    (["--no-draft", "--prompt-ids", "1", "--compare"], "--compare"),  # was silently ignored
]


@pytest.mark.parametrize(
    "argv, needle", CLI_ERRORS, ids=[f"{i}-{n.strip('-')[:12]}" for i, (_, n) in enumerate(CLI_ERRORS)]
)
def test_generate_cli_bad_input_exits_2_with_one_line(pair, tmp_path, capsys, argv, needle):
    argv = [_truncated_copy(pair, tmp_path) if a is None else a for a in argv]
    for i, a in enumerate(argv):
        if a.startswith("FILE:"):  # a prompts file with these lines
            bad = tmp_path / "bad.jsonl"
            bad.write_text(a[len("FILE:") :] + "\n")
            argv[i] = str(bad)
    if "--target" not in argv:
        argv = ["--target", pair.folder, *argv]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert out == ""


def test_generate_cli_subprocess_error_is_one_line():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dspark_jax.generate",
            "--target",
            "/nonexistent/qwen3",
            "--no-draft",
            "--prompt-ids",
            "1,2",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stdout == ""


def test_dspark_error_is_the_base():
    assert issubclass(UsageError, DSparkError) and issubclass(UsageError, ValueError)


def test_importing_the_cli_keeps_dj_generate_callable(pair):
    # `import dspark_jax.generate` (above) rebinds the package attribute to the CLI module; it must still generate.
    assert dj.generate(pair.target, None, prompts=[PROMPT], max_new_tokens=NEW_TOKENS).tokens == [
        hf_greedy(pair.model, PROMPT)
    ]
