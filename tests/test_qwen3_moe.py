"""Qwen3-MoE target against transformers.Qwen3MoeForCausalLM on tiny random checkpoints (hub layout, one tensor per
expert) in f32: logits and taps through load_target, the converter and the generate CLI; greedy tokens; the three
dispatch variants; experts and heads sharded over 4 virtual devices (and 8 in a subprocess); speculative greedy with
a random draft equal to plain greedy; and the one-line errors for bad MoE fields, meshes and expert keys."""

import dataclasses
import importlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import rel_err  # noqa: E402
from draft_factory import _bind_target, draft_config  # noqa: E402

import dspark_jax as dj  # noqa: E402
from conversion import convert  # noqa: E402
from dspark_jax.configs import Qwen3MoeConfig  # noqa: E402
from dspark_jax.configs.qwen3_moe import MOE_IMPLS as CONFIG_IMPLS  # noqa: E402
from dspark_jax.errors import UsageError  # noqa: E402
from dspark_jax.layers.moe import MOE_IMPLS  # noqa: E402
from dspark_jax.loading import DraftHandle  # noqa: E402
from dspark_jax.models import Draft, Qwen3Moe  # noqa: E402
from dspark_jax.sharding import make_mesh  # noqa: E402

TOL = 1e-5
NEW_TOKENS = 16
# top-k 2 and 3; raw and renormalised weights; a dense layer via mlp_only_layers and via decoder_sparse_step; tied
# and untied embeddings.
CONFIGS = {
    "k2_raw_untied": dict(top_k=2, norm=False, tied=False, seed=1),
    "k3_norm_tied_dense1": dict(top_k=3, norm=True, tied=True, mlp_only=[1], seed=2),
    "k2_norm_step2": dict(top_k=2, norm=True, tied=False, sparse_step=2, layers=3, seed=3),
}


