"""Gemma4 flavour of the DSpark draft (spec §4.3, §4.5, §5.1-§5.2) against tiny random transformers Gemma4 models.

There is no reference DSpark-Gemma4 implementation to compare a whole draft with, so the checks are: one draft layer
against transformers' Gemma4 full-attention decoder layer (same weights, with and without injected context rows),
the embedding scale and the soft-capped logits against the HF embed / LM-head path, and a whole draft loaded through
the real converter from a DeepSpec-style config.json + §5.2 safetensors, run on features of the HF Gemma4 target
(shapes, finiteness, cache path = dense path, batch = rows one by one).
"""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gemma4_hf = pytest.importorskip("transformers.models.gemma4")

from conftest import rel_err  # noqa: E402

from conversion.keymaps.dspark import GEMMA4_DRAFT_KEYMAP  # noqa: E402
from conversion.transforms import TRANSFORMS  # noqa: E402
from dspark_jax.configs import DraftConfig, Gemma4DraftGeometry  # noqa: E402
from dspark_jax.errors import UsageError  # noqa: E402
from dspark_jax.loading import load_draft, load_gemma4_draft  # noqa: E402
from dspark_jax.models import Draft  # noqa: E402
from dspark_jax.models.gemma4 import Gemma4DecoderLayer, embed_scale, gemma4_rope_frequencies  # noqa: E402

TOL = 1e-5
V, H, FFW = 256, 64, 96
HEADS, KV_HEADS, HEAD_DIM, GLOBAL_HEAD_DIM, GLOBAL_KV_HEADS = 4, 2, 16, 32, 1
TARGET_LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
FULL_LAYER = 1  # a full-attention layer of the target
CAP = 2.0  # small, so that tanh is far from linear on these logits
TAP_IDS = [-1, 0, 1, 2]  # the last target layer (3) is never a tap (spec §4.1)
BLOCK, MARKOV_RANK, DRAFT_LAYERS = 4, 16, 2
ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    # proportional: floor(0.25 * 32 / 2) = 4 of 16 pairs rotate, frequencies divided by 2 (spec §4.3)
    "full_attention": {
        "rope_type": "proportional",
        "partial_rotary_factor": 0.25,
        "rope_theta": 1_000_000.0,
        "factor": 2.0,
    },
}


def tiny_config(k_eq_v: bool, layer_types=TARGET_LAYER_TYPES):
    """A Gemma4 text config with no per-layer input embeddings (hidden_size_per_layer_input=0), no MoE."""
    return gemma4_hf.Gemma4TextConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FFW,
        num_hidden_layers=len(layer_types),
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        global_head_dim=GLOBAL_HEAD_DIM,
        num_global_key_value_heads=GLOBAL_KV_HEADS,
        attention_k_eq_v=k_eq_v,
        vocab_size_per_layer_input=V,
        hidden_size_per_layer_input=0,
        sliding_window=8,
        final_logit_softcapping=CAP,
        layer_types=list(layer_types),
        rope_parameters=json.loads(json.dumps(ROPE)),
        max_position_embeddings=512,
        attn_implementation="eager",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )


def randomize(model, seed: int, embed_std: float | None = None):
    """Move norm scales and layer scalars away from 1 (and optionally widen the embedding) so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif embed_std is not None and name.endswith("embed_tokens.weight"):
                p.copy_(embed_std * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def hf_model(k_eq_v: bool, seed: int = 0, layer_types=TARGET_LAYER_TYPES, embed_std=None):
    torch.manual_seed(seed)
    model = gemma4_hf.Gemma4ForCausalLM(tiny_config(k_eq_v, layer_types)).eval()
    return randomize(model, seed + 100, embed_std)


def draft_config_dict(target_config, **overrides) -> dict:
    """DeepSpec-style Gemma4 draft config.json: the target's text config + the §5.1 fields."""
    d = json.loads(target_config.to_json_string())
    d.update(
        architectures=["Gemma4DSparkModel"],
        num_hidden_layers=DRAFT_LAYERS,
        num_target_layers=target_config.num_hidden_layers,
        block_size=BLOCK,
        mask_token_id=4,
        target_layer_ids=TAP_IDS,
        num_anchors=8,
        markov_rank=MARKOV_RANK,
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        tie_word_embeddings=False,
        layer_types=["full_attention"] * DRAFT_LAYERS,
        target_model_type="gemma4_text",
        target_text_model_type="gemma4_text",
    )
    d.update(overrides)
    return d


