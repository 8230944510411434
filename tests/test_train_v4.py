"""Training a DeepSeek-V4 pair (issue 12 item 3): the V4 target on next-token CE, the V4 DSpark draft and its
DFlash-style twin on the spec §9.4 losses, exported as -DSpark folders that `load_draft` reads and that decode
losslessly. Tiny random shapes (f32, CPU)."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dspark_jax as dj
from dspark_jax import train
from dspark_jax.configs import DeepseekV4Config
from dspark_jax.errors import UsageError
from dspark_jax.models import DeepseekV4, DeepseekV4Draft
from dspark_jax.train import export_v4_target
from dspark_jax.training.data import build_blocks
from dspark_jax.training.forward import target_features
from dspark_jax.training.v4 import draft_settings, v4_draft_forward

V = 64
TINY = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": V,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "qk_rope_head_dim": 8,
    "q_lora_rank": 16,
    "o_groups": 1,
    "o_lora_rank": 8,
    "sliding_window": 8,
    "compress_ratios": [4, 0],
    "num_hash_layers": 1,
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "routed_scaling_factor": 1.5,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 5,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": None,
    "scoring_func": "sqrtsoftplus",
    "swiglu_limit": 10.0,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "eos_token_id": 0,
}
DRAFT = {"block_size": 4, "mask_token_id": 1, "target_layer_ids": [0, 1], "markov_rank": 8, "num_anchors": 6}
SEQ = 40


def _config() -> DeepseekV4Config:
    return DeepseekV4Config.from_hf_dict(TINY).with_dtype("float32")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random tiny V4 target folder, a corpus of repeating token patterns (learnable), and the target loaded."""
    root = tmp_path_factory.mktemp("v4train")
    config = _config()
    model = DeepseekV4(config, rngs=nnx.Rngs(3))
    model.head[...] = model.head[...] * 50  # logits of std ~5: a peaked target the drafts can follow
    export_v4_target(str(root / "target"), config, nnx.state(model), "float32")
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(4):
            motif = rng.integers(2, V, 5).tolist()
            f.write(json.dumps({"ids": (motif * 20)[:SEQ]}) + "\n")
    for name, fields in (
        ("dspark", DRAFT),
        ("dflash", {**DRAFT, "use_markov": False, "enable_confidence_head": False}),
    ):
        (root / f"{name}.json").write_text(json.dumps(fields))
    return root, dj.load_target(str(root / "target"), dtype="float32")


def test_training_forward_equals_the_decoding_block(pair):
    """Block b of the teacher-forced forward is the block decoding runs at its anchor: same context window, same
    bidirectional block rows (DeepseekV4Draft.block_from_features), for every active block."""
    _, target = pair
    config, _ = draft_settings(DRAFT, target.config, "test")
    draft = DeepseekV4Draft(config, rngs=nnx.Rngs(1))
    draft.embed[...], draft.head[...] = target.state["embed"][...], target.state["head"][...]
    tokens = jnp.asarray(np.random.default_rng(2).integers(2, V, (2, SEQ)), jnp.int32)
    features, last = target_features(target.module(), tokens, config.target_layer_ids)
    anchors = jnp.asarray([[0, 5, 17, 30], [3, 9, 38, 0]], jnp.int32)
    keep = jnp.asarray([[True, True, True, True], [True, True, True, False]])
    blocks = build_blocks(tokens, jnp.ones_like(tokens), anchors, keep, block_size=config.block_size, mask_token_id=1)
    out = nnx.jit(v4_draft_forward)(draft, features, last, blocks)
    rows, cols = np.nonzero(np.asarray(keep))
    a = anchors[rows, cols]  # every active block, one per batch row of the decoding-side reference
    ref = nnx.jit(lambda d, f, t, p: d.base_logits(d.block_from_features(f, t, p)))(
        draft, features[rows], tokens[rows, a], a
    )
    np.testing.assert_allclose(out.base_logits[rows, cols], ref, rtol=1e-5, atol=1e-5)
    # pi_j is the target's own next-token distribution at a + j.
    logits, _ = target.forward(np.asarray(tokens))
    j = blocks.target_index[0, 1]
    np.testing.assert_allclose(out.target_logits[0, 1], np.asarray(logits)[0, j], rtol=1e-4, atol=1e-4)


def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in open(folder / "metrics.jsonl")]


