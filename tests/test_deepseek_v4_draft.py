"""The DSpark draft of DeepSeek-V4 -DSpark checkpoints (V4 §4, tests of V4 §6.3), on the tiny config of V4 §6.1 (f32).

No public CPU reference runs the V4 draft, so: pieces that have one (a stage with no context and a block-causal mask
equals transformers' DeepseekV4DecoderLayer; hc_head / norm / head equal transformers' modules), then internal
consistency (cached == uncached, batch == single rows, mask properties, head wiring), greedy losslessness in the
decode loop for every verify policy, and a native-layout -DSpark folder (FP8 main_proj, FP4 experts) that loads as
target + draft from one folder, also through `python -m dspark_jax.generate --target DIR`.
"""

import dataclasses
import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV4ForCausalLM"):
    pytest.skip("this transformers has no DeepseekV4ForCausalLM (needs >= 5.8.1)", allow_module_level=True)

from conftest import rel_err  # noqa: E402
from test_deepseek_v4 import TINY, native_tensors, tiny_v4_hf  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax.configs import DeepseekV4DraftConfig  # noqa: E402
from dspark_jax.errors import UsageError  # noqa: E402
from dspark_jax.loading import DraftHandle  # noqa: E402
from dspark_jax.models.deepseek_v4_draft import DeepseekV4Draft  # noqa: E402

TOL = 1e-5
H, V, B, W, STAGES = 64, 256, 5, 8, 3
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def _fp4(rng, out_dim, in_dim, scale_exp=123):
    """Random packed FP4 weight (I8 [out, in/2]) with E8M0 scales per 32 inputs, and its dequantised value."""
    import ml_dtypes

    codes = rng.integers(0, 16, (out_dim, in_dim)).astype(np.uint8)
    sbytes = rng.integers(scale_exp - 1, scale_exp + 2, (out_dim, in_dim // 32)).astype(np.uint8)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.int8)
    value = E2M1[codes] * np.exp2(np.repeat(sbytes, 32, axis=1).astype(np.float32) - 127)
    return packed, sbytes.view(ml_dtypes.float8_e8m0fnu), value


def draft_tensors(native: dict, seed: int = 11) -> dict:
    """Random mtp.0..2 tensors in the native -DSpark layout (V4 §4.2): each stage shaped like target layer 5 (ratio
    0, top-k), FP4 routed experts, FP8 main_proj with its scale tile; extras on stage 0 and stage 2."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    out = {}
    for s in range(STAGES):
        for key, value in native.items():
            if not key.startswith("layers.5."):
                continue
            name = f"mtp.{s}." + key.removeprefix("layers.5.")
            if ".ffn.experts." in key:
                if key.endswith(".weight"):
                    packed, scale, _ = _fp4(rng, *value.shape)
                    out[name] = packed
                    out[name.removesuffix(".weight") + ".scale"] = scale
                continue
            if key.endswith("norm.weight"):
                out[name] = (1 + 0.2 * rng.standard_normal(value.shape)).astype(np.float32)
            elif value.ndim >= 2:
                out[name] = (rng.standard_normal(value.shape) / value.shape[-1] ** 0.5).astype(np.float32)
            else:
                out[name] = (0.5 * rng.standard_normal(value.shape)).astype(np.float32)
    main = (rng.standard_normal((H, STAGES * H)) / (STAGES * H) ** 0.5).astype(ml_dtypes.float8_e4m3fn)
    out["mtp.0.main_proj.weight"] = main
    out["mtp.0.main_proj.scale"] = np.full((1, 2), 127, np.uint8).view(ml_dtypes.float8_e8m0fnu)  # 2^0
    out["mtp.0.main_norm.weight"] = (1 + 0.2 * rng.standard_normal(H)).astype(np.float32)
    out["mtp.2.norm.weight"] = (1 + 0.2 * rng.standard_normal(H)).astype(np.float32)
    out["mtp.2.hc_head_fn"] = (rng.standard_normal((4, 4 * H)) / (4 * H) ** 0.5).astype(np.float32)
    out["mtp.2.hc_head_base"] = (0.5 * rng.standard_normal(4)).astype(np.float32)
    out["mtp.2.hc_head_scale"] = (0.5 * rng.standard_normal(1)).astype(np.float32)
    out["mtp.2.markov_head.markov_w1.weight"] = rng.standard_normal((V, 16)).astype(np.float32)
    out["mtp.2.markov_head.markov_w2.weight"] = (rng.standard_normal((V, 16)) / 4).astype(np.float32)
    out["mtp.2.confidence_head.proj.weight"] = (rng.standard_normal((1, H + 16)) / 8).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    """A tiny random V4 -DSpark folder in the native layout: the transformers target's tensors plus mtp.*."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("v4d")
    model = tiny_v4_hf(root / "hf")
    native = native_tensors(root / "hf")
    mtp = draft_tensors(native)
    folder = root / "dspark"
    folder.mkdir()
    save_file({**native, **mtp}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TINY))
    target = dj.load_target(str(folder), dtype="float32")
    draft = dj.load_draft(str(folder), target=target)
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 256, (2, 300)).astype(np.int32)
    _, taps = target.forward(tokens, tap_layer_ids=draft.config.target_layer_ids)
    return dict(
        folder=str(folder), model=model, target=target, draft=draft, native=native, mtp=mtp, tokens=tokens, taps=taps
    )


