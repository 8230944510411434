"""layers/moe.py against an independent NumPy implementation: every router variant (softmax with and without
renormalisation, V4 sqrtsoftplus with a selection-only bias, hash routing, route scale), the SwiGLU clamps, the
shared expert, and each dispatch variant on 1 device and with experts / ffw sharded over 4 virtual devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx

from dspark_jax.errors import UsageError
from dspark_jax.layers.moe import MOE_IMPLS, MoE, experts_ffn, resolve_impl, route, swiglu
from dspark_jax.sharding import make_mesh

TOL = 1e-5
IMPLS = ("blocked", "ragged", "gather", "dense")


# ------------------------------------------------------------------------------------------------- NumPy reference


def np_route(logits, top_k, score_func, norm, scale=1.0, eps=0.0, bias=None, hash_ids=None):
    logits = np.asarray(logits, np.float64)
    if score_func == "softmax":
        e = np.exp(logits - logits.max(-1, keepdims=True))
        scores = e / e.sum(-1, keepdims=True)
    else:
        scores = np.sqrt(np.log1p(np.exp(logits)))
    if hash_ids is not None:
        ids = np.asarray(hash_ids)
    else:
        select = scores + (0 if bias is None else np.asarray(bias, np.float64))
        ids = np.argsort(-select, axis=-1, kind="stable")[:, :top_k]
    w = np.take_along_axis(scores, ids, -1)
    if norm:
        w = w / (w.sum(-1, keepdims=True) + eps)
    return w * scale, ids


def np_silu(v):
    return v / (1 + np.exp(-v))


def np_expert(x, g, u, d, limit):
    a, b = x @ g, x @ u
    if limit is not None:
        a, b = np.minimum(a, limit), np.clip(b, -limit, limit)
    return (np_silu(a) * b) @ d


def np_experts(x, w, ids, gate, up, down, limit=None):
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            out[t] += w[t, j] * np_expert(x[t], gate[e], up[e], down[e], limit)
    return out


def rand(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize(
    "score_func, norm, scale, eps",
    [("softmax", False, 1.0, 0.0), ("softmax", True, 1.0, 0.0), ("sqrtsoftplus", True, 1.5, 1e-20)],
)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_route_matches_numpy(score_func, norm, scale, eps, top_k):
    rng = np.random.default_rng(top_k)
    logits = rand(rng, 11, 8)
    w, ids = route(
        jnp.asarray(logits),
        top_k=top_k,
        score_func=score_func,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        norm_eps=eps,
    )
    rw, rids = np_route(logits, top_k, score_func, norm, scale, eps)
    assert ids.dtype == jnp.int32 and w.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(ids), rids)
    assert rel_err(w, rw) < TOL
    if norm:
        np.testing.assert_allclose(np.asarray(w).sum(-1), scale, rtol=1e-6)


def test_bias_selects_but_does_not_weight():
    rng = np.random.default_rng(5)
    logits = rand(rng, 16, 8)
    bias = rand(rng, 8, scale=2.0)
    w, ids = route(jnp.asarray(logits), top_k=2, score_func="sqrtsoftplus", norm_topk_prob=True, bias=jnp.asarray(bias))
    rw, rids = np_route(logits, 2, "sqrtsoftplus", True, bias=bias)
    _, plain_ids = np_route(logits, 2, "sqrtsoftplus", True)
    assert (rids != plain_ids).any(), "the bias must change some selections for this test to mean anything"
    np.testing.assert_array_equal(np.asarray(ids), rids)
    assert rel_err(w, rw) < TOL


def test_hash_routing_uses_the_table_and_router_weights():
    rng = np.random.default_rng(6)
    logits = rand(rng, 9, 8)
    table = np.stack([rng.permutation(8)[:3] for _ in range(32)]).astype(np.int32)  # [vocab, k] distinct experts
    tokens = rng.integers(0, 32, 9)
    w, ids = route(
        jnp.asarray(logits),
        top_k=3,
        score_func="sqrtsoftplus",
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
        norm_eps=1e-20,
        hash_ids=jnp.asarray(table)[tokens],
    )
    rw, rids = np_route(logits, 3, "sqrtsoftplus", True, 1.5, 1e-20, hash_ids=table[tokens])
    np.testing.assert_array_equal(np.asarray(ids), rids)
    assert rel_err(w, rw) < TOL


def test_swiglu_clamps():
    g = jnp.asarray([-30.0, -2.0, 0.5, 3.0, 30.0])
    u = jnp.asarray([-30.0, 2.0, -0.5, 3.0, -30.0])
    got = np.asarray(swiglu(g, u, 1.0))
    ref = np_silu(np.minimum(np.asarray(g), 1.0)) * np.clip(np.asarray(u), -1.0, 1.0)
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert not np.allclose(got, np.asarray(swiglu(g, u)))  # the clamp is active on these values


# ---------------------------------------------------------------------------------------------- expert dispatch

E, H, F, T, K = 8, 16, 12, 7, 3


@pytest.fixture(scope="module")
def experts():
    rng = np.random.default_rng(0)
    return dict(
        x=rand(rng, T, H),
        gate=rand(rng, E, H, F, scale=0.5),
        up=rand(rng, E, H, F, scale=0.5),
        down=rand(rng, E, F, H, scale=0.5),
        logits=rand(rng, T, E),
    )


def _run(ex, impl, mesh, limit=None, ids=None):
    w, rids = np_route(ex["logits"], K, "softmax", True)
    if ids is not None:
        rids = ids
    got = experts_ffn(
        jnp.asarray(ex["x"]),
        jnp.asarray(w, jnp.float32),
        jnp.asarray(rids, jnp.int32),
        jnp.asarray(ex["gate"]),
        jnp.asarray(ex["up"]),
        jnp.asarray(ex["down"]),
        dtype=jnp.float32,
        swiglu_limit=limit,
        impl=impl,
        mesh=mesh,
    )
    ref = np_experts(ex["x"], w, rids, ex["gate"], ex["up"], ex["down"], limit)
    return got, ref


MESH_CASES = [(impl, mesh) for impl in IMPLS for mesh in (None, "expert=2,model=2")] + [
    ("blocked", "expert=4"),
    ("blocked", "data=2,expert=2"),  # inputs replicated over `data`, the psum only over expert/model
]


@pytest.mark.parametrize("impl, mesh_text", MESH_CASES)
def test_experts_match_numpy(experts, impl, mesh_text):
    mesh = None if mesh_text is None else make_mesh(mesh_text)
    got, ref = jax.jit(lambda: _run(experts, impl, mesh, limit=1.0)[0])(), _run(experts, impl, None, 1.0)[1]
    assert got.dtype == jnp.float32
    assert rel_err(got, ref) < TOL


@pytest.mark.parametrize("impl", IMPLS)
def test_no_token_dropped_when_every_token_picks_one_expert(experts, impl):
    """All T tokens on expert 5 (plus two others): a capacity factor would drop rows; we must not."""
    ids = np.stack([np.full(T, 5), np.arange(T) % 4, 4 + np.arange(T) % 2], axis=1)
    ids[:, 2] = np.where(ids[:, 2] == 5, 6, ids[:, 2])
    got, ref = _run(experts, impl, make_mesh("expert=4"), ids=ids)
    assert rel_err(got, ref) < TOL


def test_blocked_with_runs_crossing_blocks(experts):
    """Blocks of 4 rows over 21 sorted rows: expert runs straddle block borders and blocks hold several experts."""
    from dspark_jax.layers.moe import _local_blocked

    w, ids = np_route(experts["logits"], K, "softmax", False)
    args = [jnp.asarray(a) for a in (experts["x"], w.astype(np.float32), ids.astype(np.int32))]
    args += [jnp.asarray(experts[n]) for n in ("gate", "up", "down")]
    got = jax.jit(lambda *a: _local_blocked(*a, 0, 1.0, block=4))(*args)
    ref = np_experts(experts["x"], w, ids, experts["gate"], experts["up"], experts["down"], 1.0)
    assert rel_err(got, ref) < TOL


def test_resolve_impl_and_bad_values():
    assert resolve_impl("auto", 6) == "blocked" and resolve_impl("gather", 4096) == "gather"
    assert set(MOE_IMPLS) == {"auto", *IMPLS}
    for kwargs, needle in [
        (dict(impl="alltoall"), "moe_impl"),
        (dict(score_func="sigmoid"), "scoring_func"),
        (dict(top_k=9), "num_experts_per_tok"),
    ]:
        with pytest.raises(UsageError) as info:
            MoE(H, F, E, kwargs.pop("top_k", 2), dtype="float32", param_dtype="float32", rngs=None, **kwargs)
        assert needle in str(info.value) and "\n" not in str(info.value)


def test_experts_not_divisible_by_expert_axis(experts):
    mesh = make_mesh("expert=4")
    ex = {**experts, "gate": experts["gate"][:6], "up": experts["up"][:6], "down": experts["down"][:6]}
    with pytest.raises(UsageError) as info:
        _run(ex, "ragged", mesh, ids=np.zeros((T, K), np.int64) + np.arange(K))
    assert "num_experts (6)" in str(info.value) and "expert=4" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------- the V4-style MoE block


@pytest.mark.parametrize("hash_layer", [False, True])
def test_v4_block_matches_numpy(hash_layer):
    """sqrtsoftplus + bias (or tid2eid), scale 1.5, eps 1e-20, clamps 1.0, a shared expert; on 4 devices."""
    rng = np.random.default_rng(7)
    vocab = 32
    moe = MoE(
        H,
        F,
        E,
        2,
        score_func="sqrtsoftplus",
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
        norm_eps=1e-20,
        use_bias=not hash_layer,
        hash_vocab=vocab if hash_layer else None,
        swiglu_limit=1.0,
        shared_ffw=F,
        mesh=make_mesh("expert=4"),
        dtype="float32",
        param_dtype="float32",
        rngs=nnx.Rngs(0),
    )
    p = {
        "gate": rand(rng, H, E),
        "gate_proj": rand(rng, E, H, F, scale=0.5),
        "up_proj": rand(rng, E, H, F, scale=0.5),
        "down_proj": rand(rng, E, F, H, scale=0.5),
    }
    for name, value in p.items():
        getattr(moe, name)[...] = jnp.asarray(value)
    for name in ("gate_proj", "up_proj", "down_proj"):
        p["s_" + name] = rand(rng, *getattr(moe.shared_expert, name)[...].shape, scale=0.5)
        getattr(moe.shared_expert, name)[...] = jnp.asarray(p["s_" + name])
    table = None
    if hash_layer:
        table = np.stack([rng.permutation(E)[:2] for _ in range(vocab)]).astype(np.int32)
        moe.tid2eid[...] = jnp.asarray(table)
    else:
        p["bias"] = rand(rng, E)
        moe.gate_bias[...] = jnp.asarray(p["bias"])
    x = rand(rng, 2, 5, H)
    tokens = rng.integers(0, vocab, (2, 5))
    got = nnx.jit(lambda m, x, t: m(x, t))(moe, jnp.asarray(x), jnp.asarray(tokens, jnp.int32))
    flat = x.reshape(-1, H)
    w, ids = np_route(
        flat @ p["gate"],
        2,
        "sqrtsoftplus",
        True,
        1.5,
        1e-20,
        bias=p.get("bias"),
        hash_ids=None if table is None else table[tokens.reshape(-1)],
    )
    ref = np_experts(flat, w, ids, p["gate_proj"], p["up_proj"], p["down_proj"], 1.0)
    ref += np_expert(flat, p["s_gate_proj"], p["s_up_proj"], p["s_down_proj"], 1.0)
    assert rel_err(np.asarray(got).reshape(-1, H), ref) < TOL
