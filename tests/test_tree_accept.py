"""Tree acceptance (trees §2, §8.4-§8.5): kernel == reference == NumPy walk on random depth-major trees with i.i.d.,
without-replacement and one-hot rows; the one-hot fast path; and an exact-law calculator on a 4-token vocabulary that
shows the builder's modes lossless and four broken variants far from the target's law.
"""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from test_verify_kernel import numpy_verify, random_probs

from dspark_jax import ops
from dspark_jax.decoding.tree import IID, SWOR, TOPK, TreeProposal
from pallas_kernels.verify import verify, verify_reference, verify_reference_onehot

VOCAB = 48
BLOCK_V = 16  # 3 vocab tiles


# ------------------------------------------------------------------------------------------------ random trees


def random_tree(rng, nodes, branch, depth):
    """parents i32[nodes] of a depth-major tree with contiguous sibling groups of <= branch (the builder's
    order): level by level, each node of the previous level gets 0..branch children."""
    parents, level = [], [-1]
    while len(parents) < nodes:
        nxt = []
        for p in level:
            for _ in range(rng.integers(1 if p == level[0] else 0, branch + 1)):
                if len(parents) < nodes:
                    nxt.append(len(parents))
                    parents.append(p)
        level = nxt or [len(parents) - 1]
        if len(set(parents)) > depth:
            break
    parents += [parents[-1]] * (nodes - len(parents))  # pad (still < index, still contiguous)
    return np.array(parents, np.int32)


def tree_case(rng, batch, nodes, branch, kind):
    """A random acceptance case whose rows follow `kind` ('iid' shared parent rows, 'swor' conditioned rows,
    'onehot'), tokens drawn from those laws in sibling order."""
    parents = np.stack([random_tree(rng, nodes, branch, 7) for _ in range(batch)])
    target = random_probs(rng, (batch, nodes + 1, VOCAB))
    rows = np.zeros((batch, nodes, VOCAB), np.float32)
    tokens = np.zeros((batch, nodes), np.int32)
    for b in range(batch):
        law, drawn = {}, {}
        for j in range(nodes):
            p = parents[b, j]
            if p not in law:  # the parent's draft law: a mix of the target there and noise
                mix = 0.5 * target[b, p + 1] + 0.5 * random_probs(rng, (VOCAB,))
                law[p] = (mix / mix.sum()).astype(np.float32)
                drawn[p] = []
            base = law[p]
            if kind == "onehot":  # deterministic candidates: the parent's best tokens in rank order
                x = int(np.argsort(-base, kind="stable")[len(drawn[p])])
                row = np.eye(VOCAB, dtype=np.float32)[x]
            else:
                row = base.copy()
                if kind == "swor":
                    row[drawn[p]] = 0
                    row = (row / row.sum()).astype(np.float32)
                x = int(rng.choice(VOCAB, p=row.astype(np.float64) / row.astype(np.float64).sum()))
            drawn[p].append(x)
            rows[b, j], tokens[b, j] = row, x
    num = rng.integers(0, nodes + 1, batch).astype(np.int32)
    num[0] = nodes
    u = rng.random((batch, nodes), dtype=np.float32)
    ru = rng.random(batch, dtype=np.float32)
    return tokens, parents, num, target, rows, u, ru