def f32_config(d: dict) -> DraftConfig:
    return DraftConfig.from_hf_dict(d).with_dtype("float32")


def abstract(factory):
    """(graphdef, abstract state) without running any initializer (eager init compiles one program per op)."""
    return nnx.split(nnx.eval_shape(factory))


def fill(state: nnx.State, values: dict) -> nnx.State:
    """A state with host arrays: values[path as a tuple of str] where given, zeros elsewhere."""

    def value(path, var):
        v = var.get_value()
        return values.get(tuple(map(str, path)), np.zeros(v.shape, v.dtype))

    return nnx.State.from_flat_path([(p, var.replace(value(p, var))) for p, var in state.flat_state()])


def layer_values_from_hf(state: nnx.State, hf_layer) -> dict:
    """Our layer's params from an HF Gemma4 decoder layer through the draft keymap's per-layer rows (spec §5.2)."""
    shapes = {tuple(map(str, p)): tuple(var.get_value().shape) for p, var in state.flat_state()}
    values = {}
    for key, tensor in hf_layer.state_dict().items():
        full = "layers.0." + key
        hit = next(((m, tpl, fn) for pat, tpl, fn in GEMMA4_DRAFT_KEYMAP if (m := re.fullmatch(pat, full))), None)
        assert hit is not None, f"HF layer key {key} is not in GEMMA4_DRAFT_KEYMAP"
        path = tuple(hit[1].format(*hit[0].groups()).split(".")[2:])  # drop "layers.0"
        values[path] = TRANSFORMS[hit[2]].apply(tensor.numpy(), shapes[path])
    assert set(values) == set(shapes), f"not filled from HF: {set(shapes) - set(values)}"
    return values


@functools.partial(jax.jit, static_argnums=0)
def layer_with_context(graphdef, state, x, positions, context, ctx_positions, mask):
    layer = nnx.merge(graphdef, state)
    ctx_k, ctx_v = layer.self_attn.keys_values(context, ctx_positions)
    return layer.draft_step(x, positions, ctx_k, ctx_v, mask)


@functools.partial(jax.jit, static_argnums=0)
def embed_and_logits(graphdef, state, tokens, last_hidden):
    """Draft block rows with no context (h) and the soft-capped base logits of `last_hidden`."""
    draft = nnx.merge(graphdef, state)
    b, t = tokens.shape
    c = draft.config.model
    empty = jnp.zeros((b, 0, c.num_key_value_heads, c.head_dim), jnp.float32)
    h = draft.layers_forward(
        tokens, jnp.broadcast_to(jnp.arange(t), (b, t)), [(empty, empty)] * len(draft.layers), jnp.ones((b, t, t), bool)
    )
    return h, draft.base_logits(last_hidden)


@functools.partial(jax.jit, static_argnums=0)
def dense_block(graphdef, state, taps, anchors):
    """One block per row through context_kv + layers_forward with every context row visible (spec §9.3 path)."""
    draft = nnx.merge(graphdef, state)
    (b, t), slots = taps.shape[:2], draft.config.block_size
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    block_pos = jnp.broadcast_to(t + jnp.arange(slots, dtype=jnp.int32), (b, slots))
    return draft.layers_forward(
        draft.block_inputs(anchors), block_pos, draft.context_kv(taps, positions), jnp.ones((b, slots, t + slots), bool)
    )


# ------------------------------------------------------------------------------------------------------- configs