# ------------------------------------------------------------------------------------------------------- loading
def test_loads_from_the_same_folder_with_dequantised_fp8_and_fp4(v4):
    """The draft comes from mtp.* of the target's own files (V4 §4.2): defaults of V4 §5, the confidence head found
    by its key, the target's embedding / head bound (the same arrays), FP8 main_proj and FP4 experts dequantised."""
    draft, target, mtp = v4["draft"], v4["target"], v4["mtp"]
    c = draft.config
    assert isinstance(c, DeepseekV4DraftConfig)
    assert (c.num_stages, c.block_size, c.mask_token_id, c.markov_rank) == (3, 5, 255, 16)
    assert c.target_layer_ids == (3, 4, 5) and c.enable_confidence_head and c.window == W
    assert (c.tap_point, c.block_causal, c.stage_rope, c.confidence_input, c.router_eps) == (
        "output",
        False,
        "main",
        "pre_norm",
        1e-20,
    )
    assert draft.calibration is None  # STS temperatures: 1 until calibrated (Q6)
    s = draft.state
    assert s["embed"][...] is target.state["embed"][...] and s["head"][...] is target.state["head"][...]
    main = np.asarray(mtp["mtp.0.main_proj.weight"]).astype(np.float32).T
    np.testing.assert_array_equal(np.asarray(s["main_proj"][...]), main)
    packed = np.asarray(mtp["mtp.1.ffn.experts.3.w2.weight"]).view(np.uint8)
    codes = np.stack([packed & 15, packed >> 4], axis=-1).reshape(packed.shape[0], -1)
    sbytes = np.asarray(mtp["mtp.1.ffn.experts.3.w2.scale"]).view(np.uint8)
    want = E2M1[codes] * np.exp2(np.repeat(sbytes, 32, axis=1).astype(np.float32) - 127)
    np.testing.assert_array_equal(np.asarray(s["mtp"][1]["ffn"]["down_proj"][...][3]), want.T)
    np.testing.assert_array_equal(
        np.asarray(s["markov_head"]["markov_w2"][...]), mtp["mtp.2.markov_head.markov_w2.weight"].T
    )