def tiny_qwen3_moe_hf(
    folder, *, top_k, norm, tied, seed, mlp_only=(), sparse_step=1, layers=2, experts=8, vocab=128, hidden=32
):
    """Save a tiny random transformers Qwen3-MoE (hub layout) and return (folder, model). Router weights get a
    larger scale than the default init so that the top-k choice is far from ties."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm,
        mlp_only_layers=list(mlp_only),
        decoder_sparse_step=sparse_step,
        tie_word_embeddings=tied,
        max_position_embeddings=256,
        rope_theta=10000.0,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(0.5 * torch.randn_like(p))
            elif "experts" in name:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder, model


def hf_forward(model, tokens):
    raw = []
    hooks = [
        layer.register_forward_hook(lambda m, a, out: raw.append((out[0] if isinstance(out, tuple) else out).numpy()))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()
    finally:
        for h in hooks:
            h.remove()
    return logits, raw


def hf_greedy(model, prompt, new_tokens=NEW_TOKENS):
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


_PAIRS: dict = {}


def _pair(name, tmp_path_factory):
    """The checkpoint folder, torch model, our f32 Target and reference logits of CONFIGS[name], built once."""
    if name in _PAIRS:
        return _PAIRS[name]
    folder, model = tiny_qwen3_moe_hf(tmp_path_factory.mktemp(name) / "hf", **CONFIGS[name])
    tokens = np.random.default_rng(0).integers(0, 128, (2, 11))
    logits, raw = hf_forward(model, tokens)
    _PAIRS[name] = types.SimpleNamespace(
        name=name,
        folder=str(folder),
        model=model,
        target=dj.load_target(str(folder), dtype="float32"),
        tokens=tokens,
        ref_logits=logits,
        ref_raw=raw,
    )
    return _PAIRS[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def k2(tmp_path_factory):
    return _pair("k2_raw_untied", tmp_path_factory)


@pytest.fixture(scope="module")
def k3(tmp_path_factory):
    return _pair("k3_norm_tied_dense1", tmp_path_factory)


def test_config_reads_the_hub_fields(pair):
    c = pair.target.config
    spec = CONFIGS[pair.name]
    assert isinstance(c, Qwen3MoeConfig) and c.num_experts == 8 and c.num_experts_per_tok == spec["top_k"]
    assert c.norm_topk_prob == spec["norm"] and c.mlp_only_layers == tuple(spec.get("mlp_only", ()))
    moe_layers = [i for i in range(c.num_hidden_layers) if c.is_moe_layer(i)]
    expected = [i for i, layer in enumerate(pair.model.model.layers) if hasattr(layer.mlp, "experts")]
    assert moe_layers == expected and 0 < len(moe_layers) <= c.num_hidden_layers
    back = Qwen3MoeConfig.from_hf_dict(c.to_hf_dict())
    assert back.with_dtype(c.dtype) == c.with_dtype(c.dtype)


def test_logits_and_taps_match_transformers(pair):
    c = pair.target.config
    taps_ids = tuple(range(c.num_hidden_layers))
    logits, taps = pair.target.forward(pair.tokens, taps_ids)
    assert rel_err(logits, pair.ref_logits) < TOL
    taps = np.asarray(taps).reshape(*pair.tokens.shape, len(taps_ids), c.hidden_size)
    for j in taps_ids:
        assert rel_err(taps[:, :, j], pair.ref_raw[j]) < TOL, f"tap {j}"
    assert np.array_equal(np.argmax(logits, -1), np.argmax(pair.ref_logits, -1))


@pytest.mark.parametrize("impl", ["blocked", "ragged", "gather", "dense"])
def test_every_dispatch_variant_matches(k2, impl):
    pair = k2
    config = dataclasses.replace(pair.target.config, moe_impl=impl)
    graphdef = nnx.split(nnx.eval_shape(lambda: Qwen3Moe(config, rngs=None)))[0]
    target = dataclasses.replace(pair.target, config=config, graphdef=graphdef)
    logits, _ = target.forward(pair.tokens)
    assert rel_err(logits, pair.ref_logits) < TOL


# Two configs only for the decode loop and the meshes: the loop's compile dominates this file's time.
@pytest.mark.parametrize("name", ["k2_raw_untied", "k3_norm_tied_dense1"])
def test_greedy_generate_matches_transformers(name, tmp_path_factory):
    pair = _pair(name, tmp_path_factory)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 128, n).tolist() for n in (7, 3)]
    result = dj.generate(pair.target, None, prompts=prompts, max_new_tokens=NEW_TOKENS)
    for i, prompt in enumerate(prompts):
        assert result.tokens[i] == hf_greedy(pair.model, prompt), f"prompt {i}"


def _random_dense_draft(target, seed=0) -> DraftHandle:
    """A random DFlash draft for a MoE target: its layers are dense Qwen3 layers of the target's geometry."""
    config = draft_config(types.SimpleNamespace(config=target.config.dense()), block_size=4, num_layers=1)
    model = Draft(config, rngs=nnx.Rngs(seed))
    _bind_target(model, target)
    graphdef, state = nnx.split(model)
    return DraftHandle(config, graphdef, state, f"<random draft seed {seed}>")


@pytest.mark.slow
def test_speculative_greedy_equals_plain_greedy(k3):
    pair = k3
    draft = _random_dense_draft(pair.target)
    prompts = [np.random.default_rng(4).integers(0, 128, n).tolist() for n in (6, 9)]
    spec = dj.generate(pair.target, draft, prompts=prompts, max_new_tokens=NEW_TOKENS)
    # Plain greedy of this target equals transformers' greedy (test above), so compare with that directly.
    assert spec.tokens == [hf_greedy(pair.model, p) for p in prompts]


