"""Sampled tree decoding is lossless (trees §8.6): the joint law of the first 3 tokens through `generate(tree=...)`
matches the target's (chi-square over 16^3 cells, 20480 samples), for each drafting mode; a broken extra-token rule
fails. (Swor rows verified unconditioned change this untrained draft's law too little to detect here: p = 0.86 at
20480 samples; that variant and the re-sorting / self-pruning ones are caught by the exact-law calculator in
test_tree_accept.py.)

Shares the 16-token target, the block-3 draft, the exact laws and the chi-square helper of test_sampling_lossless.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling_lossless import BATCH, MIN_P, PROMPT, SEEDS, SETTINGS, chi_square, draft, laws, target  # noqa: F401

import dspark_jax as dj
from dspark_jax import ops
from dspark_jax.decoding import loop
from dspark_jax.decoding.tree import TreeConfig
from pallas_kernels.verify.reference import inverse_cdf

pytestmark = pytest.mark.usefixtures("small_cache_buckets")  # conftest: sampled rows of a few tokens

NEW = 3


def sample(target, draft, sampling, tree, seeds=SEEDS):  # noqa: F811
    kw = dict(max_new_tokens=NEW, temperature=sampling.temperature, top_p=sampling.top_p, tree=tree)
    results = [dj.generate(target, draft, [PROMPT] * BATCH, seed=s, **kw) for s in seeds]
    return np.array([t for r in results for t in r.tokens]), results


@pytest.mark.parametrize(
    "setting,shape,mode",
    [
        ("t1", (7, 2, 2), "swor"),
        pytest.param("t07_p09", (15, 4, 4), "swor", marks=pytest.mark.slow),
        pytest.param("t1", (7, 2, 2), "iid", marks=pytest.mark.slow),
        pytest.param("t07_p09", (7, 2, 2), "topk", marks=pytest.mark.slow),
    ],
)
def test_tree_sampling_matches_target_law(target, draft, laws, setting, shape, mode, capsys):  # noqa: F811
    samples, results = sample(target, draft, SETTINGS[setting], TreeConfig(*shape, mode))
    stat, dof, p = chi_square(samples, laws[setting])
    ranks = np.bincount([r for res in results for q in res.accepted_ranks for row in q for r in row], minlength=2)
    with capsys.disabled():
        print(f"\n[{setting} {shape} {mode}] chi2={stat:.1f} dof={dof} p={p:.3g} | accepted ranks {ranks.tolist()}")
    assert p > MIN_P, (stat, dof, p)
    assert ranks[1:].sum() > 100  # siblings past rank 0 were accepted: the tree mattered


@pytest.mark.slow
def test_tree_scheduler_keeps_the_target_law(target, laws, capsys, monkeypatch):  # noqa: F811
    """verify="scheduler" over trees (trees §6) at T = 1: the pooled greedy decides each row's verified nodes from
    this round's scores, batch-wide; the samples still follow the target's law. Sharp confidences (temperature
    0.25) and a fixed cost table (a round at width w costs 1 + 0.1 (w - 1), without the draft 1.2) make its cuts
    vary, whatever this machine's timings."""
    from draft_factory import random_draft

    monkeypatch.setattr(
        loop, "round_seconds_table", lambda t, d, prep: (1 + 0.1 * (np.array(prep.spec.widths) - 1), 1.2)
    )
    cut = random_draft(target, block_size=3, markov_rank=4, seed=2, confidence=True)
    cut = dataclasses.replace(cut, calibration=np.full(3, 0.25, np.float32))
    kw = dict(max_new_tokens=NEW, temperature=1.0, tree=TreeConfig(7, 2, 2, "swor"), verify="scheduler")
    results = [dj.generate(target, cut, [PROMPT] * BATCH, seed=s, **kw) for s in SEEDS[:2]]  # 8192 samples
    stat, dof, p = chi_square(np.array([t for r in results for t in r.tokens]), laws["t1"])
    sizes = np.bincount([n for r in results for row in r.nodes_verified for n in row], minlength=8)
    with capsys.disabled():
        print(f"\n[scheduler t1 (7,2,2) swor] chi2={stat:.1f} dof={dof} p={p:.3g} | nodes verified {sizes.tolist()}")
    assert p > MIN_P, (stat, dof, p)
    assert (sizes > 50).sum() >= 3, sizes  # trees were cut at several sizes


def _broken_run(target, draft, laws, monkeypatch):  # noqa: F811
    loop.decode_loop.clear_cache()  # the compiled loop must see the patched rule
    try:
        samples, _ = sample(target, draft, SETTINGS["t1"], TreeConfig(7, 2, 2, "swor"))
    finally:
        monkeypatch.undo()
        loop.decode_loop.clear_cache()
    return chi_square(samples, laws["t1"])


def test_extra_token_from_target_is_caught(target, draft, laws, monkeypatch):  # noqa: F811
    """Broken (d): after rejections, the extra token drawn from pi at the last accepted node, not the residual."""
    real = ops.accept_tree

    def broken(tokens, parents, num, target_probs, rows, u, ru, impl=None, max_siblings=None):
        alen, path, _ = real(tokens, parents, num, target_probs, rows, u, ru, impl=impl, max_siblings=max_siblings)
        last = jnp.where(alen > 0, jnp.take_along_axis(path, jnp.maximum(alen - 1, 0)[:, None], 1)[:, 0], -1)
        pi = target_probs[jnp.arange(target_probs.shape[0]), last + 1]
        return alen, path, inverse_cdf(pi, ru)

    monkeypatch.setattr(ops, "accept_tree", broken)
    stat, dof, p = _broken_run(target, draft, laws, monkeypatch)
    assert p < 1e-6, (stat, dof, p)


def test_tree_result_shapes(target, draft):  # noqa: F811
    _, (res,) = sample(target, draft, SETTINGS["t1"], TreeConfig(7, 2, 2), seeds=(0,))
    assert dataclasses.asdict(res)["accepted_ranks"]
    for nv, acc in zip(res.nodes_verified, res.acceptance_lengths):
        assert len(nv) == len(acc)