# The interpreted kernel is slow on CPU: every row kind on small trees, one kind each on the larger ones.
CASES = [
    ("iid", 7, 2),
    ("swor", 7, 2),
    ("onehot", 7, 2),
    ("swor", 16, 4),
    ("onehot", 16, 4),
    pytest.param("iid", 32, 4, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind,nodes,branch", CASES)
def test_kernel_equals_reference_equals_numpy(kind, nodes, branch):
    rng = np.random.default_rng(nodes * 7 + branch + len(kind))
    case = tree_case(rng, 3, nodes, branch, kind)
    args = tuple(jnp.asarray(a) for a in case)
    want = numpy_verify(*case)
    ref = [np.asarray(x) for x in verify_reference(*args)]
    for name, got, exp in zip(("accept_len", "accepted_nodes", "next_token"), ref, want):
        np.testing.assert_array_equal(got, exp, err_msg=f"reference vs numpy: {name}")
    siblings = [None, branch] if nodes <= 7 else [branch]  # the O(N^2) unroll only on the small trees
    for max_siblings in siblings:
        out = verify(*args, impl="pallas", interpret=True, block_v=BLOCK_V, platform="gpu", max_siblings=max_siblings)
        for name, got, exp in zip(("accept_len", "accepted_nodes", "next_token"), out, ref):
            np.testing.assert_array_equal(np.asarray(got), exp, err_msg=f"kernel (siblings {max_siblings}): {name}")
    if kind == "onehot":
        fast = verify_reference_onehot(args[0], args[1], args[2], args[3], args[5], args[6])
        for name, got, exp in zip(("accept_len", "accepted_nodes", "next_token"), fast, ref):
            np.testing.assert_array_equal(np.asarray(got), exp, err_msg=f"one-hot fast path: {name}")
        via_ops = ops.accept_tree(args[0], args[1], args[2], args[3], None, args[5], args[6])
        np.testing.assert_array_equal(np.asarray(via_ops[2]), ref[2])
        # The kernel's one-hot path (no draft rows; rejections are scalar, trees §2.4), both variants.
        for platform in ("gpu", "tpu") if nodes <= 7 else ("gpu",):
            kernel = verify(
                *args[:4], None, *args[5:], impl="pallas", interpret=True, block_v=128, platform=platform,
                max_siblings=branch,
            )  # fmt: skip
            for name, got, exp in zip(("accept_len", "accepted_nodes", "next_token"), kernel, ref):
                np.testing.assert_array_equal(np.asarray(got), exp, err_msg=f"one-hot kernel ({platform}): {name}")
    # Some rows accept several nodes, some reject at the root: the walk's branches all ran.
    assert ref[0].max() >= 1


def test_accept_tree_on_a_chain_equals_accept_chain():
    rng = np.random.default_rng(5)
    parents = np.tile(np.arange(-1, 6, dtype=np.int32), (4, 1))
    target = random_probs(rng, (4, 8, VOCAB))
    draft = random_probs(rng, (4, 7, VOCAB))
    tokens = rng.integers(0, VOCAB, (4, 7)).astype(np.int32)
    u, ru = rng.random((4, 7), dtype=np.float32), rng.random(4, dtype=np.float32)
    num = np.array([7, 3, 0, 5], np.int32)
    chain = ops.accept_chain(tokens, num, target, draft, u, ru)
    tree = ops.accept_tree(tokens, parents, num, target, draft, u, ru)
    np.testing.assert_array_equal(np.asarray(chain[0]), np.asarray(tree[0]))
    np.testing.assert_array_equal(np.asarray(chain[1]), np.asarray(tree[2]))


# ------------------------------------------------------------------------------------ exact law, 4-token vocab

V = 4
LAW_RNG = np.random.default_rng(2)  # tables where every broken variant is far off (TV >= 0.078)
PI0 = LAW_RNG.dirichlet(np.ones(V))  # target after the prefix
PI1 = LAW_RNG.dirichlet(np.ones(V), size=V)  # target after (prefix, x)
P0 = LAW_RNG.dirichlet(np.full(V, 0.4))  # draft at depth 0
P1 = LAW_RNG.dirichlet(np.full(V, 0.4), size=V)  # draft at depth 1 given x
SHAPES = ((2, 2), (3, 1))  # (root children, children of the first root child): <= 4 nodes, depth 2


def draws(p, k, mode):
    """[(tokens tuple, probability, rows list)] for k children drawn from law p under `mode` (rows = D_c)."""
    out = []
    if mode == "topk":
        toks = tuple(int(t) for t in np.argsort(-p, kind="stable")[:k])
        return [(toks, 1.0, [np.eye(V)[t] for t in toks])]
    for toks in itertools.product(range(V), repeat=k):
        if mode == "iid":
            prob = float(np.prod([p[t] for t in toks]))
            rows = [p] * k
        else:  # swor / swor_unconditioned
            if len(set(toks)) < k:
                continue
            prob, rows, used = 1.0, [], []
            for t in toks:
                row = p.copy()
                row[used] = 0
                row = row / row.sum()
                prob *= row[t]
                rows.append(p if mode == "swor_unconditioned" else row)
                used.append(t)
        if prob > 0:
            out.append((toks, prob, rows))
    return out


def node_law(dist, children, after, extra_from_target=False):
    """Law f64[V] of the first token emitted at a node: children tested in order with their rows, accepted child
    c -> `after(c)` (a law over the *next* level's outcome, returned as (token, continuation) weights).

    children: [(token, row)]; returns dict token -> (probability, weight of being an accepted child)."""
    out_accept = np.zeros(V)  # P(accept child with token t)
    accepted_children = []
    reach, r = 1.0, dist.copy()
    for t, row in children:
        a = min(1.0, r[t] / max(row[t], 1e-8))
        accepted_children.append((t, reach * a))
        out_accept[t] += reach * a
        reach *= 1 - a
        resid = np.maximum(r - row, 0)
        if resid.sum() > 1e-12:
            r = resid / resid.sum()
    residual = dist if extra_from_target else r
    return accepted_children, reach * residual


def exact_law(shape, mode, broken=None):
    """Joint law f64[V, V] of the first two committed tokens for one tree round (then plain target decoding)."""
    k0, k1 = shape
    law = np.zeros((V, V))
    root_mode = "swor_unconditioned" if broken == "a" else mode
    for toks0, pr0, rows0 in draws(P0, k0 + (1 if broken == "c" else 0), root_mode):
        order = list(range(len(toks0)))
        if broken == "b":  # siblings re-sorted by p(x) after drawing, rows recomputed for the new order
            order = sorted(order, key=lambda i: -P0[toks0[i]])
            toks0 = tuple(toks0[i] for i in order)
            rows0 = draws_row(P0, toks0)[2]
        if broken == "c":  # prune the worst by the EAGLE-2 score p(x), keep draw order
            drop = min(range(len(toks0)), key=lambda i: (P0[toks0[i]], -i))
            keep = [i for i in range(len(toks0)) if i != drop]
            toks0 = tuple(toks0[i] for i in keep)
            rows0 = draws_row(P0, toks0)[2]
        first = toks0[0]
        for toks1, pr1, rows1 in draws(P1[first], k1, mode if broken != "a" else "swor_unconditioned"):
            weight = pr0 * pr1
            kids0 = list(zip(toks0, rows0))
            accepted0, resid0 = node_law(PI0, kids0, None, broken == "d")
            for idx, (t, pa) in enumerate(accepted0):
                if pa == 0:
                    continue
                kids1 = list(zip(toks1, rows1)) if idx == 0 else []
                accepted1, resid1 = node_law(PI1[t], kids1, None, broken == "d")
                for t2, pb in accepted1:
                    law[t, t2] += weight * pa * pb
                law[t] += weight * pa * resid1
            law += weight * resid0[:, None] * PI1  # all root children rejected: the extra token, then the target
    return law


def draws_row(p, toks):
    """(toks, probability, swor rows) of drawing exactly `toks` in this order without replacement."""
    rows, used, prob = [], [], 1.0
    for t in toks:
        row = p.copy()
        row[used] = 0
        row = row / row.sum()
        prob *= row[t]
        rows.append(row)
        used.append(t)
    return toks, prob, rows


TARGET_LAW = PI0[:, None] * PI1


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", ["iid", "swor", "topk"])
def test_exact_law_of_each_mode(shape, mode):
    law = exact_law(shape, mode)
    assert law.sum() == pytest.approx(1.0, abs=1e-9)
    assert np.abs(law - TARGET_LAW).max() < 1e-6


@pytest.mark.parametrize("broken", ["a", "b", "c", "d"])
def test_exact_law_catches_broken_variants(broken):
    """(a) swor draws verified with the unconditioned p; (b) siblings re-sorted by p(x) after drawing; (c) sampled
    nodes pruned by their own p(x) (EAGLE-2's score); (d) the extra token drawn from pi, not the residual."""
    law = exact_law((3, 1), "swor", broken)
    tv = 0.5 * np.abs(law - TARGET_LAW).sum()
    assert tv >= 0.02, tv


def test_rows_match_the_calculator():
    """TreeProposal.rows() gives the calculator's D_c for each mode: a root expansion of 3 drawn tokens."""
    toks = (2, 0, 3)
    laws = jnp.asarray(np.stack([P0, P1[2]])[None], jnp.float32)  # [1, E=2, V]
    drawn = jnp.asarray([[list(toks), [1, 0, 0]]], jnp.int32)
    for code, mode in ((SWOR, "swor"), (IID, "iid"), (TOPK, "topk")):
        t = toks if mode != "topk" else tuple(int(x) for x in np.argsort(-P0, kind="stable")[:3])
        tree = TreeProposal(
            tokens=jnp.asarray([t], jnp.int32),
            parents=jnp.full((1, 3), -1, jnp.int32),
            depth=jnp.zeros((1, 3), jnp.int32),
            rank=jnp.asarray([[0, 1, 2]], jnp.int32),
            score=jnp.zeros((1, 3)),
            conf_logits=jnp.zeros((1, 3)),
            num_verify=jnp.asarray([3], jnp.int32),
            expansion=jnp.zeros((1, 3), jnp.int32),
            laws=laws,
            drawn=jnp.asarray([[list(t), [1, 0, 0]]], jnp.int32) if mode == "topk" else drawn,
            row_mode=jnp.asarray([code], jnp.int32),
            hidden=jnp.zeros((1, 1, 1)),
        )
        want = draws_row(P0, t)[2] if mode == "swor" else ([P0] * 3 if mode == "iid" else draws(P0, 3, "topk")[0][2])
        np.testing.assert_allclose(np.asarray(tree.rows()[0]), np.stack(want), atol=1e-6)