def _train(root, name: str, steps: int) -> list[dict]:
    out = root / name
    argv = ["--mode", "draft", "--target", str(root / "target"), "--draft-config", str(root / f"{name}.json")]
    argv += ["--data", str(root / "data.jsonl"), "--output-dir", str(out), "--seq-len", str(SEQ)]
    argv += ["--batch-size", "2", "--max-steps", str(steps), "--lr", "1e-2", "--warmup-fraction", "0", "--no-progress"]
    argv += ["--export-dtype", "float32", "--min-supervised", "1"]
    assert train.main(argv) == 0
    return _metrics(out)


@pytest.mark.slow
def test_dspark_and_dflash_drafts_learn_and_export_lossless_v4_folders(pair):
    root, target = pair
    prompts = [[int(t) for t in json.loads(line)["ids"][:11]] for line in open(root / "data.jsonl")][:2]
    plain = dj.generate(target, None, prompts, max_new_tokens=10, stop_token_ids=[]).tokens
    for name in ("dspark", "dflash"):
        losses = [h["loss"] for h in _train(root, name, 8)]
        assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
        draft = dj.load_draft(str(root / name), target)  # the -DSpark folder: target tensors + mtp.*
        assert draft.config.enable_confidence_head == (name == "dspark")
        w2 = np.asarray(draft.state["markov_head"]["markov_w2"][...])
        assert (np.abs(w2).max() > 0) == (name == "dspark")  # the twin's Markov head stays exactly zero
        out = dj.generate(target, draft, prompts, max_new_tokens=10, stop_token_ids=[])
        assert out.tokens == plain
        # The folder is a V4 -DSpark checkpoint: the target loads from it too, equal to the original.
        again = dj.load_target(str(root / name), dtype="float32")
        np.testing.assert_array_equal(np.asarray(again.state["embed"][...]), np.asarray(target.state["embed"][...]))


def test_v4_target_training_lowers_the_loss_and_exports(pair, tmp_path):
    root, _ = pair
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    tok = os.path.join(os.path.dirname(dj.__file__), "assets", "tiny_code", "target", "tokenizer.json")
    argv = ["--mode", "target", "--target-config", str(tmp_path / "config.json"), "--tokenizer", tok]
    argv += ["--data", str(root / "data.jsonl"), "--output-dir", str(tmp_path / "t"), "--seq-len", str(SEQ)]
    argv += ["--batch-size", "2", "--max-steps", "5", "--lr", "1e-2", "--warmup-fraction", "0", "--no-progress"]
    argv += ["--export-dtype", "float32", "--min-supervised", "1"]
    assert train.main(argv) == 0
    history = _metrics(tmp_path / "t")
    assert history[-1]["loss"] < history[0]["loss"] - 0.3, [h["loss"] for h in history]
    trained = dj.load_target(str(tmp_path / "t"), dtype="float32")
    assert trained.config == dataclasses.replace(_config(), moe_impl=trained.config.moe_impl)
    assert (tmp_path / "t" / "tokenizer.json").is_file()


def test_bad_v4_draft_fields_are_one_line_errors(pair):
    _, target = pair
    with pytest.raises(UsageError, match="field 'dspark_rank' is not a V4 draft field"):
        draft_settings({"dspark_rank": 3, "target_layer_ids": [0]}, target.config, "d.json")
    with pytest.raises(UsageError, match="needs target_layer_ids"):
        draft_settings({"block_size": 4}, target.config, "d.json")
    with pytest.raises(UsageError, match="use_markov must be true or false"):
        draft_settings({"target_layer_ids": [0], "use_markov": "no"}, target.config, "d.json")


def test_native_keymap_round_trips_a_random_target(pair, tmp_path):
    """export_v4_target writes every param under its native key, and load_target reads back identical arrays."""
    _, target = pair
    model = DeepseekV4(_config(), rngs=nnx.Rngs(9))
    export_v4_target(str(tmp_path / "rt"), _config(), nnx.state(model), "float32")
    back = dj.load_target(str(tmp_path / "rt"), dtype="float32")
    ours = dict(nnx.state(model).flat_state())
    for path, var in back.state.flat_state():
        np.testing.assert_array_equal(
            np.asarray(var.get_value()), np.asarray(ours[path].get_value()), err_msg=str(path)
        )
    jax.clear_caches()