def test_legacy_mtp_and_plain_v4_folders_are_refused(v4, tmp_path):
    from safetensors.numpy import save_file

    native = v4["native"]
    legacy = {**native, "mtp.0.e_proj.weight": np.zeros((H, H), np.float32)}
    save_file(legacy, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(UsageError, match="legacy MTP"):
        dj.load_draft(str(tmp_path), target=v4["target"])
    plain = {k: v for k, v in TINY.items() if not k.startswith("dspark_")}
    save_file(native, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(plain))
    with pytest.raises(UsageError, match="without a DSpark draft"):
        dj.load_draft(str(tmp_path), target=v4["target"])
    assert not dj.loading.has_own_draft(str(tmp_path)) and dj.loading.has_own_draft(v4["folder"])


def test_calibration_is_stored_beside_the_checkpoint(v4, tmp_path):
    """STS temperatures default to 1 (no calibration.json, Q6); `evaluate --save-calibration` writes them into the
    draft handle's folder, which for a V4 draft is the -DSpark folder itself, and load_draft then reads them."""
    import shutil

    from dspark_jax.checkpoints import save_calibration

    for name in ("model.safetensors", "config.json"):
        shutil.copy(f"{v4['folder']}/{name}", tmp_path / name)
    draft = dj.load_draft(str(tmp_path), target=v4["target"])
    assert draft.calibration is None and draft.path == str(tmp_path)
    save_calibration(draft.path, [1.5, 1.2, 1.0, 0.9, 0.8], draft.config.block_size)
    again = dj.load_draft(str(tmp_path), target=v4["target"])
    np.testing.assert_allclose(again.calibration, [1.5, 1.2, 1.0, 0.9, 0.8])


def test_port_switches_load_through_load_draft(v4):
    """The V4 §5 switches reach the loaded module (they are static in its graph): block_causal and the Q4 RoPE change
    the block; an unknown switch is a one-line UsageError."""
    taps, tokens = jnp.asarray(v4["taps"])[:1], jnp.asarray(v4["tokens"])[:1, 100]
    pos = jnp.array([100], jnp.int32)
    base = _hidden(v4["draft"].graphdef, v4["draft"].state, taps, tokens, pos)
    for options in ({"block_causal": True}, {"stage_rope": "compress"}, {"context_window": 0}):
        d = dj.load_draft(v4["folder"], target=v4["target"], v4_options=options)
        assert all(getattr(d.config, k) == v for k, v in options.items())
        out = _hidden(d.graphdef, d.state, taps, tokens, pos)
        assert np.abs(np.asarray(out - base)).max() > 1e-4, options
    tapped = dj.load_draft(v4["folder"], target=v4["target"], v4_options={"tap_point": "input"})
    assert tapped.config.target_layer_ids == (2, 3, 4)  # Q1: block inputs = outputs of the blocks before
    with pytest.raises(UsageError, match="unknown switch 'mask'"):
        dj.load_draft(v4["folder"], target=v4["target"], v4_options={"mask": 1})
    with pytest.raises(UsageError, match="stage_rope"):
        dj.load_draft(v4["folder"], target=v4["target"], v4_options={"stage_rope": "yarn"})


def test_markov_alias_names_load_the_same_tables(v4, tmp_path):
    """markov_head.embed / markov_head.head are accepted as markov_w1 / markov_w2 (V4 §4.2)."""
    from safetensors.numpy import save_file

    tensors = {**v4["native"], **v4["mtp"]}
    tensors["mtp.2.markov_head.embed.weight"] = tensors.pop("mtp.2.markov_head.markov_w1.weight")
    tensors["mtp.2.markov_head.head.weight"] = tensors.pop("mtp.2.markov_head.markov_w2.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    got = dj.load_draft(str(tmp_path), target=v4["target"]).state["markov_head"]
    want = v4["draft"].state["markov_head"]
    for name in ("markov_w1", "markov_w2"):
        np.testing.assert_array_equal(np.asarray(got[name][...]), np.asarray(want[name][...]))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _hidden(graphdef, state, taps, anchors, positions):
    return nnx.merge(graphdef, state).block_from_features(taps, anchors, positions)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _scratch(graphdef, state, taps, anchors, positions):
    draft = nnx.merge(graphdef, state)
    h = draft.block_from_features(taps, anchors, positions)
    return draft.base_logits(h)


@pytest.mark.slow
def test_sharded_draft_matches_one_device(v4):
    """On a (model=2, expert=2) mesh the draft's params land sharded like the target's (stage experts over
    `expert`, MoE in shard_map) and the block's logits equal the single-device ones."""
    from dspark_jax.sharding import make_mesh

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (conftest forces 4 CPU devices)")
    mesh = make_mesh("model=2,expert=2")
    target = dj.load_target(v4["folder"], dtype="float32", mesh=mesh)
    draft = dj.load_draft(v4["folder"], target=target)
    assert draft.state["mtp"][0]["ffn"]["gate_proj"][...].sharding.spec[0] == "expert"
    args = (jnp.asarray(v4["taps"]), jnp.asarray(v4["tokens"][:, 200]), jnp.array([200, 150], jnp.int32))
    want = _scratch(v4["draft"].graphdef, v4["draft"].state, *args)
    with jax.set_mesh(mesh):
        got = _scratch(draft.graphdef, draft.state, *args)
    assert rel_err(np.asarray(got), np.asarray(want)) < TOL


# --------------------------------------------------------------------------------------- pieces with a reference
def _hf_rope(model, positions):
    x = torch.zeros(1, len(positions), H)
    return {
        kind: model.model.rotary_emb(x, torch.as_tensor([positions]), layer_type=kind) for kind in ("main", "compress")
    }


@pytest.mark.parametrize("block_causal", [True, False])
def test_one_stage_without_context_equals_transformers_decoder_layer(v4, block_causal):
    """Stage 0 loaded with target layer 5's weights (SWA + top-k MoE), no context rows, on 4 random block streams at
    positions a..a+B-1: equals transformers' DeepseekV4DecoderLayer with a causal mask (block_causal=True) and with
    no mask (bidirectional, the default; every row sees the whole block, V4 §6.3.1)."""
    model, target = v4["model"], v4["target"]
    config = dataclasses.replace(v4["draft"].config, block_causal=block_causal)
    draft = nnx.merge(*nnx.split(DeepseekV4Draft(config, rngs=nnx.Rngs(0))))
    nnx.update(draft.mtp[0], nnx.state(target.module().layers[5]))
    a = 37
    positions = list(range(a, a + B))
    streams = np.random.default_rng(1).standard_normal((1, B, 4, H)).astype(np.float32)
    mask = None
    if block_causal:
        mask = torch.triu(torch.full((B, B), float("-inf")), diagonal=1)[None, None]
    with torch.no_grad():
        want = model.model.layers[5](
            torch.as_tensor(streams),
            position_embeddings=_hf_rope(model, positions),
            position_ids=torch.as_tensor([positions]),
            attention_mask=mask,
        ).numpy()
    got = draft.stage_forward(
        draft.mtp[0], jnp.asarray(streams), jnp.asarray([positions]), jnp.zeros((1, 0, 32)), jnp.zeros((1, 0), bool)
    )
    assert rel_err(got, want) < TOL


def test_collapse_norm_and_head_equal_transformers_modules(v4):
    """hc_head + final norm + head equal transformers' DeepseekV4HyperHead, DeepseekV4RMSNorm and lm_head (loaded
    with the target's weights, V4 §6.3.1)."""
    model, target = v4["model"], v4["target"]
    draft = nnx.merge(v4["draft"].graphdef, v4["draft"].state)
    t = target.module()
    nnx.update(draft.hc_head, nnx.state(t.hc_head))
    nnx.update(draft.norm, nnx.state(t.norm))
    streams = np.random.default_rng(2).standard_normal((2, B, 4, H)).astype(np.float32)
    with torch.no_grad():
        pre = model.model.hc_head(torch.as_tensor(streams))
        want = model.lm_head(model.model.norm(pre)).numpy()
    h = draft.hc_head(jnp.asarray(streams))
    assert rel_err(h, pre.numpy()) < TOL
    assert rel_err(draft.base_logits(h), want) < TOL


# ------------------------------------------------------------------------------------------ internal consistency
def _propose(draft, cache, taps_rows, num, anchors, anchor_pos):
    from dspark_jax.decoding.propose import propose

    return propose(draft, cache, taps_rows, num, anchors, anchor_pos, dj.SamplingConfig(), None)


@jax.jit
def _rounds(state, taps, tokens, row_ids):
    """Prefill 37 positions per row in a padded chunk of 40 (garbage rows past the count), then rounds whose pending
    rows (2 or 4 of a 6-row buffer) run the anchors forward; returns every round's h~ and the scratch forward's."""
    draft = nnx.merge(GRAPHDEF[0], state)
    bsz = taps.shape[0]
    cache = draft.init_cache(bsz, 320)
    pad = jnp.concatenate([taps[:, :37], jnp.ones_like(taps[:, :3])], axis=1)  # rows 37..39: garbage
    cache = draft.push_context(cache, pad, jnp.zeros((bsz,), jnp.int32))
    cache = dataclasses.replace(cache, lengths=jnp.full((bsz,), 37, jnp.int32))
    got, want = [], []
    pos = jnp.full((bsz,), 37, jnp.int32)
    for step in range(3):
        n = (2 + 2 * ((step + row_ids) % 2)).astype(jnp.int32)  # rows drift apart
        anchor_pos = pos + n
        rows = pos[:, None] + jnp.arange(6)[None, :]
        pending = jnp.where(
            (jnp.arange(6)[None, :] < n[:, None])[..., None], jnp.take_along_axis(taps, rows[..., None], axis=1), 5.0
        )  # unused pending rows carry garbage
        anchors = jnp.take_along_axis(tokens, anchor_pos[:, None], axis=1)[:, 0]
        cache = draft.push_context(cache, pending, cache.lengths)
        cache = dataclasses.replace(cache, lengths=cache.lengths + n)
        got.append(draft.block_hidden(cache, anchors, anchor_pos))
        want.append(draft.block_from_features(taps, anchors, anchor_pos))
        pos = anchor_pos
    return jnp.stack(got), jnp.stack(want), cache


GRAPHDEF = []


def test_cached_rounds_equal_the_uncached_forward_and_batch_equals_rows(v4):
    """V4 §6.3.2-3: incremental context (padded prefill chunk, pending buffers with unused rows) equals a scratch
    forward on all g_t of the same anchor, per row of a batch whose rows sit at different positions."""
    draft = v4["draft"]
    GRAPHDEF[:] = [draft.graphdef]
    taps, tokens = jnp.asarray(v4["taps"]), jnp.asarray(v4["tokens"])
    got, want, _ = _rounds(draft.state, taps, tokens, jnp.arange(2))
    assert rel_err(got, want) < TOL
    single, _, _ = _rounds(draft.state, taps[1:], tokens[1:], jnp.arange(1, 2))  # row 1 alone (a batch of 1)
    assert rel_err(single[:, 0], got[:, 1]) < TOL


def test_mask_properties(v4):
    """Perturbing g_t outside [a - W, a) changes nothing, inside changes every slot (V4 §6.3.4); block rows see each
    other both ways by default and only earlier rows with block_causal; the sink is an extra softmax column."""
    draft = nnx.merge(v4["draft"].graphdef, v4["draft"].state)
    taps, tokens = jnp.asarray(v4["taps"])[:1], jnp.asarray(v4["tokens"])[:1]
    a = 100
    anchors, pos = tokens[:, a], jnp.array([a], jnp.int32)
    hidden = functools.partial(_hidden, v4["draft"].graphdef, v4["draft"].state)
    base = hidden(taps, anchors, pos)
    for t, changes in ((a, False), (a + 3, False), (a - W - 1, False), (0, False), (a - W, True), (a - 1, True)):
        out = hidden(taps.at[:, t].add(3.0), anchors, pos)
        diff = np.abs(np.asarray(out - base)).max(axis=-1)[0]  # per slot
        assert (diff > 1e-4).all() if changes else (diff == 0).all(), (t, diff)

    attn = draft.mtp[0].attn
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, B, H)), jnp.float32)
    positions = jnp.arange(a, a + B)[None]
    ctx = jnp.asarray(rng.standard_normal((1, 4, 32)), jnp.float32)
    mask = jnp.ones((1, 4), bool)
    for causal in (False, True):
        draft.config = dataclasses.replace(draft.config, block_causal=causal)
        out = draft.stage_attention(attn, x, positions, ctx, mask)
        moved = draft.stage_attention(attn, x.at[:, 3].add(1.0), positions, ctx, mask)
        diff = np.abs(np.asarray(moved - out)).max(axis=-1)[0]
        assert (diff[:3] == 0).all() == causal and diff[3] > 0, (causal, diff)
    draft.config = v4["draft"].config
    # Sink as an extra column with zero value == exp(sink) added to the denominator.
    q = jnp.asarray(rng.standard_normal((1, 2, 4, 32)), jnp.float32)
    keys = jnp.asarray(rng.standard_normal((1, 3, 32)), jnp.float32)
    got = attn._attend(q, keys, jnp.ones((1, 2, 3), bool), None)
    scores = jnp.einsum("btnh,bsh->btns", q, keys) * 32**-0.5
    sink = jnp.broadcast_to(attn.attn_sink[...][None, None, :, None], (1, 2, 4, 1))
    p = jax.nn.softmax(jnp.concatenate([scores, sink], axis=-1), axis=-1)[..., :3]
    assert rel_err(got, jnp.einsum("btns,bsh->btnh", p, keys)) < TOL


