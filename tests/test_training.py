"""Training: goldens of the reference training forward and losses, inference/training equivalence, the optimizer
loop (loss goes down, frozen copies stay, exact resume, data parallel, feature cache), export round trips, the CLI."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDENS, golden_arrays, golden_folder, rel_err, tiny_qwen3_hf
from flax import nnx

import dspark_jax as dj
from conversion.export import INVERSES, export_draft, export_target, export_tensors
from conversion.keymaps import KEYMAPS
from conversion.reader import open_checkpoint
from conversion.transforms import TRANSFORMS
from dspark_jax.models import Draft
from dspark_jax.train import build_parser, main
from dspark_jax.training import data, forward, losses
from dspark_jax.training.config import TrainConfig
from dspark_jax.training.step import OptimizerConfig, init_train_state, lr_schedule, split_trainable

VARIANTS = ("markov", "rnn", "dflash")


# --------------------------------------------------------------------------------------------------- goldens (§5.6)


@pytest.fixture(scope="module", params=VARIANTS)
def golden(request):
    g = golden_arrays(request.param)
    target = dj.load_target(str(golden_folder(request.param, "target")), dtype="float32")
    draft = dj.load_draft(str(golden_folder(request.param, "draft")), target=target)
    model = draft.module()
    c = draft.config
    tokens = jnp.asarray(g["train_input_ids"][None], jnp.int32)
    blocks = data.build_blocks(
        tokens,
        jnp.asarray(g["train_loss_mask"][None]),
        jnp.asarray(g["train_anchor_positions"][None], jnp.int32),
        jnp.asarray(g["train_block_keep"][None]),
        block_size=c.block_size,
        mask_token_id=c.mask_token_id,
    )
    features = jnp.asarray(g["train_target_features"][None])
    out = forward.draft_forward(model, features, jnp.asarray(g["train_target_last_hidden"][None]), blocks)
    return request.param, g, model, blocks, out


def test_golden_blocks_mask_positions(golden):
    _, g, model, blocks, _ = golden
    s, _n, b = g["train_input_ids"].shape[0], *g["train_target_ids"].shape
    mask = data.training_mask(blocks.anchors, blocks.keep, s, b)[0]
    np.testing.assert_array_equal(np.asarray(mask), g["train_attention_mask"])
    np.testing.assert_array_equal(np.asarray(data.position_ids(blocks.positions, s))[0], g["train_position_ids"])
    np.testing.assert_array_equal(np.asarray(blocks.labels)[0], g["train_target_ids"])
    np.testing.assert_array_equal(np.asarray(blocks.prev_tokens)[0], g["train_prev_token_ids"])
    np.testing.assert_array_equal(np.asarray(blocks.eval_mask)[0], g["train_eval_mask"])
    assert rel_err(blocks.loss_weights[0], g["train_loss_weights"]) < 1e-6
    assert np.asarray(blocks.tokens)[0, ~g["train_block_keep"], 0].tolist() == [model.config.mask_token_id]


def test_golden_forward_and_losses(golden):
    variant, g, model, blocks, out = golden
    keep = g["train_block_keep"]  # the dropped block is left out of float comparisons (goldens README §4.4)
    errs = {
        "ctx_projected": rel_err(
            model.project_context(jnp.asarray(g["train_target_features"][None]))[0], g["train_ctx_projected"]
        )
    }
    arrays = {
        "block_hidden": out.hidden,
        "base_logits": out.base_logits,
        "draft_logits": out.logits,
        "target_logits": out.target_logits,
    }
    if out.confidence_logits is not None:
        arrays["confidence_logits"] = out.confidence_logits
    for name, a in arrays.items():
        errs[name] = rel_err(np.asarray(a)[0][keep], g["train_" + name][keep])
    terms = losses.slot_losses(out.logits, out.target_logits, blocks.labels, out.confidence_logits)
    for name, golden_name in (
        ("ce", "ce_per_slot"),
        ("l1", "l1_per_slot"),
        ("alpha", "alpha"),
        ("bce", "bce_per_slot"),
    ):
        if "train_" + golden_name in g:
            errs[name] = rel_err(np.asarray(terms[name])[0][keep], g["train_" + golden_name][keep])
    total, metrics = losses.draft_loss(out, blocks, tuple(g["loss_weights_ce_l1_conf"]))
    errs["loss_total"] = rel_err(total, g["loss_total"])
    for name in ("loss_ce", "loss_l1", "loss_confidence", "loss_weight_sum"):
        if name in g:
            errs[name] = rel_err(metrics[name], g[name])
    errs["accept_rate"] = rel_err(metrics["accept_rate"], g["train_metric_accept_rate"])
    errs["tau"] = rel_err(metrics["tau"], g["train_metric_tau"])
    if variant == "dflash":
        ce_only, _ = losses.draft_loss(out, blocks, losses.DFLASH_LOSS_WEIGHTS)
        errs["loss_total_dflash_weights"] = rel_err(ce_only, g["loss_total_dflash_weights"])
    else:
        assert "loss_confidence" in metrics
    bad = {k: v for k, v in errs.items() if not v <= 1e-5}
    assert not bad, f"{variant}: {bad}"
    assert np.isfinite(np.asarray(out.hidden)).all() and np.isfinite(float(total))


def test_inference_equals_training_block(golden):
    """Spec §13: the cached single-block forward reproduces the batched training block for every kept anchor."""
    _, g, model, blocks, out = golden
    features = jnp.asarray(g["train_target_features"][None])
    ids = jnp.asarray(g["train_input_ids"], jnp.int32)

    @jax.jit
    def infer(a):  # context rows 0..a-1 pushed into an empty cache (rows from a on are zero and invisible)
        rows = jnp.where(jnp.arange(features.shape[1])[None, :, None] < a, features, 0.0)
        cache = model.push_context(model.init_cache(1, 64), rows, jnp.zeros((1,), jnp.int32))
        cache = dataclasses.replace(cache, lengths=jnp.full((1,), a, jnp.int32))
        return model.block_hidden(cache, ids[a][None], jnp.full((1,), a, jnp.int32))[0]

    for b, (a, kept) in enumerate(zip(g["train_anchor_positions"], g["train_block_keep"])):
        if kept:
            h = infer(int(a))
            assert rel_err(h, out.hidden[0, b]) < 1e-5
            assert rel_err(h, g["train_block_hidden"][b]) < 1e-5


# ------------------------------------------------------------------------------------- anchors, losses, schedule


def test_sample_anchors_sorted_distinct_candidates():
    mask = np.zeros((3, 20), np.int32)
    mask[0, 5:] = 1  # 14 candidates (5..18)
    mask[1, [3, 4, 9, 10]] = 1  # candidates 3 and 9
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(jnp.arange(3))
    anchors, keep = map(np.asarray, data.sample_anchors(jnp.asarray(mask), 6, keys))
    assert keep.sum(1).tolist() == [6, 2, 0]
    assert set(anchors[0]) <= set(range(5, 19)) and len(set(anchors[0])) == 6
    assert (np.diff(anchors[0]) > 0).all()
    assert anchors[1, :2].tolist() == [3, 9] and (anchors[1, 2:] == 0).all() and not keep[1, 2:].any()
    seen = set()  # uniform over candidates: every candidate shows up across draws
    for i in range(40):
        a, k = data.sample_anchors(jnp.asarray(mask[:1]), 2, jax.random.key(i)[None])
        seen |= set(np.asarray(a)[np.asarray(k)].tolist())
    assert seen == set(range(5, 19))


def test_loss_weights_prefix_and_nan_safety():
    tokens = jnp.arange(12, dtype=jnp.int32)[None]
    mask = jnp.asarray([[0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]])
    blocks = data.build_blocks(
        tokens, mask, jnp.asarray([[2, 9, 0]]), jnp.asarray([[True, True, False]]), block_size=4, mask_token_id=99
    )
    # anchor 2: labels at 3, 4 supervised, 5 masked -> slot 2 and (despite label 6 being on) slot 3 off.
    assert np.asarray(blocks.eval_mask)[0].tolist() == [
        [True, True, False, False],
        [True, True, False, False],
        [False] * 4,
    ]
    w = np.asarray(blocks.loss_weights)[0]
    np.testing.assert_allclose(w[0], [1.0, np.exp(-0.25), 0, 0], rtol=1e-6)
    values = jnp.asarray([[[1.0, 2.0, 5.0, 7.0], [3.0, 4.0, 0.0, 0.0], [np.nan] * 4]])
    expect = (1 + 2 * np.exp(-0.25) + 3 + 4 * np.exp(-0.25)) / (2 + 2 * np.exp(-0.25) + 1e-6)
    np.testing.assert_allclose(float(losses.weighted_mean(values, blocks.loss_weights)), expect, rtol=1e-6)
    assert np.isfinite(float(jax.grad(lambda v: losses.weighted_mean(v, blocks.loss_weights))(values).sum()))


def test_lr_schedule_warmup_then_cosine():
    f = lr_schedule(OptimizerConfig(lr=1.0, warmup_steps=4, total_steps=14))
    np.testing.assert_allclose([float(f(s)) for s in range(4)], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
    np.testing.assert_allclose([float(f(4)), float(f(9)), float(f(14))], [1.0, 0.5, 0.0], atol=1e-6)


def test_frozen_copies_are_not_params():
    cfg = dj.DraftConfig.from_hf_dict(json.loads((GOLDENS / "markov" / "draft" / "config.json").read_text()))
    model = nnx.eval_shape(lambda: Draft(cfg.with_dtype("float32"), rngs=nnx.Rngs(0)))
    _, params, frozen = split_trainable(model)
    assert sorted(p for p, _ in frozen.flat_state()) == [("embed_tokens",), ("lm_head",)]
    assert all(p[0] not in ("embed_tokens", "lm_head") for p, _ in params.flat_state())
    state = jax.eval_shape(lambda p: init_train_state(p, OptimizerConfig()), params)
    n_params = len(jax.tree.leaves(params))
    assert len(jax.tree.leaves(state.opt_state)) == 2 * n_params + 2  # mu, nu per param + two counts


# ---------------------------------------------------------------------------------------------------- export


def test_inverse_transforms():
    rng = np.random.default_rng(0)
    for name, t in TRANSFORMS.items():
        target_shape = (6, 2, 4) if name in ("heads_in", "heads_out") else (6, 4)
        src = rng.standard_normal(t.source_shape(target_shape)).astype(np.float32)
        np.testing.assert_array_equal(INVERSES[name](t.apply(src, target_shape), src.shape), src)


@pytest.mark.parametrize("head", ["vanilla", "rnn", "gated", "dflash"])
def test_export_draft_round_trip(tmp_path, head):
    target = dj.load_target(str(golden_folder("markov", "target")), dtype="float32")
    raw = json.loads((GOLDENS / "markov" / "draft" / "config.json").read_text())
    if head == "dflash":
        raw.update(markov_rank=0, enable_confidence_head=False)
        raw.pop("markov_head_type"), raw.pop("confidence_head_with_markov")
    else:
        raw["markov_head_type"] = head
    config = dj.DraftConfig.from_hf_dict(raw).with_dtype("float32")
    model = Draft(config, rngs=nnx.Rngs(3))
    model.embed_tokens[...] = target.state["embed_tokens"][...]
    model.lm_head[...] = target.state["lm_head"][...]
    state = nnx.state(model)
    export_draft(str(tmp_path / "d"), config, state, "float32")
    loaded = dj.load_draft(str(tmp_path / "d"), target)
    assert loaded.config == config
    for (p, a), (q, b) in zip(state.flat_state(), loaded.state.flat_state()):
        assert p == q
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_draft_is_inverse_of_convert(variant):
    target = dj.load_target(str(golden_folder(variant, "target")), dtype="float32")
    draft = dj.load_draft(str(GOLDENS / variant / "draft"), target)
    tensors = export_tensors(draft.state, KEYMAPS["dspark" if variant != "dflash" else "dflash"])
    with open_checkpoint(str(GOLDENS / variant / "draft")) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for key in tensors:
            np.testing.assert_array_equal(reader.read(key), tensors[key])


def test_export_target_is_inverse_of_convert(tmp_path):
    folder, _ = tiny_qwen3_hf(tmp_path, vocab=64, hidden=32, layers=2, ffw=48)
    target = dj.load_target(str(folder), dtype="float32")
    tensors = export_tensors(target.state, KEYMAPS["qwen3"])
    with open_checkpoint(str(folder)) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for key in tensors:
            np.testing.assert_array_equal(reader.read(key), tensors[key])


def test_export_target_loads_in_transformers(tmp_path):
    import torch
    import transformers

    folder, _ = tiny_qwen3_hf(tmp_path, vocab=64, hidden=32, layers=2, ffw=48, tied=True)
    target = dj.load_target(str(folder), dtype="float32")
    export_target(str(tmp_path / "out"), target.config, target.state, "float32")
    model = transformers.Qwen3ForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32).eval()
    ids = np.arange(1, 17)[None] % 64
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).logits.numpy()
    ours, _ = target.forward(ids)
    assert rel_err(ours, ref) < 1e-5


# -------------------------------------------------------------------------------------- training runs via the CLI

NUM_SEQS, SEQ_LEN, STEPS = 4, 32, 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    folder, _ = tiny_qwen3_hf(root, vocab=128, hidden=64, layers=2, ffw=96)
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(NUM_SEQS):
            ids = rng.integers(0, 127, size=SEQ_LEN).tolist()
            f.write(json.dumps({"input_ids": ids, "loss_mask": [0] * 6 + [1] * (SEQ_LEN - 6)}) + "\n")
    draft_cfg = {
        "num_hidden_layers": 1,
        "block_size": 4,
        "target_layer_ids": [-1, 0],
        "mask_token_id": 127,
        "markov_rank": 8,
        "markov_head_type": "vanilla",
        "enable_confidence_head": True,
        "confidence_head_with_markov": True,
        "num_anchors": 5,
    }
    (root / "draft_config.json").write_text(json.dumps(draft_cfg))
    return root, folder


def _draft_args(corpus, out, *extra):
    root, folder = corpus
    return [
        "--mode",
        "draft",
        "--target",
        str(folder),
        "--data",
        str(root / "data.jsonl"),
        "--output-dir",
        str(out),
        "--draft-config",
        str(root / "draft_config.json"),
        "--seq-len",
        str(SEQ_LEN),
        "--batch-size",
        str(NUM_SEQS),
        "--max-steps",
        str(STEPS),
        "--lr",
        "3e-3",
        "--export-dtype",
        "float32",
        "--no-progress",
        "--min-supervised",
        "2",
        *extra,
    ]


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def draft_run(corpus):
    out = corpus[0] / "run_a"
    assert main(_draft_args(corpus, out)) == 0
    return out


def test_cli_draft_run_trains_and_exports(corpus, draft_run):
    records = _metrics(draft_run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < 0.9 * records[0]["loss"]  # the same 4 sequences every update: memorised
    for key in ("loss_ce", "loss_l1", "loss_confidence", "lr", "grad_norm", "tau", "accept_rate"):
        assert key in records[0]
    assert len(records[0]["accept_rate"]) == 4
    target = dj.load_target(str(corpus[1]), dtype="float32")
    draft = dj.load_draft(str(draft_run), target)  # also checks the frozen copies equal the target's
    np.testing.assert_array_equal(np.asarray(draft.state["lm_head"][...]), np.asarray(target.state["lm_head"][...]))
    assert draft.config.markov_rank == 8 and draft.config.num_anchors == 5


def test_resume_is_exact(corpus, draft_run, tmp_path):
    out = tmp_path / "run_b"
    assert main(_draft_args(corpus, out, "--stop-at-step", "3")) == 0
    assert not (out / "model.safetensors").exists() and len(_metrics(out)) == 3
    assert main(_draft_args(corpus, out)) == 2  # an existing run is never overwritten without --resume
    assert main(_draft_args(corpus, out, "--resume")) == 0
    assert _metrics(out) == _metrics(draft_run)
    with open_checkpoint(str(out)) as a, open_checkpoint(str(draft_run)) as b:
        for key in b.keys():
            np.testing.assert_array_equal(a.read(key), b.read(key))


def test_data_parallel_matches_single_device(corpus, draft_run, tmp_path):
    out = tmp_path / "run_dp"
    assert main(_draft_args(corpus, out, "--mesh", "data=4", "--stop-at-step", "2")) == 0
    for dp, single in zip(_metrics(out), _metrics(draft_run)):
        assert rel_err(dp["loss"], single["loss"]) < 1e-5
        assert rel_err(dp["grad_norm"], single["grad_norm"]) < 1e-5


def test_feature_cache_matches_on_the_fly(corpus, draft_run, tmp_path):
    out = tmp_path / "run_fc"
    assert main(_draft_args(corpus, out, "--feature-cache", str(tmp_path / "fc"), "--stop-at-step", "2")) == 0
    assert sorted(os.listdir(tmp_path / "fc")) == [f"{i:08d}.npz" for i in range(NUM_SEQS)] + ["cache.json"]
    for cached, single in zip(_metrics(out), _metrics(draft_run)):
        assert rel_err(cached["loss"], single["loss"]) < 1e-5


def _text_corpus(tmp_path):
    """A folder of .txt files and a word-level tokenizer.json (ids < 100) for them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(99)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words + ["[UNK]"])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    folder = tmp_path / "texts"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for n in (70, 40):  # 70 words -> windows of 32, 32, 6 tokens; 40 -> 32, 8
        (folder / f"doc{n}.txt").write_text(" ".join(rng.choice(words, n)))
    return folder, tmp_path / "tokenizer.json"


