"""The embedded default pair (dspark_jax/assets/tiny_code): loads, stays lossless, and transformers reads it."""

import json
import os

import numpy as np
import pytest
from conftest import rel_err

import dspark_jax as dj
from dspark_jax.generate import ASSETS, DEFAULT_PROMPT, build_parser, main

pytestmark = pytest.mark.skipif(not os.path.isdir(ASSETS), reason="embedded pair not built")


@pytest.fixture(scope="module")
def target():
    return dj.load_target(os.path.join(ASSETS, "target"), dtype="float32")


@pytest.mark.parametrize("name", ["dspark", "dflash"])
def test_greedy_lossless_16_tokens(target, name):
    draft = dj.load_draft(os.path.join(ASSETS, name), target=target)
    prompt = target.tokenizer.encode_prompt(DEFAULT_PROMPT)
    spec = dj.generate(target, draft, prompts=[prompt], max_new_tokens=16)
    plain = dj.generate(target, None, prompts=[prompt], max_new_tokens=16)
    assert spec.tokens == plain.tokens
    assert len(spec.tokens[0]) == 16
    assert draft.config.block_size == 7
    assert draft.config.use_markov == (name == "dspark")


def test_transformers_loads_the_target(target):
    import torch
    import transformers

    hf = transformers.Qwen3ForCausalLM.from_pretrained(os.path.join(ASSETS, "target"), dtype=torch.float32).eval()
    ids = np.array([target.tokenizer.encode_prompt(DEFAULT_PROMPT)])
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got, _ = target.forward(ids)
    assert rel_err(got, want) < 1e-5


def test_sizes_and_training_notes():
    total = 0
    for name in ("target", "dspark", "dflash"):
        folder = os.path.join(ASSETS, name)
        for f in ("config.json", "model.safetensors", "TRAINING.md"):
            assert os.path.isfile(os.path.join(folder, f)), f"{name}/{f} missing"
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    assert total <= 80 * 2**20
    assert os.path.isfile(os.path.join(ASSETS, "target", "tokenizer.json"))


def test_main_command_runs_the_pair(capsys):
    assert main(["--max-new-tokens", "24", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 24 and out["tau"] >= 1.0
    assert out["prompts"][0]["text"]


def test_main_command_streams_the_same_text(capsys):
    """Without --json the CLI prints the prompt, then the continuation as rounds complete; the printed text is the
    one --json reports (streaming runs the same compiled loop over the same rounds)."""
    argv = ["--prompt", "def parse(path):\n", "--max-new-tokens", "24"]
    assert main(argv + ["--json"]) == 0
    text = json.loads(capsys.readouterr().out)["prompts"][0]["text"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("def parse(path):\n" + text + "\n" + "-" * 60 + "\n"), out
    assert main(argv + ["--no-stream"]) == 0
    assert capsys.readouterr().out.startswith(text + "\n" + "-" * 60 + "\n")
    help_text = build_parser().format_help()
    assert "--no-stream" in help_text and "examples:" in help_text
