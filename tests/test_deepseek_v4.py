"""DeepSeek-V4 target against transformers.DeepseekV4ForCausalLM on the tiny random config of V4 §6.1 (f32):
config dialects, logits and tapped block outputs through the real converter, cached chunks / verify blocks with
rollback equal to the full forward, and greedy generation (plain and speculative with a random draft)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV4ForCausalLM"):
    pytest.skip("this transformers has no DeepseekV4ForCausalLM (needs >= 5.8.1)", allow_module_level=True)

from conftest import hlo_instructions, rel_err  # noqa: E402

import dspark_jax as dj  # noqa: E402
from dspark_jax.configs import DeepseekV4Config  # noqa: E402
from dspark_jax.errors import UsageError  # noqa: E402
from dspark_jax.layers.v4_attention import v4_inv_freq  # noqa: E402
from dspark_jax.loading import DraftHandle  # noqa: E402
from dspark_jax.models import Draft  # noqa: E402
from dspark_jax.models.deepseek_v4 import attention_shape  # noqa: E402

TOL = 1e-5
# V4 §6.1: every layer type (SWA, CSA, HCA), hash routing on an SWA and a CSA layer, top-k routing elsewhere, active
# SwiGLU clamps, a binding window and top-k, and 16 indexer heads so the top-k never cuts among tied scores.
TINY = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 256,
    "hidden_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "qk_rope_head_dim": 8,
    "q_lora_rank": 32,
    "o_groups": 2,
    "o_lora_rank": 16,
    "sliding_window": 8,
    "compress_ratios": [0, 4, 128, 4, 128, 0, 0, 0, 0],
    "num_hash_layers": 2,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "index_n_heads": 16,
    "index_head_dim": 16,
    "index_topk": 8,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 1.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 1048576,
    "tie_word_embeddings": False,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "dspark_block_size": 5,
    "dspark_noise_token_id": 255,
    "dspark_target_layer_ids": [3, 4, 5],
    "dspark_markov_rank": 16,
}
SEQ = 300  # 2 HCA entries, 75 CSA entries (V4 §6.1)
SHORT = 173  # the ragged row
LAYERS = tuple(range(6))
TAPS = (-1, *LAYERS)  # -1: the embedding


def tiny_v4_hf(folder, seed: int = 0):
    """A tiny random transformers DeepSeek-V4 saved with save_pretrained; every tensor randomised (V4 §6.1):
    transformers starts tid2eid, sinks, router bias, ape and hc bases at zero and norms / hc scales at one."""
    torch.manual_seed(seed)
    fields = {k: v for k, v in TINY.items() if k not in ("architectures", "model_type")}
    cfg = transformers.DeepseekV4Config(**fields)
    model = transformers.DeepseekV4ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):  # k distinct experts per token
                k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
                b.copy_(torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(cfg.vocab_size)]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(0.5 * torch.randn(b.shape, generator=g))
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v4") / "target"
    model = tiny_v4_hf(folder)
    target = dj.load_target(str(folder), dtype="float32")
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 256, (2, SEQ)).astype(np.int32)
    logits, taps = target.forward(tokens, tap_layer_ids=TAPS)
    return dict(folder=str(folder), model=model, target=target, tokens=tokens, logits=np.asarray(logits), taps=taps)


def hf_forward(model, tokens):
    """(logits, block outputs averaged over the hc streams) of one row, as numpy."""
    raw = []
    hooks = [
        layer.register_forward_hook(lambda mod, args, out: raw.append(out.detach().numpy().mean(axis=2)))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            logits = model(torch.as_tensor(np.asarray(tokens)[None], dtype=torch.long)).logits.numpy()[0]
    finally:
        for h in hooks:
            h.remove()
    return logits, [r[0] for r in raw]


# ----------------------------------------------------------------------------------------------------- configs
def test_config_dialects_agree(pair):
    """The native config.json (V4 §1.2) and the folded one save_pretrained wrote give the same config."""
    folded = json.loads(open(f"{pair['folder']}/config.json").read())
    assert "layer_types" in folded and "compress_ratios" not in folded
    native = DeepseekV4Config.from_hf_dict(TINY)
    assert DeepseekV4Config.from_hf_dict(folded) == native
    assert native.compress_ratios == (0, 4, 128, 4, 128, 0)  # trailing draft-stage entries dropped
    assert native.rope_scaling == (
        ("beta_fast", 32.0),
        ("beta_slow", 1.0),
        ("factor", 16.0),
        ("original_max_position_embeddings", 65536.0),
    )
    assert DeepseekV4Config.from_hf_dict(native.to_hf_dict()) == native


def test_official_inference_dialect():
    """The official inference/config.json names (V4 §1.2) give the same config as the native ones."""
    from dspark_jax.configs.deepseek_v4 import OFFICIAL_NAMES

    native = {v: k for k, v in OFFICIAL_NAMES.items()}
    official = {native.get(k, k): v for k, v in TINY.items() if k not in ("rope_scaling", "model_type")}
    official.update(rope_factor=16, original_seq_len=65536, beta_fast=32, beta_slow=1)
    assert "dim" in official and "hidden_size" not in official
    assert DeepseekV4Config.from_hf_dict(official) == DeepseekV4Config.from_hf_dict(TINY)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda d: d.pop("compress_ratios"), "compress_ratios"),
        (lambda d: d.update(compress_ratios=[0, 4, 64, 4, 128, 0]), "compress_ratios"),
        (lambda d: d.update(compress_ratios=[0, 4]), "compress_ratios"),
        (lambda d: d.pop("num_hash_layers"), "num_hash_layers"),
        (lambda d: d["rope_scaling"].update(attention_factor=1.3), "attention_factor"),
        (lambda d: d.update(rope_scaling={"type": "linear", "factor": 2}), "rope_scaling"),
        (lambda d: d.update(num_key_value_heads=2), "num_key_value_heads"),
        (lambda d: d.update(o_groups=3), "o_groups"),
        (lambda d: d.update(scoring_func="sigmoid"), "scoring_func"),
    ],
)
def test_config_errors_are_one_line(change, field):
    d = json.loads(json.dumps(TINY))
    change(d)
    with pytest.raises(UsageError) as e:
        DeepseekV4Config.from_hf_dict(d)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_folded_config_errors_are_one_line(pair):
    folded = json.loads(open(f"{pair['folder']}/config.json").read())
    bad = dict(folded, mlp_layer_types=["moe", "hash_moe", "moe", "moe", "moe", "moe"])
    with pytest.raises(UsageError, match="mlp_layer_types"):
        DeepseekV4Config.from_hf_dict(bad)
    bad = dict(folded, layer_types=["sliding_attention", "full_attention"] + folded["layer_types"][2:])
    with pytest.raises(UsageError, match="layer_types"):
        DeepseekV4Config.from_hf_dict(bad)


def test_rope_tables_match_transformers(pair):
    """Main RoPE (base 10000) and compress RoPE (base 160000 + YaRN: pairs 2 and 3 change at d_r = 8, V4 §6.1)."""
    rotary = pair["model"].model.rotary_emb
    config = pair["target"].config
    main, compress = attention_shape(config, 0).inv_freq, attention_shape(config, 1).inv_freq
    np.testing.assert_array_equal(np.float32(main), rotary.main_inv_freq.numpy())
    np.testing.assert_array_equal(np.float32(compress), rotary.compress_inv_freq.numpy())
    plain = np.float32(v4_inv_freq(config.qk_rope_head_dim, config.compress_rope_theta))
    assert np.all(np.float32(compress)[:2] == plain[:2]) and np.all(np.float32(compress)[2:] < plain[2:])


def native_tensors(folder) -> dict:
    """The save_pretrained tensors under their native names (V4 §6.2 (c))."""
    from safetensors.numpy import load_file

    native = {}
    for key, value in load_file(f"{folder}/model.safetensors").items():
        key = key.removeprefix("model.").replace("embed_tokens.", "embed.").replace("hc_head.hc_", "hc_head_")
        native[key.replace(".attn.norm.", ".attn.kv_norm.")] = value
    return native


def test_native_checkpoint_names_load_the_same_params(pair, tmp_path):
    """The native layout (V4 §6.2 (c): no `model.`, `embed`, `hc_head_*`, `attn.kv_norm`; plus an `mtp.*` key that
    the target skips) converts to exactly the params of the save_pretrained folder."""
    from safetensors.numpy import save_file

    native = native_tensors(pair["folder"])
    native["mtp.0.main_norm.weight"] = np.ones(64, np.float32)
    assert "layers.1.attn.kv_norm.weight" in native and "hc_head_fn" in native
    save_file(native, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    got = dj.load_target(str(tmp_path), dtype="float32")
    want = dict(pair["target"].state.flat_state())
    for path, var in got.state.flat_state():
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(want[path][...]), err_msg=str(path))


# ------------------------------------------------------------------------------------------------------ parity
def test_logits_and_every_tap_match_transformers(pair):
    """A ragged batch (rows of 300 and 173 tokens, the short one right-padded) against transformers run on each
    row alone (its left-padded batches are no reference, V4 §6.1)."""
    taps = np.asarray(pair["taps"])
    for row, n in ((0, SEQ), (1, SHORT)):
        ref_logits, ref_taps = hf_forward(pair["model"], pair["tokens"][row, :n])
        assert rel_err(pair["logits"][row, :n], ref_logits) < TOL
        h = pair["target"].config.hidden_size
        for i in LAYERS:  # taps[..., :h] is the embedding (TAPS[0] = -1)
            got = taps[row, :n, (i + 1) * h : (i + 2) * h]
            assert rel_err(got, ref_taps[i]) < TOL, f"row {row} tap {i}"


E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)


def test_quantised_native_experts_and_matrices_dequantise_through_the_view(pair, tmp_path):
    """Native FP4 experts (packed I8 + E8M0 scales per 32 inputs) stack through DeepseekV4Source, and an FP8
    matrix with its 128x128 scale tile dequantises in the engine (V4 §3.2), each to the formula's value."""
    import ml_dtypes
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    native = native_tensors(pair["folder"])
    ffw, hidden = 32, 64
    want_w1 = np.empty((8, hidden, ffw), np.float32)
    for e in range(8):  # layer 2's routed experts as packed FP4
        codes = rng.integers(0, 16, (ffw, hidden)).astype(np.uint8)
        sbytes = rng.integers(124, 130, (ffw, hidden // 32)).astype(np.uint8)
        native[f"layers.2.ffn.experts.{e}.w1.weight"] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.int8)
        native[f"layers.2.ffn.experts.{e}.w1.scale"] = sbytes.view(ml_dtypes.float8_e8m0fnu)
        want_w1[e] = (E2M1[codes] * np.exp2(np.repeat(sbytes, 32, axis=1).astype(np.float32) - 127)).T
    wq_a = native["layers.0.attn.wq_a.weight"]  # [q_lora, hidden] as FP8 e4m3 with one scale tile (2^-1)
    fp8 = wq_a.astype(ml_dtypes.float8_e4m3fn)
    native["layers.0.attn.wq_a.weight"] = fp8
    native["layers.0.attn.wq_a.scale"] = np.full((1, 1), 126, np.uint8).view(ml_dtypes.float8_e8m0fnu)
    save_file(native, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    got = dj.load_target(str(tmp_path), dtype="float32").state
    np.testing.assert_array_equal(np.asarray(got["layers"][2]["ffn"]["gate_proj"][...]), want_w1)
    want_wq_a = (fp8.astype(np.float32) * 0.5).T
    np.testing.assert_array_equal(np.asarray(got["layers"][0]["attn"]["wq_a"][...]), want_wq_a)
    np.testing.assert_array_equal(
        np.asarray(got["layers"][2]["ffn"]["up_proj"][...]),
        np.asarray(pair["target"].state["layers"][2]["ffn"]["up_proj"][...]),
    )


def test_orbax_conversion_round_trip(pair, tmp_path):
    """python -m conversion.convert's path: safetensors -> orbax folder -> load_target gives the same params."""
    from conversion.loader import convert_checkpoint

    convert_checkpoint(pair["folder"], str(tmp_path / "orbax"), dtype="float32")
    got = dj.load_target(str(tmp_path / "orbax"), dtype="float32")
    assert got.config == pair["target"].config
    want = dict(pair["target"].state.flat_state())
    for path, var in got.state.flat_state():
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(want[path][...]), err_msg=str(path))


def test_in_memory_names_load_the_same_params(pair, tmp_path):
    """transformers' in-memory state_dict (V4 §6.2 (a): `self_attn.q_a_proj`, fused `gate_up_proj [E, 2I, H]`, ...)
    saved as is converts to exactly the params of the save_pretrained folder."""
    from safetensors.numpy import save_file

    tensors = {k: v.detach().numpy().copy() for k, v in pair["model"].state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in tensors
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    got = dj.load_target(str(tmp_path), dtype="float32")
    want = dict(pair["target"].state.flat_state())
    for path, var in got.state.flat_state():
        np.testing.assert_array_equal(np.asarray(var[...]), np.asarray(want[path][...]), err_msg=str(path))


@pytest.mark.slow
def test_sharded_experts_and_heads_match_one_device(pair):
    """On a (model=2, expert=2) mesh of CPU devices, experts split over `expert` (MoE in shard_map, 4 of the 8
    experts per shard) and query heads / vocab / expert width over `model`, the logits equal the
    single-device ones (already equal to transformers)."""
    from dspark_jax.sharding import make_mesh

    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (conftest forces 4 CPU devices)")
    mesh = make_mesh("model=2,expert=2")
    target = dj.load_target(pair["folder"], dtype="float32", mesh=mesh)
    wq_b = target.state["layers"][1]["attn"]["wq_b"][...]
    experts = target.state["layers"][2]["ffn"]["gate_proj"][...]
    assert wq_b.sharding.spec[1] == "model" and experts.sharding.spec[0] == "expert"
    with jax.set_mesh(mesh):
        logits, _ = target.forward(pair["tokens"])
    assert rel_err(np.asarray(logits), pair["logits"]) < TOL


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _chunk(graphdef, state, cache, tokens, positions):
    model = nnx.merge(graphdef, state)
    hidden, taps, cache = model(tokens, positions, cache, TAPS)
    return model.logits(hidden), taps, cache


def test_cached_chunks_and_rolled_back_verify_blocks_equal_full_forward(pair):
    """Prefill in 37-token chunks (borders off every multiple of 4), then verify blocks of 6 from position 222 on
    (crossing the 4-borders and the HCA border at 256) whose last rows carry wrong tokens; each block is rolled back
    to its correct prefix and the next block starts there. Every row with correct context equals the full
    forward, per row of a batch whose rows sit at different positions."""
    target = pair["target"]
    tokens, full = pair["tokens"], pair["logits"]
    full_taps = np.asarray(pair["taps"])
    bsz = tokens.shape[0]
    cache = target.module().init_cache(bsz, 320)
    run = functools.partial(_chunk, target.graphdef, target.state)
    chunk = 37
    for start in range(0, 222, chunk):
        n = min(chunk, 222 - start)
        pos = np.broadcast_to(np.arange(start, start + chunk, dtype=np.int32), (bsz, chunk))
        toks = np.zeros((bsz, chunk), np.int32)
        toks[:, :n] = tokens[:, start : start + n]  # the last chunk is right-padded past 222, like a prefill
        logits, taps, cache = run(cache, jnp.asarray(toks), jnp.asarray(pos))
        assert rel_err(np.asarray(logits)[:, :n], full[:, start : start + n]) < TOL
        assert rel_err(np.asarray(taps)[:, :n], full_taps[:, start : start + n]) < TOL
    rng = np.random.default_rng(1)
    # Row 1 accepts a different prefix length every round, so the rows drift apart in position.
    starts = np.array([222, 222], np.int32)
    width = 6
    checked = 0
    while np.all(starts + width <= SEQ):
        pos = starts[:, None] + np.arange(width, dtype=np.int32)[None, :]
        good = rng.integers(1, width + 1, size=bsz)  # rows [0, good) carry the true tokens
        toks = np.take_along_axis(tokens, pos, axis=1).copy()
        wrong = np.arange(width)[None, :] >= good[:, None]
        toks[wrong] = (toks[wrong] + 1 + rng.integers(0, 254, size=wrong.sum())) % 256
        logits, taps, cache = run(cache, jnp.asarray(toks), jnp.asarray(pos))
        for b in range(bsz):
            rows = slice(0, good[b])
            want = full[b, pos[b, rows]]
            assert rel_err(np.asarray(logits)[b, rows], want) < TOL, (b, starts[b], good[b])
            checked += good[b]
        starts = starts + good  # roll back: only the correct prefix is committed
    assert checked > 60


# ------------------------------------------------------------------------------------------------- generation
def hf_greedy(model, prompt, new_tokens):
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


NEW = 12


@pytest.fixture(scope="module")
def greedy_reference(pair):
    prompts = [pair["tokens"][0, :130].tolist(), pair["tokens"][1, :61].tolist()]
    return prompts, [hf_greedy(pair["model"], p, NEW) for p in prompts]


@pytest.mark.slow
def test_plain_greedy_generation_matches_transformers(pair, greedy_reference):
    prompts, want = greedy_reference
    out = dj.generate(pair["target"], None, prompts, max_new_tokens=NEW, stop_token_ids=[])
    assert out.tokens == want


def test_decode_loop_writes_each_window_in_place(pair):
    """A decode round copies no layer's sliding-window cache: the window history is read after the round's write.
    Read from the buffer before the write, XLA kept both and copied every layer's window twice a round (f32, batch
    16: 1.7-2.2 against 1.3 ms a round)."""
    from dspark_jax.decoding import loop

    target = pair["target"]
    prep = loop.prepare(target, None, [[5, 17, 99]] * 2, 8, 0.0, 1.0, 0, 0, "full", None)
    state = prep.prefill(target, None)
    hlo = loop.decode_loop.lower(*target.decode_parts(), None, None, state, 8, spec=prep.spec).compile().as_text()
    for shape in {layer.window.shape for layer in state.target_cache.layers}:
        assert hlo_instructions(hlo, "%copy", shape) == [], shape


def v4_bigram_draft(target, table: dict[int, int], *, seed: int = 3, strength: float = 12.0):
    """A Qwen3-flavour DSpark draft over the V4 target's geometry (taps: stream means of blocks 1 and 3) with random
    layers and a vanilla Markov head planting `table[prev]` after `prev` (draft_factory.bigram_draft's recipe), so
    blocks are partly accepted and the target's state is rolled back by varying amounts."""
    from draft_factory import bigram_draft  # noqa: F401  (same recipe; that helper needs a Qwen3 target config)

    t = target.config
    vocab = t.vocab_size
    geometry = dj.configs.Qwen3Config(
        vocab_size=vocab,
        hidden_size=t.hidden_size,
        num_hidden_layers=2,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        head_dim=t.head_dim,
        intermediate_size=64,
        rope_theta=t.rope_theta,
        max_position_embeddings=t.max_position_embeddings,
        dtype=t.dtype,
        param_dtype=t.param_dtype,
    )
    config = dj.configs.DraftConfig(
        model=geometry,
        block_size=5,
        num_target_layers=t.num_hidden_layers,
        target_layer_ids=(1, 3),
        mask_token_id=vocab - 1,
        markov_rank=vocab,
    )
    model = Draft(config, rngs=nnx.Rngs(seed))
    model.embed_tokens[...] = target.state["embed"][...]
    model.lm_head[...] = target.state["head"][...]
    w2 = np.zeros((vocab, vocab), np.float32)
    for prev, nxt in table.items():
        w2[prev, nxt] = strength
    model.markov_head.markov_w1[...] = jnp.eye(vocab, dtype=jnp.float32)
    model.markov_head.markov_w2[...] = jnp.asarray(w2)
    graphdef, state = nnx.split(model)
    return DraftHandle(config, graphdef, state, "<v4 bigram draft>")


@pytest.mark.slow
def test_speculative_greedy_equals_plain_with_a_random_draft(pair, greedy_reference):
    from draft_factory import bigram_table

    prompts, want = greedy_reference
    # Half of the table follows the target's greedy continuation, half is random: mixed acceptance lengths.
    table = bigram_table([p[-1:] + w for p, w in zip(prompts, want)])
    rng = np.random.default_rng(5)
    table = {a: (b if rng.random() < 0.5 else int(rng.integers(0, 256))) for a, b in table.items()}
    draft = v4_bigram_draft(pair["target"], table)
    out = dj.generate(pair["target"], draft, prompts, max_new_tokens=NEW, stop_token_ids=[])
    assert out.tokens == want
    accepted = [a for row in out.acceptance_lengths for a in row]
    assert max(accepted) > 1, accepted  # some drafts were accepted (and the rest rolled back)


def test_embedding_tap(pair):
    """Tap -1 is the embedding (all four streams start equal to it)."""
    emb = np.asarray(pair["target"].state["embed"][...])[pair["tokens"]]
    assert rel_err(np.asarray(pair["taps"])[..., :64], emb) < 1e-7


class _ManifestReader:
    """A reader over a committed manifest: keys, shapes and dtypes only (nothing to read)."""

    def __init__(self, tensors: dict):
        from conversion.reader import DTYPES, TensorSpec

        self._specs = {
            k: TensorSpec(k, tuple(v["shape"]), DTYPES[v["dtype"]], "", 0, int(np.prod(v["shape"])))
            for k, v in tensors.items()
        }

    def keys(self):
        return sorted(self._specs)

    def spec(self, key):
        return self._specs[key]


@pytest.mark.parametrize("name", ["deepseek-v4-flash", "deepseek-v4-pro"])
def test_full_size_manifests_cover_every_param(name):
    """V4 §6.2 full size: the Flash / Pro configs of the manifests build abstractly (nnx.eval_shape) and every
    native checkpoint key (FP8 with scales, packed FP4 experts, tid2eid) plans onto them with matching shapes: no
    unknown, missing or duplicate key; mtp.* skipped."""
    from conversion.engine import plan
    from conversion.keymaps.deepseek_v4 import DEEPSEEK_V4_KEYMAP, DEEPSEEK_V4_SKIP, DeepseekV4Source
    from conversion.loader import abstract_model
    from conversion.reader import load_manifest
    from dspark_jax.models.deepseek_v4 import DeepseekV4

    manifest = load_manifest(name)
    config = DeepseekV4Config.from_hf_dict(manifest["config"], name)
    _, abstract = abstract_model(DeepseekV4, config)
    total = sum(int(np.prod(v.get_value().shape)) for _, v in abstract.flat_state())
    assert round(total / 1e9) == {"deepseek-v4-flash": 284, "deepseek-v4-pro": 1573}[name]  # V4 §1.1: 284 B, 1.6 T
    found = plan(
        DeepseekV4Source(_ManifestReader(manifest["tensors"])),
        DEEPSEEK_V4_KEYMAP,
        abstract,
        source=name,
        skip=DEEPSEEK_V4_SKIP,
    )
    assert len(found) == len(list(abstract.flat_state()))