def test_heads_wiring(v4):
    """V4 §6.3.5: E2 = 0 gives the base logits; greedy drafting is the argmax chain from the anchor; with w_h = 0 the
    confidence depends only on the previous token; the Q5 switch (pre / post norm) changes the confidence."""
    from dspark_jax.decoding.propose import sample_slots

    draft = nnx.merge(v4["draft"].graphdef, v4["draft"].state)
    rng = np.random.default_rng(4)
    h = jnp.asarray(rng.standard_normal((2, B, H)), jnp.float32)
    anchors = jnp.array([7, 9], jnp.int32)
    prop = sample_slots(draft, h, anchors, dj.SamplingConfig(), None)
    prev = anchors
    for j in range(B):  # the explicit chain
        logits, conf, _ = draft.slot_head(h[:, j], draft.base_logits(h[:, j]), prev, draft.init_head_state((2,)))
        np.testing.assert_array_equal(np.asarray(prop.tokens[:, j]), np.argmax(np.asarray(logits), axis=-1))
        np.testing.assert_allclose(np.asarray(prop.confidence_logits[:, j]), np.asarray(conf), rtol=1e-6)
        prev = prop.tokens[:, j]
    u = draft.base_logits(h[:, 0])
    conf_pre = draft.slot_head(h[:, 0], u, anchors, draft.init_head_state((2,)))[1]
    draft.config = dataclasses.replace(draft.config, confidence_input="post_norm")
    conf_post = draft.slot_head(h[:, 0], u, anchors, draft.init_head_state((2,)))[1]
    assert np.abs(np.asarray(conf_pre - conf_post)).min() > 1e-4
    draft.confidence_head.weight[...] = draft.confidence_head.weight[...].at[:H].set(0.0)
    c1 = draft.slot_head(h[:, 0], u, anchors, draft.init_head_state((2,)))[1]
    c2 = draft.slot_head(h[:, 1] * 3, u, anchors, draft.init_head_state((2,)))[1]
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
    draft.markov_head.markov_w2[...] = jnp.zeros_like(draft.markov_head.markov_w2[...])
    logits = draft.slot_head(h[:, 0], u, anchors, draft.init_head_state((2,)))[0]
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(u))


