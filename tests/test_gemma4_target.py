"""Gemma4 target against transformers' Gemma4ForCausalLM / Gemma4ForConditionalGeneration on tiny random checkpoints
loaded through the real converter: logits and every tapped layer output (sliding and full-attention layers,
key-equals-value on and off, proportional RoPE, soft-capped logits, per-layer scalars), chunked decoding through the
KV cache (window masking, rewinds), greedy generation, and a Gemma4 DSpark pair whose speculative greedy output
equals plain greedy through dj.generate and the CLI.
"""

import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gemma4_hf = pytest.importorskip("transformers.models.gemma4")

from conftest import rel_err  # noqa: E402

import dspark_jax as dj  # noqa: E402
from conversion.export import export_draft  # noqa: E402
from conversion.loader import convert_checkpoint  # noqa: E402
from dspark_jax.configs import DraftConfig, Gemma4Config, Gemma4DraftGeometry, Qwen3Config  # noqa: E402
from dspark_jax.errors import UsageError  # noqa: E402
from dspark_jax.generate import main as generate_main  # noqa: E402
from dspark_jax.loading import DraftHandle  # noqa: E402
from dspark_jax.models import Draft  # noqa: E402

TOL = 1e-5
V, H, FFW = 256, 64, 96
HEADS, KV_HEADS, HEAD_DIM, GLOBAL_HEAD_DIM, GLOBAL_KV_HEADS = 4, 2, 16, 32, 1
WINDOW = 4  # shorter than every test sequence, so the window is active
CAP = 1.0
S, F = "sliding_attention", "full_attention"
CASES = {
    # separate value projection, tied head, plain full-attention RoPE
    "separate_v_tied": dict(layer_types=(S, F, S, F), k_eq_v=False, tied=True, factor=1.0, multimodal=False, seed=1),
    # key equals value (no v_proj, one global KV head), untied head, a full layer first
    "k_eq_v_untied": dict(layer_types=(F, S, S, F), k_eq_v=True, tied=False, factor=1.0, multimodal=False, seed=2),
    # the language model of a Gemma4ForConditionalGeneration checkpoint (model.language_model.*), RoPE factor 2
    "k_eq_v_multimodal": dict(layer_types=(S, S, F, S, F), k_eq_v=True, tied=True, factor=2.0, multimodal=True, seed=3),
}
NEW_TOKENS = 24


def text_config(layer_types, k_eq_v, tied, factor):
    """A tiny Gemma4 text config: per-layer input embeddings off (their default sizes are huge), no MoE."""
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
        sliding_window=WINDOW,
        final_logit_softcapping=CAP,
        layer_types=list(layer_types),
        rope_parameters={
            S: {"rope_type": "default", "rope_theta": 10_000.0},
            # proportional: floor(0.5 * 32 / 2) = 8 of 16 pairs rotate (spec §4.3)
            F: {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1_000_000.0, "factor": factor},
        },
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        attn_implementation="eager",
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )


def randomize(model, seed: int):
    """Norm scales and layer scalars away from 1, a wider embedding and stronger projections, so that each one
    matters, the soft-cap bites and greedy paths are not trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 2:  # projections: strong enough that greedy paths do not just repeat the last token
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


def build_case(folder, name: str):
    """Save a tiny random HF checkpoint of `name` to `folder`; return (torch model, its decoder layers)."""
    case = CASES[name]
    torch.manual_seed(case["seed"])
    tc = text_config(case["layer_types"], case["k_eq_v"], case["tied"], case["factor"])
    if case["multimodal"]:
        cfg = gemma4_hf.Gemma4Config(text_config=tc.to_dict(), vision_config=None, audio_config=None)
        model = gemma4_hf.Gemma4ForConditionalGeneration(cfg).eval()
        layers = model.model.language_model.layers
    else:
        model = gemma4_hf.Gemma4ForCausalLM(tc).eval()
        layers = model.model.layers
    randomize(model, case["seed"] + 100)
    if case["tied"]:
        model.tie_weights()
    model.save_pretrained(folder)
    if case["multimodal"]:  # a vision-tower tensor in the file: the converter must skip it, not refuse it
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "model.safetensors"))
        tensors["model.embed_vision.embedding_projection.weight"] = torch.zeros(H, 8)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return model, layers


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "target"
    model, layers = build_case(folder, request.param)
    target = dj.load_target(str(folder), dtype="float32")
    return types.SimpleNamespace(name=request.param, folder=str(folder), model=model, layers=layers, target=target)


def hf_forward(pair, tokens):
    """(soft-capped logits, raw output of every decoder layer, embedding output) as numpy from one torch forward."""
    raw = []

    def hook(module, args, out):
        raw.append((out[0] if isinstance(out, tuple) else out).detach().numpy().copy())

    hooks = [layer.register_forward_hook(hook) for layer in pair.layers]
    try:
        with torch.no_grad():
            out = pair.model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out.logits.numpy(), raw, out.hidden_states[0].numpy()


def hf_greedy(model, prompt, new_tokens=NEW_TOKENS):
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


# ------------------------------------------------------------------------------------------------------ parity


def test_config_and_params_from_checkpoint(pair):
    c, case = pair.target.config, CASES[pair.name]
    assert isinstance(c, Gemma4Config) and c.layer_types == case["layer_types"]
    assert (c.head_dim, c.num_key_value_heads, c.sliding_window) == (HEAD_DIM, KV_HEADS, WINDOW)
    # transformers: the global KV-head count applies only with key-equals-value
    assert c.draft_geometry == (GLOBAL_HEAD_DIM, GLOBAL_KV_HEADS if case["k_eq_v"] else KV_HEADS)
    assert c.full_rope == (1_000_000.0, "proportional", 0.5, case["factor"]) and c.final_logit_softcapping == CAP
    state = pair.target.state
    for i, kind in enumerate(c.layer_types):
        attn = state["layers"][i]["self_attn"]
        assert ("v_proj" in attn) == (kind == S or not case["k_eq_v"]), f"layer {i}"
        assert attn["k_proj"][...].shape[-1] == (HEAD_DIM if kind == S else GLOBAL_HEAD_DIM)
        hf_scalar = float(pair.layers[i].layer_scalar[0])
        assert float(state["layers"][i]["layer_scalar"][...][0]) == hf_scalar != 1.0
    assert ("lm_head" in state) == (not case["tied"])


def test_logits_and_every_tap_match_transformers(pair):
    c = pair.target.config
    tokens = np.random.default_rng(0).integers(0, V, (2, 13))
    tap_ids = tuple(range(-1, c.num_hidden_layers))
    logits, taps = pair.target.forward(tokens, tap_ids)
    ref_logits, raw, embedded = hf_forward(pair, tokens)
    assert np.abs(ref_logits).max() > CAP / 2  # the soft-cap is active, not a near-identity
    assert logits.dtype == jnp.float32 and rel_err(logits, ref_logits) < TOL
    assert np.array_equal(np.argmax(logits, -1), np.argmax(ref_logits, -1))
    taps = np.asarray(taps).reshape(*tokens.shape, len(tap_ids), H)
    assert rel_err(taps[:, :, 0], embedded) < TOL  # tap -1: the embedding output after the sqrt(H) scaling
    for j, layer in enumerate(tap_ids[1:], start=1):
        assert rel_err(taps[:, :, j], raw[layer]) < TOL, f"tap {layer} ({c.layer_types[layer]})"


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _chunk(graphdef, state, tokens, positions, cache):
    model = nnx.merge(graphdef, state)
    hidden, taps, cache = model(jnp.asarray(tokens, jnp.int32), positions, cache, tap_layer_ids=(0,))
    return model.logits(hidden), taps, cache


def test_cached_chunks_equal_full_forward(pair):
    """A 6-token chunk then 1-token steps through init_cache equal one full forward (the window slides past the
    chunk); a row can also rewind and then sees only its own prefix."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, V, (2, 13))
    full_logits, raw, _ = hf_forward(pair, tokens)
    target = pair.target
    cache = target.module().init_cache(2, 24)
    got, got_taps = [], []
    for start, stop in [(0, 6)] + [(i, i + 1) for i in range(6, 13)]:
        positions = jnp.broadcast_to(jnp.arange(start, stop, dtype=jnp.int32), (2, stop - start))
        logits, taps, cache = _chunk(target.graphdef, target.state, tokens[:, start:stop], positions, cache)
        got.append(logits)
        got_taps.append(taps)
    assert rel_err(jnp.concatenate(got, axis=1), full_logits) < TOL
    assert rel_err(jnp.concatenate(got_taps, axis=1), raw[0]) < TOL
    # Row 0 continues at position 13, row 1 rewinds to position 7: stale slots 7..12 must stay invisible.
    new = rng.integers(0, V, (2, 1))
    logits, _, _ = _chunk(target.graphdef, target.state, new, jnp.asarray([[13], [7]], jnp.int32), cache)
    for row, prefix in ((0, 13), (1, 7)):
        ref, _, _ = hf_forward(pair, np.concatenate([tokens[row, :prefix], new[row]])[None])
        assert rel_err(logits[row], ref[0, -1:]) < TOL, f"row {row}"


