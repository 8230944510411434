"""Qwen3 target against transformers.Qwen3ForCausalLM on tiny random checkpoints loaded through the real converter:
logits and every tapped layer output, chunked decoding through the KV cache, and greedy generation (API)."""

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

from conftest import rel_err, tiny_qwen3_hf  # noqa: E402

import dspark_jax as dj  # noqa: E402

TOL = 1e-5
# GQA ratios 1, 2 and 4; tied and untied; the last one also with linear RoPE scaling.
CONFIGS = {
    "gqa1_untied": dict(heads=4, kv_heads=4, head_dim=16, seed=1),
    "gqa2_tied": dict(heads=4, kv_heads=2, head_dim=16, tied=True, seed=2),
    "gqa4_untied_linear_rope": dict(
        heads=8, kv_heads=2, head_dim=8, seed=3, rope={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    ),
}
NEW_TOKENS = 32


def build_pair(tmp_path, name: str, **kw):
    """A tiny HF checkpoint folder, its torch model and our f32 Target loaded from the folder."""
    kw = {**CONFIGS[name], **kw}
    rope = kw.pop("rope", None)
    folder, model = tiny_qwen3_hf(tmp_path, **kw)
    if rope is not None:
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        cfg["rope_parameters"] = rope
        path.write_text(json.dumps(cfg))
        model = transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return types.SimpleNamespace(
        name=name, folder=str(folder), model=model, target=dj.load_target(str(folder), dtype="float32")
    )


def hf_forward(model, tokens):
    """(logits, HF hidden_states, raw output of every decoder layer) as numpy, from one torch forward."""
    raw = []

    def hook(module, args, out):
        raw.append((out[0] if isinstance(out, tuple) else out).detach().numpy().copy())

    hooks = [layer.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states], raw


def hf_greedy(model, prompt, new_tokens=NEW_TOKENS):
    ids = torch.tensor([prompt], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp(request.param), request.param)


def test_logits_and_every_tap_match_transformers(pair):
    c = pair.target.config
    assert pair.target.state["layers"][0]["self_attn"]["q_proj"][...].dtype == jnp.float32
    tokens = np.random.default_rng(0).integers(0, c.vocab_size, (2, 13))
    tap_ids = tuple(range(-1, c.num_hidden_layers))
    logits, taps = pair.target.forward(tokens, tap_ids)
    ref_logits, hidden_states, raw = hf_forward(pair.model, tokens)
    assert logits.dtype == jnp.float32 and logits.shape == ref_logits.shape
    assert rel_err(logits, ref_logits) < TOL
    taps = np.asarray(taps).reshape(*tokens.shape, len(tap_ids), c.hidden_size)
    assert rel_err(taps[:, :, 0], hidden_states[0]) < TOL  # tap -1 = the embedding output
    for j, layer in enumerate(tap_ids[1:], start=1):
        assert rel_err(taps[:, :, j], raw[layer]) < TOL, f"tap {layer}"
        if layer < c.num_hidden_layers - 1:  # HF's last hidden_states entry is after the final norm
            assert rel_err(taps[:, :, j], hidden_states[layer + 1]) < TOL, f"tap {layer}"


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _chunk(graphdef, state, tokens, positions, cache):
    """One Qwen3.__call__ through the cache (jitted: eager dispatch of every op is far slower on CPU)."""
    model = nnx.merge(graphdef, state)
    hidden, taps, cache = model(jnp.asarray(tokens, jnp.int32), positions, cache, tap_layer_ids=(0,))
    return model.logits(hidden), taps, cache


def test_cached_chunks_equal_full_forward(pair):
    """A 7-token prompt chunk then 1-token steps through init_cache equal one full forward; a row can also rewind
    (write at an earlier position) and then sees only its own prefix. Two chunk shapes only: two compilations."""
    c = pair.target.config
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, c.vocab_size, (2, 13))
    full_logits, _, raw = hf_forward(pair.model, tokens)
    target = pair.target
    cache = target.module().init_cache(2, 24)
    got, got_taps = [], []
    for start, stop in [(0, 7)] + [(i, i + 1) for i in range(7, 13)]:
        positions = jnp.broadcast_to(jnp.arange(start, stop, dtype=jnp.int32), (2, stop - start))
        logits, taps, cache = _chunk(target.graphdef, target.state, tokens[:, start:stop], positions, cache)
        got.append(logits)
        got_taps.append(taps)
    assert rel_err(jnp.concatenate(got, axis=1), full_logits) < TOL
    assert rel_err(jnp.concatenate(got_taps, axis=1), raw[0]) < TOL
    # Row 0 continues at position 13, row 1 rewinds to position 4: stale slots 4..12 must stay invisible.
    new = rng.integers(0, c.vocab_size, (2, 1))
    logits, _, cache = _chunk(target.graphdef, target.state, new, jnp.asarray([[13], [4]], jnp.int32), cache)
    for row, prefix in ((0, 13), (1, 4)):
        ref, _, _ = hf_forward(pair.model, np.concatenate([tokens[row, :prefix], new[row]])[None])
        assert rel_err(logits[row], ref[0, -1:]) < TOL, f"row {row}"


def test_greedy_generate_matches_transformers(pair):
    c = pair.target.config
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, c.vocab_size, n).tolist() for n in (7, 1, 12)]  # ragged batch
    result = dj.generate(pair.target, None, prompts=prompts, max_new_tokens=NEW_TOKENS)
    for i, prompt in enumerate(prompts):
        assert result.tokens[i] == hf_greedy(pair.model, prompt), f"prompt {i}"
    assert [len(t) for t in result.tokens] == [NEW_TOKENS] * 3
    # Plain decoding: every round commits exactly the target's token.
    assert all(set(a) == {1} for a in result.acceptance_lengths)