# ------------------------------------------------------------------------------------------------ decoding loop
NEW = 14
PROMPT_LENS = (123, 61)  # row 0 crosses the HCA border at 128 while decoding; both cross many CSA borders


def bigram_v4_draft(v4, table: dict[int, int], strength: float = 12.0, target=None) -> DraftHandle:
    """A V4 draft (random stages, rank-V Markov head planting table[prev] after prev) bound to the target, so
    blocks are sometimes accepted in full and sometimes rolled back after a few drafts."""
    config = dataclasses.replace(v4["draft"].config, markov_rank=V)
    model = DeepseekV4Draft(config, rngs=nnx.Rngs(5))
    target = target or v4["target"]
    model.embed[...] = target.state["embed"][...]
    model.head[...] = target.state["head"][...]
    w2 = np.zeros((V, V), np.float32)
    for prev, nxt in table.items():
        w2[prev, nxt] = strength
    model.markov_head.markov_w1[...] = jnp.eye(V, dtype=jnp.float32)
    model.markov_head.markov_w2[...] = jnp.asarray(w2)
    model.confidence_head.weight[...] = jnp.asarray(np.random.default_rng(6).standard_normal((H + V, 1)) / 4)
    return DraftHandle(config, *nnx.split(model), "<v4 bigram draft>")