@pytest.mark.slow
def test_greedy_generate_matches_transformers(pair):
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, V, n).tolist() for n in (7, 1, 12)]  # ragged batch
    result = dj.generate(pair.target, None, prompts=prompts, max_new_tokens=NEW_TOKENS)
    for i, prompt in enumerate(prompts):
        assert result.tokens[i] == hf_greedy(pair.model, prompt), f"prompt {i}"
    assert all(set(a) == {1} for a in result.acceptance_lengths)
    assert len(set(sum(result.tokens, []))) > 5  # not a model that only repeats its last token


def test_orbax_conversion_round_trip(pair, tmp_path):
    if pair.name != "k_eq_v_multimodal":
        pytest.skip("one layout is enough for the orbax path")
    dst = tmp_path / "orbax"
    convert_checkpoint(pair.folder, str(dst), dtype="float32")
    loaded = dj.load_target(str(dst), dtype="float32")
    assert loaded.config == pair.target.config
    mine = dict(pair.target.state.flat_state())
    for path, var in loaded.state.flat_state():
        assert np.array_equal(np.asarray(var.get_value()), np.asarray(mine[path].get_value())), path


# ------------------------------------------------------------------------------------------ speculative pair


def gemma4_draft(target, table: dict[int, int], *, seed: int = 0, strength: float = 12.0) -> DraftHandle:
    """A Gemma4-flavour draft (spec §4.5) bound to `target`, whose vanilla Markov head (rank = vocab) proposes
    table[prev] after prev: blocks follow the target where its greedy path is bigram-predictable, so acceptance
    lengths vary. The backbone is random."""
    c = target.config
    theta, rope_type, partial, factor = c.full_rope
    head_dim, kv_heads = c.draft_geometry
    model_cfg = Qwen3Config(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=c.intermediate_size,
        rope_theta=theta,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
        dtype="float32",
        param_dtype="float32",
    )
    config = DraftConfig(
        model=model_cfg,
        block_size=4,
        num_target_layers=c.num_hidden_layers,
        target_layer_ids=tuple(range(-1, c.num_hidden_layers - 1))[-3:],
        mask_token_id=4,
        markov_rank=c.vocab_size,
        enable_confidence_head=True,
        confidence_head_with_markov=True,
        gemma4=Gemma4DraftGeometry(
            c.hidden_activation, c.final_logit_softcapping, c.attention_k_eq_v, rope_type, partial, factor
        ),
    )
    model = Draft(config, rngs=nnx.Rngs(seed))
    ts = target.state
    model.embed_tokens[...] = ts["embed_tokens"][...]
    model.lm_head[...] = ts["embed_tokens"][...].T if c.tie_word_embeddings else ts["lm_head"][...]
    w2 = np.zeros((c.vocab_size, c.vocab_size), np.float32)
    for prev, nxt in table.items():
        w2[prev, nxt] = strength
    model.markov_head.markov_w1[...] = jnp.eye(c.vocab_size, dtype=jnp.float32)
    model.markov_head.markov_w2[...] = jnp.asarray(w2)
    graphdef, state = nnx.split(model)
    return DraftHandle(config, graphdef, state, "<gemma4 bigram draft>")


