"""Tests for the speculative-decoding acceptance step: Pallas kernels == jnp reference == a NumPy tree walk.

Runs on CPU (kernels in interpret mode); the GPU/TPU tests run the compiled kernels only on those backends.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chi2

from pallas_kernels import _common
from pallas_kernels.verify import (
    gpu_config,
    tpu_config,
    verify,
    verify_gpu,
    verify_reference,
    verify_reference_onehot,
    verify_tpu,
)
from pallas_kernels.verify.reference import inverse_cdf

# Shared shapes so the interpret-mode kernels compile once per variant for all scenario tests.
BATCH, NODES, VOCAB, BLOCK = 16, 6, 1000, 256
VARIANTS = ("gpu", "tpu")


# --------------------------------------------------------------------------------------------------------------
# NumPy model: the rule as literally stated (recursive walk over explicit children lists), f32 arithmetic.


def numpy_verify(tokens, parents, num_proposed, target, draft, uniforms, residual_u):
    """Returns (accept_len i32[B], accepted_nodes i32[B, N], next_token i32[B])."""
    batch, nodes = tokens.shape
    vocab = target.shape[-1]
    alen = np.zeros(batch, np.int32)
    paths = np.full((batch, nodes), -1, np.int32)
    nxt = np.zeros(batch, np.int32)
    one = np.float32(1.0)
    for b in range(batch):
        k = int(np.clip(num_proposed[b], 0, nodes))
        children = {}
        for j in range(k):
            children.setdefault(int(parents[b, j]), []).append(j)
        cur, dist, path = -1, target[b, 0].astype(np.float32), []
        while True:
            moved = False
            for c in children.get(cur, []):
                x = int(np.clip(tokens[b, c], 0, vocab - 1))
                ratio = np.float32(dist[x]) / np.maximum(np.float32(draft[b, c, x]), np.float32(1e-8))
                if uniforms[b, c] < min(one, ratio):
                    cur, dist, moved = c, target[b, c + 1].astype(np.float32), True
                    path.append(c)
                    break
                resid = np.maximum(dist - draft[b, c], np.float32(0.0))
                mass = resid.sum(dtype=np.float32)
                if mass > 1e-8:
                    dist = resid * (one / mass)
            if not moved:
                break
        alen[b] = len(path)
        paths[b, : len(path)] = path
        cs = np.cumsum(dist, dtype=np.float32)
        hits = np.nonzero(cs > residual_u[b] * cs[-1])[0]
        nz = np.nonzero(dist > 0)[0]
        last = int(nz[-1]) if nz.size else -1
        tok = min(int(hits[0]), last) if hits.size else last
        nxt[b] = max(tok, 0)
    return alen, paths, nxt


def greedy_expected(tokens, parents, num_proposed, target):
    """Temperature-0 semantics: follow the first proposed child whose token is the target argmax."""
    batch, nodes = tokens.shape
    alen = np.zeros(batch, np.int32)
    nxt = np.zeros(batch, np.int32)
    for b in range(batch):
        k = int(np.clip(num_proposed[b], 0, nodes))
        cur = -1
        while True:
            want = int(np.argmax(target[b, cur + 1]))
            match = [j for j in range(k) if parents[b, j] == cur and tokens[b, j] == want]
            if not match:
                nxt[b] = want
                break
            cur = match[0]
            alen[b] += 1
    return alen, nxt


# --------------------------------------------------------------------------------------------------------------
# Input builders (numpy, f32).


def random_probs(rng, shape, concentration=0.3):
    x = rng.gamma(concentration, size=shape).astype(np.float64) + 1e-12
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


def sample_tokens(rng, draft):
    """tokens[b, j] ~ draft[b, j] (inverse CDF in float64)."""
    cs = np.cumsum(draft.astype(np.float64), axis=-1)
    u = rng.random(draft.shape[:-1])[..., None] * cs[..., -1:]
    return np.minimum((cs <= u).sum(-1), draft.shape[-1] - 1).astype(np.int32)


def chain_parents(batch, nodes):
    return np.tile(np.arange(-1, nodes - 1, dtype=np.int32), (batch, 1))


def random_tree_parents(rng, batch, nodes):
    return np.array([[rng.integers(-1, j) if j else -1 for j in range(nodes)] for _ in range(batch)], np.int32)


def one_hot(idx, vocab):
    return np.eye(vocab, dtype=np.float32)[idx]


def sampled_case(rng, parents, num_proposed, vocab=VOCAB, concentration=0.3, mix=0.5):
    """Random target/draft (draft = mix of the target row at the parent and noise, so some accept)."""
    batch, nodes = parents.shape
    target = random_probs(rng, (batch, nodes + 1, vocab), concentration)
    at_parent = np.take_along_axis(target, (parents + 1)[:, :, None], axis=1)
    draft = (mix * at_parent + (1 - mix) * random_probs(rng, (batch, nodes, vocab), concentration)).astype(np.float32)
    tokens = sample_tokens(rng, draft)
    uniforms = rng.random((batch, nodes), dtype=np.float32)
    residual_u = rng.random(batch, dtype=np.float32)
    return tokens, parents, np.asarray(num_proposed, np.int32), target, draft, uniforms, residual_u


def run_all(case, variants=VARIANTS, block=BLOCK):
    """Check kernel(s) == reference == NumPy on `case`; return the reference result as numpy arrays."""
    args = tuple(jnp.asarray(a) for a in case)
    ref = [np.asarray(x) for x in verify_reference(*args)]
    want = numpy_verify(*case)
    for name, got, exp in zip(("accept_len", "accepted_nodes", "next_token"), ref, want):
        np.testing.assert_array_equal(got, exp, err_msg=f"reference vs numpy: {name}")
    for variant in variants:
        out = verify(*args, impl="pallas", interpret=True, block_v=block, platform=variant)
        for name, got, exp in zip(("accept_len", "accepted_nodes", "next_token"), out, ref):
            np.testing.assert_array_equal(np.asarray(got), exp, err_msg=f"{variant} kernel vs reference: {name}")
    return ref


# --------------------------------------------------------------------------------------------------------------
# Equality on constructed scenarios.


def test_nothing_accepted():
    rng = np.random.default_rng(0)
    tokens, parents, k, target, draft, u, ru = sampled_case(rng, chain_parents(BATCH, NODES), [NODES] * BATCH)
    # Target puts no mass on any drafted token, so every ratio is 0 whatever the uniforms.
    for b in range(BATCH):
        target[b, :, tokens[b]] = 0.0
    target /= target.sum(-1, keepdims=True)
    alen, path, nxt = run_all((tokens, parents, k, target, draft, u, ru))
    assert (alen == 0).all() and (path == -1).all()
    assert (target[np.arange(BATCH), 0, nxt] > 0).all()


def test_everything_accepted_gives_bonus_token():
    rng = np.random.default_rng(1)
    parents = chain_parents(BATCH, NODES)
    k = rng.integers(1, NODES + 1, BATCH)
    tokens, parents, k, target, _, u, ru = sampled_case(rng, parents, k)
    draft = target[:, :-1].copy()  # draft == target at the parent: ratio 1 > any U(0,1)
    tokens = sample_tokens(rng, draft)
    alen, path, nxt = run_all((tokens, parents, k, target, draft, u, ru))
    np.testing.assert_array_equal(alen, k)
    for b in range(BATCH):
        np.testing.assert_array_equal(path[b], np.where(np.arange(NODES) < k[b], np.arange(NODES), -1))
    # Bonus token drawn from target row k (after the last node).
    bonus = np.asarray(inverse_cdf(jnp.asarray(target[np.arange(BATCH), k]), jnp.asarray(ru)))
    np.testing.assert_array_equal(nxt, bonus)


def test_eos_token_mid_block_does_not_stop_acceptance():
    rng = np.random.default_rng(2)
    eos = 2
    tokens = rng.integers(3, VOCAB, (BATCH, NODES)).astype(np.int32)
    tokens[:, 2] = eos
    bonus = rng.integers(0, VOCAB, BATCH)
    target = one_hot(np.concatenate([tokens, bonus[:, None]], axis=1), VOCAB)
    draft = one_hot(tokens, VOCAB)
    k = np.full(BATCH, NODES, np.int32)
    case = (
        tokens,
        chain_parents(BATCH, NODES),
        k,
        target,
        draft,
        rng.random((BATCH, NODES), dtype=np.float32),
        rng.random(BATCH, dtype=np.float32),
    )
    alen, _, nxt = run_all(case)
    np.testing.assert_array_equal(alen, NODES)
    np.testing.assert_array_equal(nxt, bonus)


def test_ragged_rows_including_zero_proposed():
    rng = np.random.default_rng(3)
    k = np.arange(BATCH) % (NODES + 1)  # 0..NODES, every value at least twice
    tokens = rng.integers(-1, VOCAB, (BATCH, NODES)).astype(np.int32)
    case = sampled_case(rng, chain_parents(BATCH, NODES), k)
    # Garbage (including -1) in unproposed slots must be ignored.
    case_tokens = np.where(np.arange(NODES)[None, :] < k[:, None], case[0], tokens)
    alen, path, nxt = run_all((case_tokens, *case[1:]))
    assert (alen <= k).all()
    for b in np.nonzero(k == 0)[0]:
        assert alen[b] == 0 and (path[b] == -1).all()
    root = np.asarray(inverse_cdf(jnp.asarray(case[3][:, 0]), jnp.asarray(case[6])))
    np.testing.assert_array_equal(nxt[k == 0], root[k == 0])


def test_greedy_trees_with_several_children():
    rng = np.random.default_rng(4)
    # Tokens from a small alphabet so that some child matches the argmax and some siblings do not.
    alphabet = rng.choice(VOCAB, 4, replace=False)
    parents = random_tree_parents(rng, BATCH, NODES)
    parents[0] = [-1, -1, -1, 0, 1, 1]  # a fixed tree: root -> {0, 1, 2}, 0 -> {3}, 1 -> {4, 5}
    tokens = alphabet[rng.integers(0, 4, (BATCH, NODES))].astype(np.int32)
    argmax = alphabet[rng.integers(0, 4, (BATCH, NODES + 1))]
    tokens[0] = [10, 11, 12, 13, 14, 15]
    argmax[0, [0, 2, 6]] = [11, 15, 99]  # accept child 1 (after rejecting 0), then 5 (after rejecting 4)
    k = rng.integers(0, NODES + 1, BATCH).astype(np.int32)
    k[0] = NODES
    target = one_hot(argmax, VOCAB)
    draft = one_hot(tokens, VOCAB)
    case = (
        tokens,
        parents,
        k,
        target,
        draft,
        rng.random((BATCH, NODES), dtype=np.float32),
        rng.random(BATCH, dtype=np.float32),
    )
    alen, path, nxt = run_all(case)
    exp_len, exp_next = greedy_expected(tokens, parents, k, target)
    np.testing.assert_array_equal(alen, exp_len)
    np.testing.assert_array_equal(nxt, exp_next)
    assert alen[0] == 2 and list(path[0, :3]) == [1, 5, -1] and nxt[0] == 99
    assert (alen > 0).sum() >= 4 and (alen > 1).sum() >= 2  # the batch really exercises the tree walk


@pytest.mark.parametrize("seed", range(6))
def test_random_sampled_chains(seed):
    rng = np.random.default_rng(100 + seed)
    k = rng.integers(0, NODES + 1, BATCH)
    run_all(sampled_case(rng, chain_parents(BATCH, NODES), k, concentration=0.5 + seed / 4, mix=seed / 6))


@pytest.mark.parametrize("seed", range(3))
def test_random_sampled_trees(seed):
    rng = np.random.default_rng(200 + seed)
    k = rng.integers(0, NODES + 1, BATCH)
    alen, _, _ = run_all(sampled_case(rng, random_tree_parents(rng, BATCH, NODES), k, mix=0.7))
    assert alen.max() >= 1


def test_rejected_sibling_residual_feeds_next_sibling():
    # Root target = 0.5 on token a, 0.5 on b. Child 0 drafts a (one-hot): ratio 0.5 < u = 0.7 -> rejected,
    # residual = one-hot(b). Child 1 drafts b: against the residual its ratio is 1 -> accepted; tested against
    # the stale root target it would be 0.5 < 0.7 and rejected.
    rng = np.random.default_rng(12)
    tokens, parents, k, target, _, _, ru = sampled_case(rng, random_tree_parents(rng, BATCH, NODES), [NODES] * BATCH)
    parents[:, :2] = -1
    a, b = rng.choice(VOCAB, (2, BATCH))
    b = np.where(a == b, (a + 1) % VOCAB, b)
    tokens[:, 0], tokens[:, 1] = a, b
    target[:, 0] = 0.5 * (one_hot(a, VOCAB) + one_hot(b, VOCAB))
    draft = random_probs(rng, (BATCH, NODES, VOCAB))
    draft[:, 0], draft[:, 1] = one_hot(a, VOCAB), one_hot(b, VOCAB)
    u = rng.random((BATCH, NODES), dtype=np.float32)
    u[:, :2] = 0.7
    alen, path, _ = run_all((tokens, parents, k, target, draft, u, ru))
    assert (alen >= 1).all() and (path[:, 0] == 1).all()


def test_residual_mass_fallback_keeps_distribution():
    # Draft probabilities dominate the target everywhere: the residual is empty (mass <= 1e-8), so the
    # distribution stays the one before the subtraction, for the next sibling and for the extra token.
    rng = np.random.default_rng(5)
    parents = np.tile(np.array([-1, -1, -1, 0, 1, 2], np.int32), (BATCH, 1))
    tokens, parents, k, target, _, u, ru = sampled_case(rng, parents, [NODES] * BATCH)
    draft = np.ones((BATCH, NODES, VOCAB), np.float32)
    u = np.full_like(u, 0.999)  # ratio = target[x] < 0.999: every test rejects
    alen, _, nxt = run_all((tokens, parents, k, target, draft, u, ru))
    assert (alen == 0).all()
    root = np.asarray(inverse_cdf(jnp.asarray(target[:, 0]), jnp.asarray(ru)))
    np.testing.assert_array_equal(nxt, root)


def test_vocab_multiple_of_block_and_many_tiles():
    rng = np.random.default_rng(6)
    case = sampled_case(rng, chain_parents(8, 3), rng.integers(0, 4, 8), vocab=2048, concentration=1.0)
    # 16 full tiles: the Triton variant's unmasked load path (the Mosaic variant pads, so it has no such path).
    run_all(case, variants=("gpu",), block=128)


def test_zero_nodes():
    rng = np.random.default_rng(7)
    target = random_probs(rng, (4, 1, 300))
    case = (
        np.zeros((4, 0), np.int32),
        np.zeros((4, 0), np.int32),
        np.zeros(4, np.int32),
        target,
        np.zeros((4, 0, 300), np.float32),
        np.zeros((4, 0), np.float32),
        rng.random(4, dtype=np.float32),
    )
    alen, path, _ = run_all(case, variants=("gpu",), block=128)
    assert path.shape == (4, 0) and (alen == 0).all()


def test_tpu_variant_with_tpu_interpreter():
    # pltpu.InterpretParams simulates SMEM/VMEM and the TPU grid, closer to hardware than the HLO interpreter.
    from jax.experimental.pallas import tpu as pltpu

    rng = np.random.default_rng(8)
    case = sampled_case(rng, random_tree_parents(rng, 4, 4), [4, 3, 0, 2], vocab=300)
    args = tuple(jnp.asarray(a) for a in case)
    ref = verify_reference(*args)
    got = verify_tpu(*args, block_v=128, interpret=pltpu.InterpretParams())
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------------------------
# Dispatch and traceability.


def test_auto_uses_reference_on_cpu_and_pallas_needs_interpret():
    rng = np.random.default_rng(9)
    args = tuple(jnp.asarray(a) for a in sampled_case(rng, chain_parents(BATCH, NODES), [3] * BATCH))
    for a, b in zip(verify(*args), verify_reference(*args)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="interpret"):
        verify(*args, impl="pallas")
    with pytest.raises(ValueError, match="impl"):
        verify(*args, impl="triton")


def test_traceable_inside_jitted_while_loop():
    rng = np.random.default_rng(10)
    args = tuple(jnp.asarray(a) for a in sampled_case(rng, chain_parents(BATCH, NODES), [NODES] * BATCH))

    def decode(impl, args):
        def body(carry):
            i, total = carry
            res = verify(*args, impl=impl, interpret=True, block_v=BLOCK)
            return i + 1, total + res.accept_len + res.next_token

        return jax.lax.while_loop(lambda c: c[0] < 2, body, (0, jnp.zeros(BATCH, jnp.int32)))[1]

    jax.make_jaxpr(functools.partial(decode, "pallas"))(args)  # traces the kernel; no host syncs allowed
    ref = verify_reference(*args)
    np.testing.assert_array_equal(
        jax.jit(functools.partial(decode, "reference"))(args), 2 * (ref.accept_len + ref.next_token)
    )


def test_block_configs_are_legal():
    for vocab in (8, 1000, 32000, 151936, 262144):
        block, warps, stages = gpu_config(vocab)
        assert _common.is_power_of_2(block) and block <= _common.next_power_of_2(vocab) or block == 32
        assert warps >= 1 and stages >= 1
        tblock = tpu_config(vocab)
        assert tblock % 128 == 0 and _common.is_power_of_2(tblock)
    assert gpu_config(1000, 256)[0] == 256 and gpu_config(1000, 300)[0] == 512
    assert tpu_config(1000, 256) == 256 and tpu_config(1000, 200) == 256


# --------------------------------------------------------------------------------------------------------------
# Statistics: the first committed token must follow the target root distribution.


def chi2_pvalue(observed, expected):
    stat = float(((observed - expected) ** 2 / expected).sum())
    return float(chi2.sf(stat, len(observed) - 1))


def _first_committed(parents_row, rows, vocab=8, seed=11):
    """Sample `rows` independent rows with fixed target/draft distributions; return (pi_0, tokens, extras)."""
    rng = np.random.default_rng(seed)
    nodes = len(parents_row)
    target = rng.dirichlet(np.full(vocab, 2.0), nodes + 1).astype(np.float32)
    # Draft rows: node j is sampled from its own distribution given its parent; siblings of the root
    # share one distribution (i.i.d. candidates), as multi-candidate rejection sampling assumes.
    per_parent = rng.dirichlet(np.full(vocab, 0.7), nodes + 1).astype(np.float32)
    draft = per_parent[np.asarray(parents_row) + 1]
    key = jax.random.key(seed)
    kt, ku, kr = jax.random.split(key, 3)
    tokens = jax.random.categorical(kt, jnp.log(jnp.asarray(draft)), shape=(rows, nodes)).astype(jnp.int32)
    uniforms = jax.random.uniform(ku, (rows, nodes))
    residual_u = jax.random.uniform(kr, (rows,))

    def one_row(tok, u, ru):
        res = verify_reference(
            tok[None],
            jnp.asarray(parents_row, jnp.int32)[None],
            jnp.full((1,), nodes),
            jnp.asarray(target)[None],
            jnp.asarray(draft)[None],
            u[None],
            ru[None],
        )
        return jax.tree.map(lambda x: x[0], res)

    res = jax.jit(jax.vmap(one_row))(tokens, uniforms, residual_u)
    first_node = jnp.clip(res.accepted_nodes[:, 0], 0, nodes - 1)
    first = jnp.where(res.accept_len > 0, jnp.take_along_axis(tokens, first_node[:, None], 1)[:, 0], res.next_token)
    return target, np.asarray(first), res, residual_u


@pytest.mark.parametrize("parents_row", [[-1, 0, 1], [-1, -1, -1]], ids=["chain3", "root_with_3_children"])
def test_first_token_follows_target_distribution(parents_row):
    rows = 24000
    target, first, res, residual_u = _first_committed(parents_row, rows)
    expected = target[0] * rows
    p_good = chi2_pvalue(np.bincount(first, minlength=8), expected)
    assert p_good > 1e-3, p_good
    # Negative control: a broken residual (extra token drawn from pi_0 instead of the residual after
    # rejecting everything at the root) must be caught by the same test.
    from_pi = np.asarray(inverse_cdf(jnp.broadcast_to(jnp.asarray(target[0]), (rows, 8)), residual_u))
    broken = np.where(np.asarray(res.accept_len) > 0, first, from_pi)
    p_bad = chi2_pvalue(np.bincount(broken, minlength=8), expected)
    assert p_bad < 1e-8, p_bad


# --------------------------------------------------------------------------------------------------------------
# Compiled kernels: lowering from the CPU host, and runs on real accelerators.

_BIG = dict(batch=32, nodes=7, vocab=151936)


def _big_avals(batch, nodes, vocab):
    sds = jax.ShapeDtypeStruct
    return (
        sds((batch, nodes), jnp.int32),
        sds((batch, nodes), jnp.int32),
        sds((batch,), jnp.int32),
        sds((batch, nodes + 1, vocab), jnp.float32),
        sds((batch, nodes, vocab), jnp.float32),
        sds((batch, nodes), jnp.float32),
        sds((batch,), jnp.float32),
    )


def _jaxlib_version():
    import jaxlib

    return tuple(int("".join(ch for ch in part if ch.isdigit()) or 0) for part in jaxlib.__version__.split(".")[:3])


@pytest.mark.skipif(
    _jaxlib_version() > (0, 10, 2) or jax.default_backend() == "gpu",
    reason="newer jaxlibs compile Triton to PTX while lowering, which needs a GPU",
)
@pytest.mark.parametrize("onehot", [False, True])
def test_triton_lowering_from_cpu(onehot, monkeypatch):
    """The kernel lowers to a Triton module that passes MLIR verification: the device parses the module and refuses
    one that does not (an i1 loop bound next to i32 ones failed so on an H200 while lowering here still passed)."""
    from jax._src.pallas.triton import lowering  # private: the module object, which as_text() only embeds

    modules, lower = [], lowering.lower_jaxpr_to_triton_module

    def keep(*args, **kwargs):
        modules.append(lower(*args, **kwargs))
        return modules[-1]

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", keep)
    block, warps, stages = gpu_config(_BIG["vocab"])
    fn = functools.partial(verify_gpu, block_v=block, num_warps=warps, num_stages=stages)
    avals = list(_big_avals(**_BIG))
    if onehot:  # the one-hot fast path: no draft rows (trees §2.4)
        avals[4] = None
    text = jax.jit(fn).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "triton" in text and modules
    for m in modules:
        assert m.module.operation.verify()


def test_mosaic_lowering_from_cpu():
    fn = functools.partial(verify_tpu, block_v=tpu_config(_BIG["vocab"]))
    text = jax.jit(fn).trace(*_big_avals(**_BIG)).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


def test_mosaic_lowering_of_the_onehot_path():
    """The one-hot fast path (no draft rows, trees §2.4) lowers for TPU too."""
    fn = functools.partial(verify_tpu, block_v=tpu_config(_BIG["vocab"]))
    avals = list(_big_avals(**_BIG))
    avals[4] = None
    text = jax.jit(fn).trace(*avals).lower(lowering_platforms=("tpu",)).as_text()
    assert "tpu_custom_call" in text


def _big_case(batch, nodes, vocab, seed=0):
    """Chain inputs built on the device (peaked target, draft = noisy target, tokens from the draft)."""
    kl, kn, kt, ku, kr = jax.random.split(jax.random.key(seed), 5)
    logits = 4.0 * jax.random.normal(kl, (batch, nodes + 1, vocab))
    target = jax.nn.softmax(logits, axis=-1)
    draft = jax.nn.softmax(logits[:, :-1] + 1.5 * jax.random.normal(kn, (batch, nodes, vocab)), axis=-1)
    tokens = jax.random.categorical(kt, jnp.log(draft)).astype(jnp.int32)
    parents = jnp.broadcast_to(jnp.arange(-1, nodes - 1, dtype=jnp.int32), (batch, nodes))
    k = jnp.arange(batch, dtype=jnp.int32) % (nodes + 1)
    return (tokens, parents, k, target, draft, jax.random.uniform(ku, (batch, nodes)), jax.random.uniform(kr, (batch,)))


def _assert_token_consistent(case, res_ref, got_next, tol=1e-4):
    """Exact match, or a draw the float64 inverse CDF accepts up to rounding (summation order differs)."""
    tokens, parents, k, target, draft, _, ru = (np.asarray(a) for a in case)
    want = np.asarray(res_ref.next_token)
    for b in np.nonzero(np.asarray(got_next) != want)[0]:
        a = int(res_ref.accept_len[b])
        dist = target[b, a].astype(np.float64)
        if a < k[b]:
            resid = np.maximum(dist - draft[b, a], 0.0)
            dist = resid / resid.sum() if resid.sum() > 1e-8 else dist
        cs = np.cumsum(dist)
        thr, t = ru[b] * cs[-1], int(got_next[b])
        assert dist[t] > 0 and cs[t] >= thr - tol and (t == 0 or cs[t - 1] <= thr + tol), (b, t, want[b])


def _check_compiled(run):
    case = _big_case(**_BIG)
    ref = verify_reference(*case)
    got = run(*case)
    np.testing.assert_array_equal(np.asarray(got.accept_len), np.asarray(ref.accept_len))
    np.testing.assert_array_equal(np.asarray(got.accepted_nodes), np.asarray(ref.accepted_nodes))
    _assert_token_consistent(case, ref, got.next_token)
    assert int(np.asarray(ref.accept_len).max()) > 0


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_compiled_triton_kernel_matches_reference():
    _check_compiled(lambda *a: verify(*a, impl="pallas"))


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
def test_compiled_mosaic_kernel_matches_reference():
    _check_compiled(lambda *a: verify(*a, impl="pallas"))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
def test_compiled_triton_onehot_path_matches_reference():
    """The one-hot fast path compiled: top-k candidates (each node the target row's best token after a noisy
    draft), draft_probs=None, equal to the one-hot reference."""
    tokens, parents, k, target, draft, u, ru = _big_case(**_BIG)
    tokens = jnp.argmax(draft, axis=-1).astype(jnp.int32)
    ref = verify_reference_onehot(tokens, parents, k, target, u, ru)
    got = verify(tokens, parents, k, target, None, u, ru, impl="pallas")
    np.testing.assert_array_equal(np.asarray(got.accept_len), np.asarray(ref.accept_len))
    np.testing.assert_array_equal(np.asarray(got.next_token), np.asarray(ref.next_token))