@pytest.fixture(scope="module")
def greedy(v4):
    prompts = [v4["tokens"][i, :n].tolist() for i, n in enumerate(PROMPT_LENS)]
    plain = dj.generate(v4["target"], None, prompts, max_new_tokens=NEW, stop_token_ids=[]).tokens
    return prompts, plain


def test_speculative_greedy_with_the_loaded_draft_equals_plain(v4, greedy):
    prompts, plain = greedy
    out = dj.generate(v4["target"], v4["draft"], prompts, max_new_tokens=NEW, stop_token_ids=[])
    assert out.tokens == plain


@pytest.mark.slow
@pytest.mark.parametrize("verify", ["full", "threshold:0.5", "scheduler"])
def test_speculative_greedy_equals_plain_for_every_policy(v4, greedy, verify, monkeypatch):
    """Ragged batch, blocks crossing compressor windows; half the bigram table follows the target's greedy output so
    some rounds accept all B drafts (the target's caches then roll forward by B + 1) and others roll back. The
    scheduler runs on a fixed cost table under which drafting pays (this CPU's measured one keeps its gate shut for
    a tiny V4, and the test is about the drafting rounds)."""
    from draft_factory import bigram_table

    from dspark_jax.decoding import loop

    def cheap_round_seconds(target, draft, prep):  # width w: 1 + 0.1 (w - 1); a round without the draft: 1.2
        return 1.0 + 0.1 * (np.asarray(prep.spec.widths, np.float32) - 1), 1.2

    monkeypatch.setattr(loop, "round_seconds_table", cheap_round_seconds)

    prompts, plain = greedy
    table = bigram_table([p[-1:] + w for p, w in zip(prompts, plain)])
    rng = np.random.default_rng(5)
    table = {a: (b if rng.random() < 0.6 else int(rng.integers(0, V))) for a, b in table.items()}
    out = dj.generate(
        v4["target"], bigram_v4_draft(v4, table), prompts, max_new_tokens=NEW, stop_token_ids=[], verify=verify
    )
    assert out.tokens == plain
    accepted = [a for row in out.acceptance_lengths for a in row]
    assert max(accepted) > 1, accepted
    proposed = {p for row in out.proposal_lengths for p in row}
    if verify == "threshold:0.5":  # the confidence cut picks many verify widths (narrow target passes included)
        assert len(proposed) >= 3, out.proposal_lengths
    if verify == "full":
        assert max(accepted) == B + 1, accepted  # a fully accepted block
        assert {p for row in out.proposal_lengths for p in row} == {B}