def test_config_from_both_global_head_dim_layouts():
    """transformers 5.2x writes the global head dim / KV heads as per_layer_config; hub files use top-level fields."""
    for k_eq_v in (False, True):
        d = draft_config_dict(tiny_config(k_eq_v))
        assert "global_head_dim" not in d and "per_layer_config" in d
        cfg = f32_config(d)
        hub = {k: v for k, v in d.items() if k != "per_layer_config"}
        hub.update(global_head_dim=GLOBAL_HEAD_DIM, num_global_key_value_heads=GLOBAL_KV_HEADS)
        assert f32_config(hub) == cfg
        assert cfg.flavour == "gemma4" and cfg.model.num_hidden_layers == DRAFT_LAYERS
        assert cfg.model.head_dim == GLOBAL_HEAD_DIM
        # spec §4.5: global KV heads only with key-equals-value, otherwise the normal KV-head count
        assert cfg.model.num_key_value_heads == (GLOBAL_KV_HEADS if k_eq_v else KV_HEADS)
        assert cfg.gemma4 == Gemma4DraftGeometry("gelu_pytorch_tanh", CAP, k_eq_v, "proportional", 0.25, 2.0)
        assert f32_config(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(hidden_size_per_layer_input=256), "per-layer input"),
        (dict(enable_moe_block=True), "enable_moe_block"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(hidden_activation="swish"), "hidden_activation"),
        (dict(per_layer_config={"1": {"head_dim": 32}, "3": {"head_dim": 64}}), "per_layer_config"),
        (dict(per_layer_config=None), "global_head_dim"),
        (dict(rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 1e6}}), "rope_type"),
    ],
)
def test_config_refuses_unsupported_gemma4_targets(change, words):
    d = draft_config_dict(tiny_config(True), **change)
    with pytest.raises(UsageError, match=words):
        DraftConfig.from_hf_dict(d)


def test_rope_frequencies_match_transformers():
    model = hf_model(True)
    ours = jax.jit(gemma4_rope_frequencies, static_argnums=(0, 1, 2, 3, 4))(
        GLOBAL_HEAD_DIM, 1_000_000.0, "proportional", 0.25, 2.0
    )
    theirs = model.model.rotary_emb.full_attention_inv_freq.numpy()
    assert rel_err(ours, theirs) < 1e-6
    assert np.count_nonzero(np.asarray(ours)) == 4  # floor(0.25 * 32 / 2) rotated pairs


# ---------------------------------------------------------------------------------------------- one layer (parity)


@pytest.mark.parametrize("k_eq_v", [False, True], ids=["separate_v", "k_eq_v"])
def test_layer_matches_hf_full_attention_layer(k_eq_v):
    """Same weights as HF's full-attention layer: norms (x weight, f32), scale 1, q/k/v norms, k_eq_v, proportional
    RoPE, gelu-tanh MLP, sandwich norms and layer_scalar; also the context-injection path (spec §4.4)."""
    model = hf_model(k_eq_v, seed=1)
    hf_layer = model.model.layers[FULL_LAYER]
    assert hf_layer.self_attn.head_dim == GLOBAL_HEAD_DIM and (hf_layer.self_attn.v_proj is None) == k_eq_v
    config = f32_config(draft_config_dict(model.config))
    graphdef, state = abstract(lambda: Gemma4DecoderLayer(config, rngs=nnx.Rngs(0)))
    state = fill(state, layer_values_from_hf(state, hf_layer))

    rng = np.random.default_rng(0)
    b, t, s = 2, 6, 5
    x = rng.standard_normal((b, t, H)).astype(np.float32)
    u = rng.standard_normal((b, s, H)).astype(np.float32)
    ctx_pos = np.broadcast_to(np.arange(s), (b, s)).astype(np.int32)
    pos = np.stack([s + np.arange(t), 3 * s + np.arange(t)]).astype(np.int32)  # rows at different offsets

    def hf(inputs, positions, visible):
        xt, pt = torch.as_tensor(inputs), torch.as_tensor(positions, dtype=torch.long)
        cos_sin = model.model.rotary_emb(xt, pt, "full_attention")
        mask = torch.where(torch.as_tensor(np.array(visible))[:, None], 0.0, torch.finfo(torch.float32).min)
        with torch.no_grad():
            return hf_layer(
                xt, None, shared_kv_states={}, position_embeddings=cos_sin, attention_mask=mask, position_ids=pt
            ).numpy()

    # (a) no context, causal mask
    causal = np.broadcast_to(np.tril(np.ones((t, t), bool)), (b, t, t))
    ours = layer_with_context(
        graphdef, state, x, pos, np.zeros((b, 0, H), np.float32), np.zeros((b, 0), np.int32), causal
    )
    assert rel_err(ours, hf(x, pos, causal)) < TOL

    # (b) context rows injected as keys/values. HF sees rows u through input_layernorm, the draft sees the projected
    # context c directly (spec §4.1), so c := input_layernorm(u) makes the two identical on the block rows.
    with torch.no_grad():
        c = hf_layer.input_layernorm(torch.as_tensor(u)).numpy()
    ctx_visible = np.arange(s)[None, None, :] < np.array([3, 5])[:, None, None]  # row 0 sees 3 context rows, row 1 all
    block_mask = np.concatenate([np.broadcast_to(ctx_visible, (b, t, s)), np.ones((b, t, t), bool)], axis=-1)
    full_mask = np.concatenate(
        [
            np.concatenate(
                [np.broadcast_to(np.tril(np.ones((s, s), bool)), (b, s, s)), np.zeros((b, s, t), bool)], axis=-1
            ),
            block_mask,
        ],
        axis=1,
    )
    theirs = hf(np.concatenate([u, x], 1), np.concatenate([ctx_pos, pos], 1), full_mask)[:, s:]
    ours = layer_with_context(graphdef, state, x, pos, c, ctx_pos, block_mask)
    assert rel_err(ours, theirs) < TOL