@pytest.mark.slow
def test_speculative_greedy_equals_plain_api_and_cli(pair, tmp_path, capsys):
    if pair.name != "k_eq_v_multimodal":
        pytest.skip("one pair, on the release-like layout (multimodal checkpoint, key-equals-value, tied head)")
    # The greedy test's prompts and length: the plain loop compiled there is reused.
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, V, n).tolist() for n in (7, 1, 12)]
    plain = dj.generate(pair.target, None, prompts=prompts, max_new_tokens=NEW_TOKENS)
    table = {}
    for p, t in zip(prompts, plain.tokens):
        seq = p + t
        table.update({a: b for a, b in zip(seq[:-1], seq[1:]) if a not in table})
    # A wrong successor for every third token: blocks then break off at varied slots (rejections, not only accepts).
    table = {a: (b + 1) % V if a % 3 == 0 else b for a, b in table.items()}
    # Through a DeepSpec-layout folder: load_draft binds the target's embedding / LM head (and checks the copies).
    draft_dir = tmp_path / "draft"
    handle = gemma4_draft(pair.target, table)
    export_draft(str(draft_dir), handle.config, handle.state, dtype="float32")
    draft = dj.load_draft(str(draft_dir), pair.target)
    assert draft.config.flavour == "gemma4"
    spec = dj.generate(pair.target, draft, prompts=prompts, max_new_tokens=NEW_TOKENS)
    assert spec.tokens == plain.tokens
    accepted = [a for row in spec.acceptance_lengths for a in row]
    # drafts were accepted, and also rejected: both branches of the verification ran
    assert max(accepted) > 1 and min(accepted) < draft.config.block_size + 1, accepted

    # The CLI on the same prompts (same batch bucket and length, so the same compiled loop).
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt_ids": p}) + "\n" for p in prompts))
    capsys.readouterr()
    argv = ["--target", pair.folder, "--draft", str(draft_dir), "--prompts-file", str(prompts_file)]
    argv += ["--max-new-tokens", str(NEW_TOKENS), "--dtype", "float32", "--json"]
    assert generate_main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["tokens"] for p in out["prompts"]] == plain.tokens
    assert out["tau"] > 1.0


# ----------------------------------------------------------------------------------------- configs and errors


def hf_dict(**changes) -> dict:
    d = json.loads(text_config((S, F, S, F), True, True, 1.0).to_json_string())
    d.update(changes)
    return d


def test_config_from_both_head_dim_layouts():
    """transformers >= 5.2x writes per_layer_config; hub files carry global_head_dim / num_global_key_value_heads."""
    for k_eq_v in (False, True):
        d = hf_dict(attention_k_eq_v=k_eq_v)
        if not k_eq_v:
            d["per_layer_config"] = {k: {"head_dim": GLOBAL_HEAD_DIM} for k in d["per_layer_config"]}
        hub = {k: v for k, v in d.items() if k != "per_layer_config"}
        hub.update(global_head_dim=GLOBAL_HEAD_DIM, num_global_key_value_heads=GLOBAL_KV_HEADS)
        assert Gemma4Config.from_hf_dict(hub) == Gemma4Config.from_hf_dict(d)
        multimodal = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4", "text_config": d}
        assert Gemma4Config.from_hf_dict(multimodal) == Gemma4Config.from_hf_dict(d)


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(enable_moe_block=True), "enable_moe_block"),
        (dict(hidden_size_per_layer_input=256), "hidden_size_per_layer_input"),
        (dict(num_kv_shared_layers=2), "num_kv_shared_layers"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(use_bidirectional_attention="all"), "use_bidirectional_attention"),
        (dict(hidden_activation="swish"), "hidden_activation"),
        (dict(layer_types=[S, F, "chunked_attention", F]), "layer_types"),
        (dict(per_layer_config={"1": {"head_dim": 32}, "3": {"head_dim": 64}}), "full_attention layers differ"),
        (dict(rope_parameters={F: {"rope_type": "yarn", "rope_theta": 1e6}, S: {"rope_theta": 1e4}}), "rope_type"),
    ],
)
def test_unsupported_features_are_refused_by_name(tmp_path, change, field):
    d = hf_dict(**change)
    with pytest.raises(UsageError, match=field):
        Gemma4Config.from_hf_dict(d)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(UsageError, match=field):  # load_target refuses before reading any weights
        dj.load_target(str(tmp_path), dtype="float32")


def test_draft_and_target_families_must_match():
    gemma4 = Gemma4Config.from_hf_dict(hf_dict())
    qwen3 = Qwen3Config(V, H, 4, HEADS, KV_HEADS, HEAD_DIM, FFW)
    geometry = Gemma4DraftGeometry("gelu_pytorch_tanh", CAP, True, "proportional", 0.5, 1.0)
    model = Qwen3Config(V, H, 2, HEADS, GLOBAL_KV_HEADS, GLOBAL_HEAD_DIM, FFW)
    g_draft = DraftConfig(model, 4, 4, (0, 1), 4, gemma4=geometry)
    g_draft.check_target(gemma4)  # matches: global head dim / KV heads (spec §4.5)
    with pytest.raises(UsageError, match="gemma4-flavour draft but the target is a Qwen3"):
        g_draft.check_target(qwen3)
    q_draft = DraftConfig(Qwen3Config(V, H, 2, HEADS, KV_HEADS, HEAD_DIM, FFW), 4, 4, (0, 1), 4)
    with pytest.raises(UsageError, match="qwen3-flavour draft but the target is a Gemma4"):
        q_draft.check_target(gemma4)