@pytest.mark.slow
def test_cli_takes_the_draft_from_the_target_folder(v4, greedy):
    """`python -m dspark_jax.generate --target DIR` with a -DSpark folder and no --draft decodes with the folder's
    own draft, losslessly."""
    prompts, plain = greedy
    ids = ",".join(map(str, prompts[1]))
    cmd = [sys.executable, "-m", "dspark_jax.generate", "--target", v4["folder"], "--prompt-ids", ids, "--json"]
    cmd += ["--max-new-tokens", str(NEW), "--dtype", "float32"]
    res = subprocess.run(
        cmd, capture_output=True, text=True, timeout=900, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["config"]["draft"] == v4["folder"]
    want = plain[1][: plain[1].index(1) + 1] if 1 in plain[1] else plain[1]  # the CLI stops at eos (id 1)
    assert out["prompts"][0]["tokens"] == want
    assert sum(out["prompts"][0]["proposal_lengths"]) > 0  # it drafted


# ----------------------------------------------------------------------------------------------------- manifests
@pytest.mark.parametrize("name", ["deepseek-v4-flash-dspark", "deepseek-v4-pro-dspark"])
def test_full_size_draft_manifests(name):
    """V4 §6.3.7: the Flash / Pro -DSpark drafts build abstractly (nnx.eval_shape) and every mtp.* key of the
    manifest plans onto them (FP8 with scales, packed FP4 experts): no unknown, missing or duplicate key; Flash
    stages hold 1568 / 1565 / 1572 tensors."""
    from test_deepseek_v4 import _ManifestReader

    from conversion.engine import plan
    from conversion.keymaps.deepseek_v4 import DEEPSEEK_V4_DRAFT_KEYMAP, DEEPSEEK_V4_DRAFT_SKIP, DeepseekV4Source
    from conversion.loader import abstract_model
    from conversion.reader import load_manifest
    from dspark_jax.configs import DeepseekV4Config

    manifest = load_manifest(name)
    counts = [sum(1 for k in manifest["tensors"] if k.startswith(f"mtp.{s}.")) for s in range(STAGES)]
    if name == "deepseek-v4-flash-dspark":
        assert counts == [1568, 1565, 1572]
    model = DeepseekV4Config.from_hf_dict(manifest["config"], name)
    config = DeepseekV4DraftConfig.from_hf_dict(manifest["config"], name, model=model)
    _, abstract = abstract_model(DeepseekV4Draft, config)
    found = plan(
        DeepseekV4Source(_ManifestReader(manifest["tensors"])),
        DEEPSEEK_V4_DRAFT_KEYMAP,
        abstract,
        source=name,
        skip=DEEPSEEK_V4_DRAFT_SKIP,
        bound=(("embed",), ("head",)),
    )
    assert len(found) == len(list(abstract.flat_state())) - 2  # all but the bound embedding and head


# ------------------------------------------------------------------------------------------------------ sampling
SAMPLE_PROMPT = [5, 17, 99, 3, 250, 42, 7, 128]
SAMPLES = 4096


@pytest.mark.slow
def test_sampled_tokens_follow_the_target_law(v4):
    """Speculative sampling at T = 1 is lossless (spec §13): the marginal laws of the 2nd and 3rd generated tokens
    (both decided by the first round's acceptance / residual draws) match the target's exact law by chi-square.
    The target's head is sharpened x3 so the laws are concentrated; the draft plants part of the target's greedy
    path with a soft Markov bias, so drafts are accepted and rejected."""
    from test_sampling_lossless import chi_square

    module = v4["target"].module()
    module.head[...] = module.head[...] * 3.0
    graphdef, state = nnx.split(module)
    target = dataclasses.replace(v4["target"], graphdef=graphdef, state=state)
    plain = dj.generate(target, None, [SAMPLE_PROMPT], max_new_tokens=4, stop_token_ids=[]).tokens[0]
    table = dict(zip([SAMPLE_PROMPT[-1], *plain[:-1]], plain))
    draft = bigram_v4_draft(v4, table, strength=3.0, target=target)  # bound to the sharpened head

    def law(prefixes: np.ndarray, at, chunk: int = 2048) -> np.ndarray:
        """f64[n, V] next-token law at position `at` of each prefix (i32[n, t]); f64[n, k, V] for a list of k
        positions. Every call pads to chunks of `chunk` rows of one length, so the three laws share one compiled
        forward (compiles are most of this test)."""
        out = []
        for i in range(0, len(prefixes), chunk):
            part = prefixes[i : i + chunk]
            padded = np.concatenate([part, np.repeat(part[:1], chunk - len(part), axis=0)])
            logits = np.asarray(target.forward(padded)[0])[: len(part), at].astype(np.float64)
            e = np.exp(logits - logits.max(axis=-1, keepdims=True))
            out.append(e / e.sum(axis=-1, keepdims=True))
        return np.concatenate(out)

    firsts = np.asarray([SAMPLE_PROMPT + [t, 0] for t in range(V)], np.int32)  # causal: the last 0 is not read
    first_two = law(firsts, [-3, -2])  # one pass: the law of t1 (any row), then of t2 after each t1
    p1, p2 = first_two[0, 0], first_two[:, 1]  # [t1], [t1, t2]
    m2 = p1 @ p2
    joint = (p1[:, None] * p2).ravel()
    order = np.argsort(-joint)
    top = order[: int(np.searchsorted(np.cumsum(joint[order]), 0.9995)) + 1]  # pairs holding 99.95% of the mass
    pairs = np.stack(np.unravel_index(top, (V, V)), axis=1)
    p3 = law(np.asarray([SAMPLE_PROMPT + [a, b] for a, b in pairs], np.int32), -1)
    m3 = (joint[top][:, None] * p3).sum(axis=0)

    samples = []
    for seed in (0, 1):
        out = dj.generate(
            target,
            draft,
            [SAMPLE_PROMPT] * (SAMPLES // 2),
            max_new_tokens=3,
            temperature=1.0,
            seed=seed,
            stop_token_ids=[],
        )
        samples += out.tokens
        accepted = [a for row in out.acceptance_lengths for a in row]
    samples = np.asarray(samples, np.int64)
    assert max(accepted) > 1  # some drafts were accepted
    for col, marginal in ((1, m2), (2, m3 / m3.sum())):  # the last 0.05% of (t1, t2) mass is left out of m3
        stat, dof, p = chi_square(samples[:, col : col + 1], marginal)
        assert p > 1e-3, (col, stat, dof, p)
