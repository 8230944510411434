"""Sharding: mesh parsing, logical-axis rules, params really sharded on the 4 virtual CPU devices with parity to
transformers unchanged, and the shardings of full-size Qwen3 4B/8B/14B derived without weights."""

import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conversion.reader import load_manifest
from dspark_jax.configs import Qwen3Config
from dspark_jax.errors import UsageError
from dspark_jax.models import Qwen3
from dspark_jax.sharding import ShardingRules, logical_to_spec, make_mesh, parse_mesh, sharding_for, state_shardings

# --------------------------------------------------------------------------------------------------------------- units


def test_parse_and_make_mesh():
    assert parse_mesh("data=2,model=2") == {"data": 2, "model": 2, "expert": 1}
    assert parse_mesh("") == {"data": 1, "model": 1, "expert": 1}
    mesh = make_mesh("model=4")
    assert mesh.axis_names == ("data", "model", "expert") and dict(mesh.shape) == {"data": 1, "model": 4, "expert": 1}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("tensor=2", "mesh axis must be one of"),
        ("model=0", "positive"),
        ("model=two", "positive"),
        ("model=8", "needs 8 devices"),
        ("data=2,model=4", "needs 8 devices"),
        ("data=2,data=1", "given twice"),
    ],
)
def test_bad_mesh_is_one_line(text, needle):
    with pytest.raises(UsageError) as info:
        make_mesh(text)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_logical_rules():
    assert logical_to_spec(("embed", "q_heads", "head_dim")) == P(None, "model", None)
    assert logical_to_spec(("batch", "vocab")) == P("data", "model")
    with pytest.raises(AssertionError, match="two dims onto one mesh axis"):
        logical_to_spec(("q_heads", "ffw"))
    with pytest.raises(UsageError, match="unknown logical axis"):
        ShardingRules().mesh_axis("heads")
    mesh = make_mesh("model=4")
    assert sharding_for("w", (8, 3), None, mesh).spec == P()
    with pytest.raises(UsageError) as info:
        sharding_for("layers.0.self_attn.k_proj", (64, 2, 16), ("embed", "kv_heads", "head_dim"), mesh)
    msg = str(info.value)
    assert "\n" not in msg and "model=4" in msg and "kv_heads=2" in msg and "k_proj" in msg


# ------------------------------------------------------------------------------------- sharded parity with transformers

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import rel_err  # noqa: E402
from test_qwen3 import TOL, build_pair, hf_forward, hf_greedy  # noqa: E402

import dspark_jax as dj  # noqa: E402

EXPECTED_SPECS = {  # param path -> spec on a mesh with a 'model' axis (default ShardingRules)
    ("embed_tokens",): P("model", None),
    ("lm_head",): P(None, "model"),
    ("norm", "weight"): P(None),
    ("layers", 0, "self_attn", "q_proj"): P(None, "model", None),
    ("layers", 0, "self_attn", "k_proj"): P(None, "model", None),
    ("layers", 0, "self_attn", "v_proj"): P(None, "model", None),
    ("layers", 0, "self_attn", "o_proj"): P("model", None, None),
    ("layers", 1, "mlp", "gate_proj"): P(None, "model"),
    ("layers", 1, "mlp", "down_proj"): P("model", None),
    ("layers", 1, "input_layernorm", "weight"): P(None),
}


@pytest.mark.parametrize("name, mesh_text", [("gqa1_untied", "model=4"), ("gqa2_tied", "data=2,model=2")])
def test_sharded_params_match_transformers(tmp_path, name, mesh_text):
    pair = build_pair(tmp_path, name)
    mesh = make_mesh(mesh_text)
    model_size = mesh.shape["model"]
    target = dj.load_target(pair.folder, dtype="float32", mesh=mesh)
    params = {path: var.get_value() for path, var in target.state.flat_state()}
    for path, spec in EXPECTED_SPECS.items():
        if path == ("lm_head",) and target.config.tie_word_embeddings:
            assert path not in params
            continue
        array = params[path]
        assert array.sharding.spec == spec, path
        assert array.sharding.mesh.shape == mesh.shape
        sharded_dim = [i for i, axis in enumerate(spec) if axis == "model"]
        for shard in array.addressable_shards:  # really split: each device holds 1/model of the sharded dim
            expect = list(array.shape)
            for i in sharded_dim:
                expect[i] //= model_size
            assert list(shard.data.shape) == expect, path
    q = params[("layers", 0, "self_attn", "q_proj")]
    assert len({d.id for d in q.sharding.device_set}) == mesh.devices.size

    c = target.config
    tokens = np.random.default_rng(5).integers(0, c.vocab_size, (2, 11))
    tap_ids = (-1, 0)
    logits, taps = target.forward(tokens, tap_ids)
    ref_logits, hidden_states, _ = hf_forward(pair.model, tokens)
    assert rel_err(logits, ref_logits) < TOL
    taps = np.asarray(taps).reshape(*tokens.shape, 2, c.hidden_size)
    assert rel_err(taps[:, :, 0], hidden_states[0]) < TOL and rel_err(taps[:, :, 1], hidden_states[1]) < TOL
    if mesh_text == "model=4":
        prompts = [tokens[0, :9].tolist(), tokens[1, :3].tolist()]  # ragged
        result = dj.generate(target, None, prompts=prompts, max_new_tokens=32)
        assert result.tokens == [hf_greedy(pair.model, p) for p in prompts]


# ---------------------------------------------------------------------------------------------- full size, no weights


@pytest.mark.parametrize("name", ["qwen3-4b", "qwen3-8b", "qwen3-14b"])
def test_full_size_shardings_without_weights(name):
    config = Qwen3Config.from_hf_dict(load_manifest(name)["config"])
    _, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=None)))
    for mesh_text in ("model=4", "data=2,model=2"):
        shardings = state_shardings(abstract, make_mesh(mesh_text))
        flat = dict(shardings.flat_state())
        assert len(flat) == len(list(abstract.flat_state()))
        q = flat[("layers", 0, "self_attn", "q_proj")].get_value()
        assert q.spec == P(None, "model", None)
        for path, var in abstract.flat_state():
            sharding = flat[path].get_value()
            shape = var.get_value().shape
            assert all(
                size % (sharding.mesh.shape[axis] if axis else 1) == 0
                for size, axis in zip(shape, tuple(sharding.spec) + (None,) * len(shape))
            ), path
        # The biggest param (embedding) really splits: each device holds 1/model of the vocabulary rows.
        embed = flat[("embed_tokens",)].get_value()
        model_size = embed.mesh.shape["model"]
        assert embed.shard_shape((config.vocab_size, config.hidden_size)) == (
            config.vocab_size // model_size,
            config.hidden_size,
        )
