"""Long prompts in bounded memory: chunked prefill through the caches, blocked cache attention, heads-major KV.

Chunked prefill must equal one pass over the whole prompt (logits at each row's last position, every valid cache
slot of the target and the draft), for ragged rows whose lengths straddle chunk borders; blocked attention must
equal the dense pass; greedy decoding of a prompt longer than a chunk (and a cache longer than one dense pass) must
equal transformers; and the compiled prefill's scratch memory must not grow with the prompt.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err, tiny_qwen3_hf
from draft_factory import bigram_draft, bigram_table, random_draft
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import dspark_jax as dj  # noqa: E402
from dspark_jax.cache import write_layer  # noqa: E402
from dspark_jax.configs import Qwen3Config  # noqa: E402
from dspark_jax.decoding import prefill as prefill_module  # noqa: E402
from dspark_jax.layers import attention  # noqa: E402
from dspark_jax.models import Qwen3  # noqa: E402

TOL = 1e-5
CHUNK = 8
LENS = (1, 7, 8, 9, 16, 23)  # around the borders of 8-token chunks; the longest leaves the 4th chunk unrun
BUCKET = 32
CACHE_LEN = 56  # not a multiple of the 16-slot key blocks below: the last block overlaps its predecessor
CONTEXT = 4096


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(our f32 target, the transformers model) with a context long enough for the long-prompt test."""
    folder, _ = tiny_qwen3_hf(tmp_path_factory.mktemp("prefill"), vocab=128, hidden=64, layers=2, seed=4)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["max_position_embeddings"] = CONTEXT
    path.write_text(json.dumps(cfg))
    hf = transformers.Qwen3ForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return dj.load_target(str(folder), dtype="float32"), hf


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 127, n) for n in LENS]
    padded = np.zeros((len(LENS), BUCKET), np.int32)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    return padded, np.array(LENS, np.int32)


@functools.partial(jax.jit, static_argnames=("target_def", "draft_def", "chunk", "taps", "attn"))
def _prefill(target_def, target_state, draft_def, draft_state, prompts, lens, *, chunk, taps, attn):
    """prefill_prompts under jit; `attn` ("dense" / "blocked") only keys the trace (set by monkeypatching)."""
    del attn
    target = nnx.merge(target_def, target_state)
    draft = None if draft_def is None else nnx.merge(draft_def, draft_state)
    last, cache, draft_cache = prefill_module.prefill_prompts(target, draft, prompts, lens, CACHE_LEN, taps, chunk)
    return target.logits(last), cache, draft_cache


@functools.partial(jax.jit, static_argnames=("target_def", "draft_def", "taps"))
def _all_at_once(target_def, target_state, draft_def, draft_state, prompts, *, taps):
    """The uncached forward over the whole bucket, and the draft cache from pushing all its taps in one call."""
    target, draft = nnx.merge(target_def, target_state), nnx.merge(draft_def, draft_state)
    positions = jnp.broadcast_to(jnp.arange(prompts.shape[1], dtype=jnp.int32), prompts.shape)
    _, features, _ = target(prompts, positions, None, taps)
    zeros = jnp.zeros((prompts.shape[0],), jnp.int32)
    return draft.push_context(draft.init_cache(prompts.shape[0], CACHE_LEN), features, zeros)


def assert_valid_slots_close(got, ref, lens):
    """Caches [layers, batch, kv_heads, cache_len, head_dim]: slots [0, lens[b]) of every row agree."""
    for b, n in enumerate(lens):
        for name in ("k", "v"):
            a, r = np.asarray(getattr(got, name))[:, b, :, :n], np.asarray(getattr(ref, name))[:, b, :, :n]
            assert rel_err(a, r) <= TOL, f"{name} row {b}"