# ------------------------------------------------------------------------------------ embedding and soft-capped logits


@pytest.mark.parametrize("hidden", [48, 64, 3072, 3840])
def test_embed_scale_rounds_like_transformers(hidden):
    for jdt, tdt in (("bfloat16", torch.bfloat16), ("float32", torch.float32)):
        theirs = torch.tensor(hidden**0.5).to(tdt).float().item()
        assert float(embed_scale(hidden, jdt)) == theirs


def test_embedding_and_softcapped_logits_match_hf():
    model = hf_model(True, seed=2, embed_std=0.5)
    ids = np.random.default_rng(1).integers(0, V, (2, 7))
    with torch.no_grad():
        out = model(torch.as_tensor(ids), output_hidden_states=True)
    hs0, hs_last, logits = out.hidden_states[0].numpy(), out.hidden_states[-1].numpy(), out.logits.numpy()
    # Facts the draft relies on: hidden_states[0] is already x sqrt(H) (spec §4.1); hidden_states[-1] is after the
    # final norm (so the last layer can't be a tap), and logits = cap * tanh(lm_head(it) / cap).
    table = model.model.embed_tokens.weight.detach().numpy()
    assert rel_err(hs0, table[ids] * np.sqrt(H)) < 1e-7
    assert np.abs(logits).max() > CAP / 2  # the cap is active, not a near-identity

    config = f32_config(draft_config_dict(model.config))
    graphdef, state = abstract(lambda: Draft(config, rngs=nnx.Rngs(0)))
    # every other weight is zero, which makes each layer the identity: h = norm(embedding) (layer_scalar = 1)
    values = {
        ("embed_tokens",): table,
        ("lm_head",): model.lm_head.weight.detach().numpy().T,
        ("norm", "weight"): model.model.norm.weight.detach().numpy(),
    }
    values.update({("layers", str(i), "layer_scalar"): np.ones(1, np.float32) for i in range(DRAFT_LAYERS)})
    h, base = embed_and_logits(graphdef, fill(state, values), ids.astype(np.int32), hs_last)
    with torch.no_grad():
        assert rel_err(h, model.model.norm(torch.as_tensor(hs0)).numpy()) < TOL
    assert rel_err(base, logits) < TOL


# ---------------------------------------------------------------------------------------- whole draft from a folder