@pytest.mark.slow
def test_converter_output_and_cli(k2, tmp_path, capsys, monkeypatch):
    """`python -m conversion.convert --kind auto` detects Qwen3-MoE; the orbax folder loads to the same logits; the
    generate CLI runs it with --no-draft and with a draft folder (exported random draft) to transformers' tokens."""
    pair = k2
    dst = tmp_path / "orbax"
    assert convert.main(["--src", pair.folder, "--dst", str(dst), "--kind", "auto", "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {dst}"
    target = dj.load_target(str(dst), dtype="float32")
    assert isinstance(target.config, Qwen3MoeConfig)
    logits, _ = target.forward(pair.tokens)
    assert rel_err(logits, pair.ref_logits) < TOL
    from conversion.export import export_draft

    generate = importlib.import_module("dspark_jax.generate")  # `dj.generate` is the function, not the CLI module
    monkeypatch.setattr(generate, "TIMED_RUNS", 1)  # tokens are what is checked here, not timings

    draft = _random_dense_draft(target)
    export_draft(str(tmp_path / "draft"), draft.config, draft.state, dtype="float32")
    prompt = [5, 17, 99, 3]
    ref = hf_greedy(pair.model, prompt, 8)
    for extra in (["--no-draft"], ["--draft", str(tmp_path / "draft")]):
        argv = ["--target", str(dst), "--prompt-ids", "5,17,99,3", "--max-new-tokens", "8", "--json", *extra]
        assert generate.main(argv + ["--dtype", "float32"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["prompts"][0]["tokens"] == ref, extra


# ------------------------------------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("name", ["k2_raw_untied", "k3_norm_tied_dense1"])
@pytest.mark.parametrize("mesh_text", ["expert=4", "model=2,expert=2"])
def test_sharded_experts_and_heads_match(name, mesh_text, tmp_path_factory):
    pair = _pair(name, tmp_path_factory)
    mesh = make_mesh(mesh_text)
    target = dj.load_target(pair.folder, dtype="float32", mesh=mesh)
    moe_layer = next(i for i in range(target.config.num_hidden_layers) if target.config.is_moe_layer(i))
    mlp = target.state["layers"][moe_layer]["mlp"]
    assert mlp["gate_proj"][...].sharding.spec == P("expert", None, "model")
    assert mlp["down_proj"][...].sharding.spec == P("expert", "model", None)
    assert mlp["gate"][...].sharding.spec == P(None, None)  # the router is replicated: every device routes alike
    assert target.state["layers"][0]["self_attn"]["q_proj"][...].sharding.spec == P(None, "model", None)
    assert len(mlp["gate_proj"][...].sharding.device_set) == 4
    logits, _ = target.forward(pair.tokens)
    assert rel_err(logits, pair.ref_logits) < TOL


@pytest.mark.slow
def test_sharded_greedy_decoding(k2):
    """The decode loop (prefill + rounds through the cache) with experts and heads sharded 2x2."""
    pair = k2
    target = dj.load_target(pair.folder, dtype="float32", mesh=make_mesh("model=2,expert=2"))
    result = dj.generate(target, None, prompts=[[3, 1, 4, 1, 5]], max_new_tokens=NEW_TOKENS)
    assert result.tokens[0] == hf_greedy(pair.model, [3, 1, 4, 1, 5])


SUBPROCESS = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import numpy as np, jax
import dspark_jax as dj
from dspark_jax.sharding import make_mesh
assert len(jax.devices()) == 8
folder, tokens_path, out = sys.argv[1:4]
tokens = np.load(tokens_path)
got = {}
for text in ("expert=8", "model=2,expert=4"):
    target = dj.load_target(folder, dtype="float32", mesh=make_mesh(text))
    assert len(target.state["layers"][0]["mlp"]["gate_proj"][...].sharding.device_set) == 8
    got[text] = np.asarray(target.forward(tokens)[0])
np.savez(out, **got)
"""


@pytest.mark.slow
def test_eight_devices_in_a_subprocess(k2, tmp_path):
    """conftest gives this process 4 devices; a fresh interpreter with 8 runs experts 8-way and 4x2 (model)."""
    pair = k2
    np.save(tmp_path / "tokens.npy", pair.tokens)
    script = tmp_path / "run8.py"
    script.write_text(textwrap.dedent(SUBPROCESS))
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "XLA_FLAGS": ""}
    subprocess.run(
        [sys.executable, str(script), pair.folder, str(tmp_path / "tokens.npy"), str(tmp_path / "out.npz")],
        check=True,
        env=env,
        timeout=600,
    )
    with np.load(tmp_path / "out.npz") as z:
        assert set(z.files) == {"expert=8", "model=2,expert=4"}
        for name in z.files:
            assert rel_err(z[name], pair.ref_logits) < TOL, name


# --------------------------------------------------------------------------------------------------------- errors


def test_impl_lists_agree():
    assert CONFIG_IMPLS == MOE_IMPLS


BASE = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=48,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
)


@pytest.mark.parametrize(
    "change, needle",
    [
        (dict(num_experts=0), "num_experts must be a positive integer, got 0"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok must be <= num_experts (8), got 9"),
        (dict(norm_topk_prob="yes"), "norm_topk_prob must be true or false, got 'yes'"),
        (dict(mlp_only_layers=[2]), "mlp_only_layers must list distinct layer indices in [0, 2), got [2]"),
        (dict(decoder_sparse_step=0), "decoder_sparse_step must be a positive integer, got 0"),
        (dict(moe_impl="alltoall"), "moe_impl must be one of"),
    ],
)
def test_bad_moe_fields_are_one_line(change, needle):
    d = {**BASE, **change}
    with pytest.raises(UsageError) as info:
        if "moe_impl" in change:
            Qwen3MoeConfig(**{**d, "mlp_only_layers": ()})
        else:
            Qwen3MoeConfig.from_hf_dict(d)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_missing_num_experts_is_one_line():
    d = {k: v for k, v in BASE.items() if k != "num_experts"}
    with pytest.raises(UsageError, match="missing field 'num_experts'"):
        Qwen3MoeConfig.from_hf_dict(d)


def test_experts_not_divisible_by_the_expert_axis(k2):
    with pytest.raises(UsageError) as info:
        dj.load_target(k2.folder, dtype="float32", mesh=make_mesh("expert=3"))
    msg = str(info.value)
    assert "expert=3" in msg and "experts=8" in msg and "\n" not in msg


def _rewrite(pair, tmp_path, edit) -> str:
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "edited"
    folder.mkdir()
    shutil.copy(pathlib.Path(pair.folder) / "config.json", folder / "config.json")
    tensors = load_file(str(pathlib.Path(pair.folder) / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    return str(folder)


UP3 = "model.layers.0.mlp.experts.3.up_proj.weight"


@pytest.mark.parametrize(
    "edit, needles",
    [
        (
            lambda t: t.pop("model.layers.0.mlp.experts.3.up_proj.weight"),
            ["1 missing expert key(s): model.layers.0.mlp.experts.3.up_proj"],
        ),
        (
            lambda t: t.update({"model.layers.0.mlp.experts.8.up_proj.weight": t["lm_head.weight"][:16, :32].copy()}),
            ["1 unexpected expert key(s): model.layers.0.mlp.experts.8.up_proj.weight"],
        ),
        (
            lambda t: t.update({"model.layers.0.mlp.experts.03.up_proj.weight": t[UP3].copy()}),
            ["1 duplicate expert key(s)", "experts.03.up_proj.weight", "experts.3.up_proj.weight"],
        ),
    ],
    ids=["missing", "unexpected", "duplicate"],
)
def test_bad_expert_keys_are_one_line(k2, tmp_path, edit, needles):
    folder = _rewrite(k2, tmp_path, edit)
    with pytest.raises(UsageError) as info:
        dj.load_target(folder, dtype="float32")
    msg = str(info.value)
    assert all(n in msg for n in needles) and "\n" not in msg, msg
    assert convert.main(["--src", folder, "--dst", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ full size

QWEN3_30B_A3B = {  # the hub config.json of Qwen/Qwen3-30B-A3B (fields this port reads)
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 40960,
}


def test_full_size_shapes_and_shardings():
    """Qwen3-30B-A3B under eval_shape: 30.5 B params, experts stacked [128, ...] and sharded 4-way with ffw 2-way."""
    from dspark_jax.loading import checkpoint_kind
    from dspark_jax.sharding import state_shardings

    assert checkpoint_kind(QWEN3_30B_A3B, "config.json") == "qwen3_moe"
    config = Qwen3MoeConfig.from_hf_dict(QWEN3_30B_A3B)
    _, state = nnx.split(nnx.eval_shape(lambda: Qwen3Moe(config, rngs=None)))
    flat = dict(state.flat_state())
    assert sum(int(np.prod(v.get_value().shape)) for v in flat.values()) == 30_532_122_624
    assert flat[("layers", 47, "mlp", "down_proj")].get_value().shape == (128, 768, 2048)
    shardings = dict(state_shardings(state, make_mesh("model=2,expert=2")).flat_state())
    assert shardings[("layers", 0, "mlp", "gate_proj")].get_value().spec == P("expert", None, "model")