@pytest.mark.parametrize("attn", ["dense", "blocked"])
@pytest.mark.parametrize("with_draft", [False, True], ids=["plain", "draft"])
def test_chunked_prefill_equals_one_pass(pair, prompts, with_draft, attn, monkeypatch):
    if attn == "blocked":  # 16-slot key blocks over the 56-slot cache: up to 4 blocks, the last overlapping
        monkeypatch.setattr(attention, "DENSE_CACHE_MAX", 16)
        monkeypatch.setattr(attention, "KEY_BLOCK", 16)
    target, hf = pair
    tokens, lens = prompts
    draft = random_draft(target, block_size=4, seed=1) if with_draft else None
    taps = draft.config.target_layer_ids if with_draft else ()
    ddef, dstate = (draft.graphdef, draft.state) if with_draft else (None, None)
    args = (target.graphdef, target.state, ddef, dstate, jnp.asarray(tokens), jnp.asarray(lens))
    logits, cache, draft_cache = _prefill(*args, chunk=CHUNK, taps=taps, attn=attn)
    one_logits, one_cache, _ = _prefill(*args, chunk=BUCKET, taps=taps, attn=attn)  # one chunk = the old prefill
    assert int(jnp.max(cache.lengths)) == 0  # lengths are the caller's
    for b, n in enumerate(lens):
        with torch.no_grad():
            ref = hf(torch.as_tensor(tokens[b : b + 1, :n], dtype=torch.long)).logits[0, -1].numpy()
        assert rel_err(logits[b], ref) <= TOL, f"row {b}"
        assert rel_err(one_logits[b], ref) <= TOL, f"row {b}, one pass"
    assert_valid_slots_close(cache, one_cache, lens)
    if with_draft:
        ref_cache = _all_at_once(target.graphdef, target.state, ddef, dstate, jnp.asarray(tokens), taps=taps)
        assert_valid_slots_close(draft_cache, ref_cache, lens)
    else:
        assert draft_cache is None


def _reference_attention(q, k, v, limits, scale):
    """numpy: q [b, t, n, h]; k, v [b, kh, s, h]; query (b, i) sees slots < limits[b, i], nothing -> zeros."""
    b, t, n, h = q.shape
    kh = k.shape[1]
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for i in range(t):
            m = limits[bi, i]
            if m <= 0:
                continue
            for head in range(n):
                kv = head // (n // kh)
                scores = k[bi, kv, :m] @ q[bi, i, head] * scale
                p = np.exp(scores - scores.max())
                out[bi, i, head] = (p / p.sum()) @ v[bi, kv, :m]
    return out


def test_key_block_per_backend():
    """CPU: one dense pass up to DENSE_CACHE_MAX slots, then KEY_BLOCK-slot blocks (measured there). Accelerators:
    blocks as large as ACCEL_SCORE_BYTES of f32 scores allow, never below KEY_BLOCK: a decode / verify pass reads a
    32k cache in one pass, a 512-row prefill chunk in blocks of 16k."""
    kb = attention.key_block_for
    assert kb("cpu", 256, attention.DENSE_CACHE_MAX) == attention.DENSE_CACHE_MAX
    assert kb("cpu", 256, 32768) == attention.KEY_BLOCK
    assert kb("gpu", 1 * 32 * 8, 32768) >= 32768  # batch 1, 32 query heads, 8 rows
    assert kb("gpu", 32 * 32 * 8, 32768) == 32768  # batch 32: 1 GiB of scores exactly
    assert kb("tpu", 32 * 512, 32768) == 16384  # a 512-row prefill chunk
    assert kb("gpu", 1 << 30, 32768) == attention.KEY_BLOCK
    for rows in (3, 100, 5000, 70000):  # a power of two whose scores fit the budget
        block = kb("gpu", rows, 1 << 20)
        assert block & (block - 1) == 0 and (block == attention.KEY_BLOCK or 4 * rows * block <= (1 << 30))


@pytest.mark.parametrize("t", [1, 8])
def test_blocked_attention_equals_dense(t):
    """cache_attention over 16-slot blocks (72 slots: the last block overlaps) = the dense pass = numpy, for
    limits 0 (zero output), full, and in between; GQA 4:2."""
    rng = np.random.default_rng(t)
    b, n, kh, h, s, layers = 4, 4, 2, 8, 72, 2
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k_all = rng.standard_normal((layers, b, kh, s, h)).astype(np.float32)
    v_all = rng.standard_normal((layers, b, kh, s, h)).astype(np.float32)
    limits = np.stack([np.zeros(t), np.full(t, s), 17 + np.arange(t), 40 + 3 * np.arange(t)]).astype(np.int32)
    ref = _reference_attention(q, k_all[1], v_all[1], limits, h**-0.5)
    qg = attention.group_queries(jnp.asarray(q), kh)

    @functools.partial(jax.jit, static_argnames=("key_block",))
    def run(qg, k_all, v_all, limits, key_block):
        p = attention.cache_attention(qg, k_all, v_all, 1, limits, h**-0.5, key_block=key_block)
        return attention.finish(p, jnp.float32)

    for key_block in (None, 16):  # None: 72 slots <= DENSE_CACHE_MAX, one dense pass
        got = np.asarray(run(qg, k_all, v_all, limits, key_block))
        assert rel_err(got, ref) <= TOL, f"key_block {key_block}"
        assert np.all(got[0] == 0)  # a query that sees nothing gets zeros
    mask = np.arange(s)[None, None, :] < limits[:, :, None]
    dense = attention.attend(jnp.asarray(q), jnp.asarray(k_all[1]), jnp.asarray(v_all[1]), jnp.asarray(mask), h**-0.5)
    assert rel_err(dense, ref) <= TOL