def write_draft_checkpoint(folder, target, k_eq_v: bool, seed: int = 3) -> dict:
    """config.json + model.safetensors in the §5.2 Gemma4 layout; layer tensors come from an HF Gemma4 model with
    the draft's geometry (so names and shapes, layer_scalar included, are transformers'). Returns the tensors."""
    from safetensors.torch import save_file

    layers_src = hf_model(k_eq_v, seed=seed, layer_types=("full_attention",) * DRAFT_LAYERS)
    g = torch.Generator().manual_seed(seed)
    tensors = {k[len("model.") :]: v for k, v in layers_src.state_dict().items() if k.startswith("model.layers.")}
    m = len(TAP_IDS)
    tensors.update(
        {
            "embed_tokens.weight": target.model.embed_tokens.weight.detach(),
            "lm_head.weight": target.lm_head.weight.detach(),  # the target ties them; the draft stores two copies
            "fc.weight": 0.05 * torch.randn((H, m * H), generator=g),
            "hidden_norm.weight": 1.0 + 0.3 * torch.randn((H,), generator=g),
            "norm.weight": 1.0 + 0.3 * torch.randn((H,), generator=g),
            "markov_head.markov_w1.weight": 0.5 * torch.randn((V, MARKOV_RANK), generator=g),
            "markov_head.markov_w2.weight": 0.5 * torch.randn((V, MARKOV_RANK), generator=g),
            "confidence_head.proj.weight": 0.1 * torch.randn((1, H + MARKOV_RANK), generator=g),
            "confidence_head.proj.bias": torch.tensor([0.3]),
        }
    )
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in tensors.items()}
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(draft_config_dict(target.config)))
    return tensors


@pytest.mark.parametrize("k_eq_v", [False, True], ids=["separate_v", "k_eq_v"])
def test_draft_from_checkpoint_runs_on_hf_target_features(tmp_path, k_eq_v):
    target = hf_model(k_eq_v, seed=4)
    tensors = write_draft_checkpoint(tmp_path / "draft", target, k_eq_v)
    assert ("layers.0.self_attn.v_proj.weight" in tensors) != k_eq_v
    folder = str(tmp_path / "draft")
    with pytest.raises(UsageError, match="Gemma4"):  # no JAX Gemma4 target to bind it to
        load_draft(folder, None)
    handle = load_gemma4_draft(folder, dtype="float32")  # through conversion.convert.convert_state (§5.2 keymap)
    assert handle.config.flavour == "gemma4" and handle.config.gemma4.attention_k_eq_v == k_eq_v
    loaded = handle.state["layers"][1]["layer_scalar"][...]
    assert float(loaded[0]) == float(tensors["layers.1.layer_scalar"][0]) != 1.0

    # context features from the HF target: layer l output = hidden_states[l + 1], l = -1 -> hidden_states[0]
    ids = np.random.default_rng(5).integers(5, V, (2, 9))
    with torch.no_grad():
        hs = target(torch.as_tensor(ids), output_hidden_states=True).hidden_states
    assert len(hs) == len(TARGET_LAYER_TYPES) + 1
    taps = np.concatenate([hs[lid + 1].numpy() for lid in TAP_IDS], axis=-1)  # [2, 9, taps * H]
    anchors = np.array([7, 11], np.int32)
    prop, cache = handle.propose(taps, anchors)
    b = ids.shape[0]
    assert prop.tokens.shape == (b, BLOCK) and prop.base_logits.shape == (b, BLOCK, V)
    assert prop.hidden.shape == (b, BLOCK, H) and prop.confidence_logits.shape == (b, BLOCK)
    assert (cache.k.shape[2], cache.k.shape[-1]) == (handle.config.model.num_key_value_heads, GLOBAL_HEAD_DIM)
    for arr in (prop.base_logits, prop.logits, prop.confidence_logits, prop.hidden):
        assert np.all(np.isfinite(np.asarray(arr)))
    assert np.abs(np.asarray(prop.base_logits)).max() <= CAP  # soft-capped (spec §4.6)

    # cache path (push_context + block_hidden) = dense path (context_kv + layers_forward)
    assert rel_err(prop.hidden, dense_block(handle.graphdef, handle.state, taps, anchors)) < TOL

    # a batch equals its rows run one by one
    for i in range(b):
        row, _ = handle.propose(taps[i : i + 1], anchors[i : i + 1])
        assert np.array_equal(np.asarray(row.tokens[0]), np.asarray(prop.tokens[i]))
        assert rel_err(row.logits[0], prop.logits[i]) < TOL
        assert rel_err(row.confidence_logits[0], prop.confidence_logits[i]) < TOL
