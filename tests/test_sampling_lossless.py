"""Speculative sampling is lossless (spec §6.6): the joint law of the first generated tokens equals the target's.

A tiny target with a 16-token vocabulary; a batch of identical prompts gives independent samples (each row has
its own key stream). Plain and speculative samples are both tested against the exact joint law of the first
three tokens, enumerated from the target's logits (16^3 cells), with a chi-square goodness-of-fit test. A
deliberately broken acceptance rule (extra token drawn from the target instead of the residual) must fail the
same test.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_qwen3_hf
from draft_factory import linear_round_seconds, random_draft
from scipy.stats import chi2

import dspark_jax as dj
from dspark_jax import ops
from dspark_jax.configs import SamplingConfig
from dspark_jax.decoding import loop
from dspark_jax.sampling import probabilities
from pallas_kernels.verify.reference import inverse_cdf

pytestmark = pytest.mark.usefixtures("small_cache_buckets")  # conftest: sampled rows of a few tokens

VOCAB = 16
NEW = 3  # generated tokens whose joint law is tested
BATCH = 4096
SEEDS = (0, 1, 2, 3, 4)  # 5 x 4096 = 20480 samples per law
PROMPT = [3, 14, 1, 5, 9]
OTHER_PROMPT = [2, 7, 1, 8, 2, 8, 1, 8]  # same 16-token bucket
BLOCK = 3
LOGIT_SCALE = 8.0  # spreads the random target (logit std ~1) over hundreds of cells with visible structure
MIN_P = 1e-3  # correct samplers must pass at this level; the broken one must fall below 1e-6
SETTINGS = {"t1": SamplingConfig(1.0), "t07_p09": SamplingConfig(0.7, 0.9)}


# ------------------------------------------------------------------------------------------------ chi-square


def chi_square(samples: np.ndarray, law: np.ndarray) -> tuple[float, int, float]:
    """Goodness of fit of i32[n, NEW] samples to the f64[VOCAB]*NEW law: (statistic, dof, p-value).

    Cells expected below 5 are pooled into one; a sample in a cell of probability exactly 0 fails at once.
    """
    n = len(samples)
    flat = np.ravel_multi_index(samples.T, law.shape)
    counts = np.bincount(flat, minlength=law.size).astype(np.float64)
    probs = law.ravel()
    impossible = (probs == 0) & (counts > 0)
    assert not impossible.any(), f"samples in zero-probability cells: {np.flatnonzero(impossible)[:5]}"
    expected = probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(np.sum((obs - exp) ** 2 / exp))
    dof = len(obs) - 1
    return stat, dof, float(chi2.sf(stat, dof))


# -------------------------------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    folder, _ = tiny_qwen3_hf(
        tmp_path_factory.mktemp("sampling_target"),
        vocab=VOCAB,
        hidden=32,
        layers=2,
        heads=4,
        kv_heads=2,
        head_dim=8,
        ffw=64,
        seed=7,
    )
    t = dj.load_target(str(folder), dtype="float32")
    model = t.module()
    model.lm_head[...] = model.lm_head[...] * LOGIT_SCALE
    from flax import nnx

    _, state = nnx.split(model)
    return dataclasses.replace(t, state=state)


@pytest.fixture(scope="module")
def draft(target):
    # Shares the target's (sharpened) LM head, so its block distributions are peaked too, but on other tokens.
    return random_draft(target, block_size=BLOCK, markov_rank=4, seed=2)


@pytest.fixture(scope="module")
def laws(target):
    """Exact joint law of the first NEW tokens for each sampling setting: f64[VOCAB, VOCAB, VOCAB]."""
    grid = np.stack(np.meshgrid(np.arange(VOCAB), np.arange(VOCAB), indexing="ij"), -1).reshape(-1, 2)
    seqs = np.concatenate([np.tile(PROMPT, (len(grid), 1)), grid], axis=1)  # [256, n + 2]
    logits, _ = target.forward(seqs)
    n = len(PROMPT)
    out = {}
    for name, sampling in SETTINGS.items():
        probs = np.asarray(probabilities(logits[:, n - 1 : n + 2], sampling), np.float64)  # [256, 3, vocab]
        p1 = probs[0, 0]
        p2 = probs[::VOCAB, 1]  # rows with x2 = 0: the law of x2 given x1
        p3 = probs[:, 2].reshape(VOCAB, VOCAB, VOCAB)
        out[name] = p1[:, None, None] * p2[:, :, None] * p3
        assert out[name].sum() == pytest.approx(1.0, abs=1e-5)
    return out


def sample(target, draft, sampling: SamplingConfig, prompts=None, seeds=SEEDS, verify="full"):
    """i32[len(seeds) * BATCH, NEW] first tokens, plus the per-seed results."""
    prompts = prompts or [PROMPT] * BATCH
    kw = dict(max_new_tokens=NEW, temperature=sampling.temperature, top_p=sampling.top_p, verify=verify)
    results = [dj.generate(target, draft, prompts, seed=s, **kw) for s in seeds]
    tokens = np.array([t for r in results for t in r.tokens])
    assert tokens.shape == (len(seeds) * len(prompts), NEW)
    return tokens, results


# ---------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_sampling_matches_target_law(target, draft, laws, setting, capsys):
    sampling = SETTINGS[setting]
    plain, _ = sample(target, None, sampling)
    spec, results = sample(target, draft, sampling)
    p_plain = chi_square(plain, laws[setting])
    p_spec = chi_square(spec, laws[setting])
    acc = [a for r in results for row in r.acceptance_lengths for a in row]
    with capsys.disabled():
        print(
            f"\n[{setting}] plain chi2={p_plain[0]:.1f} dof={p_plain[1]} p={p_plain[2]:.3g} | "
            f"spec chi2={p_spec[0]:.1f} dof={p_spec[1]} p={p_spec[2]:.3g} | "
            f"accepted-length histogram {np.bincount(acc).tolist()}"
        )
    assert p_plain[2] > MIN_P, p_plain
    assert p_spec[2] > MIN_P, p_spec
    # Both branches of the rule ran often: rejections with a residual draw and fully accepted prefixes.
    hist = np.bincount(acc, minlength=BLOCK + 2)
    assert hist[1] > 1000 and hist[2:].sum() > 1000, hist
    for r in results[:1]:
        for a, q in zip(r.acceptance_lengths, r.proposal_lengths):
            assert all(k == BLOCK for k in q) and all(1 <= x <= BLOCK + 1 for x in a)


@pytest.mark.parametrize("verify", ["threshold:0.5", "scheduler"])
def test_cut_blocks_keep_the_target_law(target, laws, verify, capsys, monkeypatch):
    """Policies that cut each block at its own slot (and run the target only as wide as the batch needs): the
    samples still follow the target's law. The scheduler gets sharp (temperature 0.25) confidences and a fixed
    cost table (each extra position of the whole batch costs half a pass) so that its cuts vary too, whatever
    this machine's timings."""
    from dspark_jax.decoding import loop

    monkeypatch.setattr(loop, "round_seconds_table", linear_round_seconds)
    cut = random_draft(target, block_size=BLOCK, markov_rank=4, seed=2, confidence=True)
    cut = dataclasses.replace(cut, calibration=np.full(BLOCK, 0.25, np.float32))
    spec, results = sample(target, cut, SETTINGS["t1"], verify=verify)
    p_spec = chi_square(spec, laws["t1"])
    proposed = np.bincount([k for r in results for row in r.proposal_lengths for k in row], minlength=BLOCK + 1)
    with capsys.disabled():
        print(f"\n[{verify}] spec chi2={p_spec[0]:.1f} p={p_spec[2]:.3g} | drafts verified {proposed.tolist()}")
    assert p_spec[2] > MIN_P, p_spec
    assert (proposed > 100).sum() >= 2, proposed  # blocks were cut at several lengths