def test_load_corpus_text_folder_and_jsonl(tmp_path):
    texts, tokenizer = _text_corpus(tmp_path)
    c = data.load_corpus(str(texts), 32, tokenizer_path=str(tokenizer), min_supervised=7)
    assert c.lengths.tolist() == [32, 8, 32, 32]  # doc40 first (sorted names); doc70's last 6 tokens dropped
    assert c.tokens.shape == (4, 32) and c.loss_mask[1].tolist() == [1] * 8 + [0] * 24
    # a row with a loss mask is truncated (spec §9.1); a plain token stream ("ids", as training.corpus writes) is
    # cut into windows
    rows = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 1, 1, 1]}, {"ids": [1, 2, 3, 4, 9, 8, 7]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    c = data.load_corpus(str(tmp_path / "d.jsonl"), 3, min_supervised=2)
    assert c.tokens.tolist() == [[5, 6, 7], [1, 2, 3], [4, 9, 8]]
    assert c.loss_mask.tolist() == [[0, 1, 1], [1, 1, 1], [1, 1, 1]] and c.lengths.tolist() == [3, 3, 3]
    with pytest.raises(dj.UsageError, match="outside"):
        data.load_corpus(str(tmp_path / "d.jsonl"), 3, vocab_size=4)


def test_feature_cache_round_trip_and_signature(tmp_path):
    import ml_dtypes

    cache = data.FeatureCache(str(tmp_path / "fc"), {"target": "t", "corpus": "abc"})
    f = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    cache.save(7, f, f[:, :2])
    back = cache.load(7)
    assert back[0].dtype == f.dtype and np.array_equal(back[0], f) and np.array_equal(back[1], f[:, :2])
    data.FeatureCache(str(tmp_path / "fc"), {"target": "t", "corpus": "abc"})  # same settings: reused
    with pytest.raises(dj.UsageError, match="corpus"):
        data.FeatureCache(str(tmp_path / "fc"), {"target": "t", "corpus": "other"})


def test_build_job_defaults(corpus):
    """Fresh DSpark drafts get 0.1/0.9/1.0; a DFlash draft continued from a folder gets CE only, f32 params."""
    from dspark_jax.train import build_job, parse_config
    from dspark_jax.training.losses import DFLASH_LOSS_WEIGHTS, DSPARK_LOSS_WEIGHTS

    root, folder = corpus
    fresh = parse_config(_draft_args(corpus, root / "unused"))
    job, config, target = build_job(fresh, "float32")
    assert job.loss_weights == DSPARK_LOSS_WEIGHTS and job.num_anchors == 5 and job.tap_layer_ids == (-1, 0)
    np.testing.assert_array_equal(
        np.asarray(job.frozen["embed_tokens"][...]), np.asarray(target.state["embed_tokens"][...])
    )
    g = GOLDENS / "dflash"
    cont = parse_config(
        [
            "--mode",
            "draft",
            "--target",
            str(golden_folder("dflash", "target")),
            "--draft",
            str(g / "draft"),
            "--data",
            "x.jsonl",
            "--output-dir",
            "unused",
            "--num-anchors",
            "3",
        ]
    )
    job, config, _ = build_job(cont, "bfloat16")
    assert job.loss_weights == DFLASH_LOSS_WEIGHTS and job.num_anchors == 3
    assert {x.dtype for x in jax.tree.leaves(job.target_state)} == {jnp.dtype(jnp.bfloat16)}
    assert config.model.dtype == "bfloat16" and config.model.param_dtype == "float32"
    assert {x.dtype for x in jax.tree.leaves(job.params)} == {jnp.dtype(jnp.float32)}
    loaded = dj.load_draft(str(g / "draft"), dj.load_target(str(golden_folder("dflash", "target")), dtype="float32"))
    np.testing.assert_array_equal(np.asarray(job.params["fc"][...]), np.asarray(loaded.state["fc"][...]))


def test_cli_target_run_exports_hf(corpus, tmp_path):
    import torch
    import transformers

    root, folder = corpus
    out = tmp_path / "run_t"
    texts, tokenizer = _text_corpus(tmp_path)
    args = [
        "--mode",
        "target",
        "--target",
        str(folder),
        "--data",
        str(texts),
        "--tokenizer",
        str(tokenizer),
        "--output-dir",
        str(out),
        "--seq-len",
        str(SEQ_LEN),
        "--batch-size",
        "2",
        "--max-steps",
        "3",
        "--export-dtype",
        "float32",
        "--no-progress",
    ]
    assert main(args) == 0
    records = _metrics(out)
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    trained = dj.load_target(str(out), dtype="float32")
    before = dj.load_target(str(folder), dtype="float32")
    assert not np.array_equal(
        np.asarray(trained.state["norm"]["weight"][...]), np.asarray(before.state["norm"]["weight"][...])
    )
    model = transformers.Qwen3ForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = np.arange(3, 19)[None]
    with torch.no_grad():
        ref = model(torch.as_tensor(ids)).logits.numpy()
    assert rel_err(trained.forward(ids)[0], ref) < 1e-5


def test_cli_errors_are_one_line(corpus, tmp_path, capsys):
    root, folder = corpus
    out = tmp_path / "never"
    base = ["--target", str(folder), "--output-dir", str(out), "--data"]
    good = [*base, str(root / "data.jsonl")]
    cases = [
        ["--mode", "bogus", *good],
        ["--mode", "target", *good, "--lr", "fast"],
        ["--mode", "target", *good, "--draft-config", str(root / "draft_config.json")],
        ["--mode", "draft", *good],
        ["--mode", "target", *good, "--batch-size", "3", "--mesh", "data=2"],
        ["--mode", "target", *base, str(tmp_path / "missing.jsonl")],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (argv, err)
    assert not out.exists()


def test_draft_config_typo_refused_and_anchors_capped_at_seq_len(corpus, tmp_path, capsys):
    """A misspelt --draft-config field is an error (it would silently keep its default), and anchors beyond the
    sequence's positions (the 512 default at --seq-len 128 ran a tiny job out of 21 GB) are capped."""
    from dspark_jax.train import build_job, parse_config

    root, _ = corpus
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({**json.loads((root / "draft_config.json").read_text()), "markov_rnak": 8}))
    args = _draft_args(corpus, tmp_path / "never")
    args[args.index("--draft-config") + 1] = str(typo)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'markov_rnak'" in err[0] and "markov_rank" in err[0], err
    (tmp_path / "a_file").write_text("")
    assert main(_draft_args(corpus, tmp_path / "a_file")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0], err
    assert not (tmp_path / "never").exists()
    job, _, _ = build_job(parse_config(_draft_args(corpus, tmp_path / "unused", "--num-anchors", "4096")), "float32")
    assert job.num_anchors == SEQ_LEN


def test_flags_map_one_to_one_onto_train_config():
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(TrainConfig)}