def test_long_prompt_greedy_matches_transformers(pair):
    """Prompts longer than one prefill chunk, in a cache longer than one dense attention pass (so prefill and
    decoding both read key blocks): plain greedy = transformers, and a speculative run = plain."""
    target, hf = pair
    assert max(prefill_module.PREFILL_CHUNK, attention.DENSE_CACHE_MAX) < 2100 < CONTEXT
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 127, n).tolist() for n in (2100, 700)]
    new = 12
    plain = dj.generate(target, None, prompts, max_new_tokens=new)
    for i, p in enumerate(prompts):
        ids = torch.tensor([p], dtype=torch.long)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False)
        assert plain.tokens[i] == out[0, len(p) :].tolist(), f"prompt {i}"
    table = bigram_table([p + t for p, t in zip(prompts, plain.tokens)])
    spec = dj.generate(target, bigram_draft(target, table, block_size=4), prompts, max_new_tokens=new)
    assert spec.tokens == plain.tokens
    assert max(max(a) for a in spec.acceptance_lengths) > 1  # some drafts were accepted


def _prefill_temp_bytes(bucket: int) -> int:
    """Scratch bytes of the compiled chunked prefill (abstract f32 weights; nothing runs)."""
    cfg = Qwen3Config(
        vocab_size=512,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        max_position_embeddings=2 * bucket,
    ).with_dtype("float32")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))

    def run(state, prompts, lens):
        target = nnx.merge(graphdef, state)
        last, cache, _ = prefill_module.prefill_prompts(target, None, prompts, lens, bucket + 64, ())
        return target.logits(last), cache

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    args = (abstract, jax.ShapeDtypeStruct((1, bucket), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    return jax.jit(run).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_prefill_scratch_memory_does_not_grow_with_the_prompt():
    """Scratch of a 16k-token prefill = that of a 4k one (the one-pass prefill's scores alone grew as t * cache_len:
    8 heads x 16k x 16k f32 = 8 GiB per layer)."""
    short, long = _prefill_temp_bytes(4096), _prefill_temp_bytes(16384)
    assert long <= short + 256 * 1024, (short, long)
    assert long < 64 * 2**20


def test_cache_layout_is_heads_major(pair):
    target, _ = pair
    cache = target.module().init_cache(2, 40)
    c = target.config
    assert cache.k.shape == (c.num_hidden_layers, 2, c.num_key_value_heads, 40, c.head_dim) and cache.cache_len == 40
    new = jnp.arange(2 * 3 * c.num_key_value_heads * c.head_dim, dtype=jnp.float32).reshape(
        2, 3, c.num_key_value_heads, c.head_dim
    )
    out = write_layer(cache.k, 1, new, jnp.array([5, 38], jnp.int32))  # row 1: the last slot is dropped
    np.testing.assert_array_equal(out[1, 0, :, 5:8], jnp.swapaxes(new[0], 0, 1))
    np.testing.assert_array_equal(out[1, 1, :, 38:40], jnp.swapaxes(new[1, :2], 0, 1))
    assert float(jnp.abs(out[1, 1, :, :38]).sum()) == 0 and float(jnp.abs(out[0]).sum()) == 0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cache_write_keeps_a_bf16_cache_narrow(dtype):
    """write_layer = a scatter of the new rows in the cache's dtype, bit for bit, with rows past the end dropped; a
    bf16 cache is written as its bits, so the compiled write holds no f32 copy of the stacked cache (XLA:CPU
    scattered into bf16 through one, twice per layer per step: half a bf16 model's step at batch 16)."""
    rng = np.random.default_rng(0)
    buf = jnp.asarray(rng.standard_normal((3, 2, 2, 40, 16)), dtype)
    new = jnp.asarray(rng.standard_normal((2, 3, 2, 16)), jnp.float32)
    starts = jnp.array([5, 38], jnp.int32)
    want = np.array(buf.astype(jnp.float32))
    want[1, 0, :, 5:8] = np.swapaxes(np.asarray(new[0].astype(dtype).astype(jnp.float32)), 0, 1)
    want[1, 1, :, 38:40] = np.swapaxes(np.asarray(new[1, :2].astype(dtype).astype(jnp.float32)), 0, 1)
    got = write_layer(buf, 1, new, starts)
    assert got.dtype == buf.dtype
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)
    hlo = jax.jit(write_layer, static_argnums=1).lower(buf, 1, new, starts).compile().as_text()
    assert dtype == "float32" or "f32[3,2,2,40,16]" not in hlo