def test_sampled_rows_do_not_depend_on_neighbours(target, draft):
    """Row i's samples come from its own stream fold_in(key(seed), i): changing every other row's prompt (another
    length, same bucket) leaves the remaining rows' tokens and round statistics unchanged.

    (A single run of prompt i would use stream fold_in(key(seed), 0), so batch-vs-single equality holds for row 0
    only; `generate` has no per-request id argument. Greedy batch-vs-single equality is tested in test_loop.py.)
    """
    t1 = SETTINGS["t1"]
    mixed = [PROMPT if i % 2 else OTHER_PROMPT for i in range(BATCH)]
    _, (same,) = sample(target, draft, t1, seeds=(0,))
    _, (mix,) = sample(target, draft, t1, prompts=mixed, seeds=(0,))
    odd = slice(1, None, 2)
    assert mix.tokens[odd] == same.tokens[odd]
    assert mix.acceptance_lengths[odd] == same.acceptance_lengths[odd]
    assert mix.tokens[0::2] != same.tokens[0::2]


def test_broken_residual_is_rejected(target, draft, laws, monkeypatch, capsys):
    """Negative control: draw the extra token after a rejection from pi_A instead of the residual (pi_A - p_A)+."""
    real = ops.accept_chain

    def broken(draft_tokens, num_proposed, target_probs, draft_probs, uniforms, residual_uniforms, impl=None):
        accepted, _ = real(
            draft_tokens, num_proposed, target_probs, draft_probs, uniforms, residual_uniforms, impl=impl
        )
        pi_a = target_probs[jnp.arange(target_probs.shape[0]), accepted]
        return accepted, inverse_cdf(pi_a, residual_uniforms)

    loop.decode_loop.clear_cache()  # the compiled loop must see the patched rule ...
    monkeypatch.setattr(ops, "accept_chain", broken)
    try:
        spec, _ = sample(target, draft, SETTINGS["t1"])
    finally:
        monkeypatch.undo()
        loop.decode_loop.clear_cache()  # ... and no later test may see it
    stat, dof, p = chi_square(spec, laws["t1"])
    with capsys.disabled():
        print(f"\n[broken residual, t1] chi2={stat:.1f} dof={dof} p={p:.3g}")
    assert p < 1e-6, (stat, dof, p)


def test_first_argmax_is_argmax_ties_included():
    from dspark_jax.sampling import first_argmax

    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(64, 3, 37)).astype(np.float32)  # many tied maxima
    np.testing.assert_array_equal(np.asarray(first_argmax(jnp.asarray(x))), np.argmax(x, axis=-1))
    assert int(first_argmax(jnp.full((5,), jnp.nan))) == 4  # never out of range
