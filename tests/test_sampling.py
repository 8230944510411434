"""Per-row sampling settings: `probabilities` against a NumPy statement of the rule, the candidate cut against the
full sort, per-row draws, and the greedy acceptance shortcut against the rejection rule on one-hots."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import ops
from dspark_jax.configs import SamplingConfig
from dspark_jax.decoding.verify import greedy_accept
from dspark_jax.sampling import TOP_CANDIDATES, SamplingParams, draw, probabilities


def reference_probs(logits: np.ndarray, temperature: float, top_p: float, top_k: int) -> np.ndarray:
    """The rule in plain NumPy (float64) for one row of logits [vocab]."""
    logits = logits.astype(np.float64)
    vocab = logits.shape[-1]
    if temperature < 1e-5:
        return np.eye(vocab)[np.argmax(logits)]
    s = logits / temperature
    if 0 < top_k < vocab:
        kth = np.sort(s)[::-1][top_k - 1]
        s = np.where(s >= kth, s, -np.inf)
    p = np.exp(s - s.max())
    p /= p.sum()
    if top_p < 1:
        sp = np.sort(p)[::-1]
        before = np.cumsum(sp) - sp
        cutoff = sp[(before < top_p) & (sp > 0)].min()
        p = np.where(p >= cutoff, p, 0.0)
        p /= p.sum()
    return p


# (temperature, top_p, top_k): greedy, plain, top-k inside and beyond the candidates, nuclei inside and beyond.
SETTINGS = [
    (0.0, 1.0, 0),
    (1.0, 1.0, 0),
    (0.7, 1.0, 20),
    (1.3, 1.0, TOP_CANDIDATES + 37),
    (0.9, 0.8, 0),
    (1.0, 0.95, 50),
    (5.0, 0.999, 0),  # a flat distribution: the nucleus needs far more than the candidates
    (2.0, 0.5, 300),
]


@pytest.mark.parametrize("rows", [[0, 1, 2, 4, 5], [1, 3], [4, 6, 7], list(range(len(SETTINGS)))])
def test_probabilities_per_row_match_numpy(rows):
    rng = np.random.default_rng(len(rows))
    vocab = 512
    logits = rng.normal(size=(len(rows), 3, vocab)).astype(np.float32) * 3
    configs = [SamplingConfig(*SETTINGS[r]) for r in rows]
    got = np.asarray(jax.jit(probabilities)(jnp.asarray(logits), jax.tree.map(jnp.asarray, SamplingParams.of(configs))))
    for i, c in enumerate(configs):
        for t in range(3):
            want = reference_probs(logits[i, t], c.temperature, c.top_p, c.top_k)
            assert np.array_equal(got[i, t] > 0, want > 0), (c, t)
            np.testing.assert_allclose(got[i, t], want, atol=2e-6, rtol=1e-4)


def test_candidate_cut_equals_full_sort():
    """A batch whose rows the candidates decide, alone and next to a row that forces the full sort: same result."""
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 4, 256)).astype(np.float32) * 4)
    cheap = SamplingParams.of([SamplingConfig(0.8, 0.9, 0), SamplingConfig(1.0, 1.0, 10)])
    forced = SamplingParams.of([SamplingConfig(0.8, 0.9, 0), SamplingConfig(1.0, 1.0, 200)])
    a = np.asarray(probabilities(logits, cheap))
    b = np.asarray(probabilities(logits, forced))
    np.testing.assert_allclose(a[0], b[0], atol=1e-7)


def test_sampling_config_is_a_broadcast_row():
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(size=(3, 2, 64)).astype(np.float32))
    one = probabilities(logits, SamplingConfig(0.7, 0.9, 5))
    rows = probabilities(logits, SamplingParams.of([SamplingConfig(0.7, 0.9, 5)] * 3))
    np.testing.assert_array_equal(np.asarray(one), np.asarray(rows))


def test_draw_greedy_rows_take_the_argmax():
    rng = np.random.default_rng(3)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(4, 32)).astype(np.float32)), axis=-1)
    keys = jax.random.split(jax.random.key(0), 4)
    greedy = jnp.array([True, False, True, False])
    out = np.asarray(draw(probs, keys, greedy))
    best = np.asarray(jnp.argmax(probs, axis=-1))
    assert out[0] == best[0] and out[2] == best[2]
    # Sampled rows follow their own keys: the same key gives the same token whatever the neighbours are.
    alone = np.asarray(draw(probs[1:2], keys[1:2], jnp.array([False])))
    assert out[1] == alone[0]


def test_greedy_accept_equals_rejection_rule_on_one_hots():
    rng = np.random.default_rng(4)
    batch, slots, vocab = 64, 5, 6  # a small vocabulary, so drafts often match the target's argmax
    target_logits = jnp.asarray(rng.normal(size=(batch, slots + 1, vocab)).astype(np.float32))
    best = np.asarray(jnp.argmax(target_logits, axis=-1))
    drafts = np.where(rng.random((batch, slots)) < 0.7, best[:, :slots], rng.integers(0, vocab, (batch, slots)))
    drafts = jnp.asarray(drafts.astype(np.int32))
    num = jnp.asarray(rng.integers(0, slots + 1, batch).astype(np.int32))
    fast = greedy_accept(drafts, num, target_logits)
    greedy = SamplingConfig(0.0)
    target_probs = probabilities(target_logits, greedy)
    draft_probs = jax.nn.one_hot(drafts, vocab)
    zeros = jnp.zeros((batch, slots)), jnp.zeros((batch,))
    slow = ops.accept_chain(drafts, num, target_probs, draft_probs, *zeros, impl="reference")
    np.testing.assert_array_equal(np.asarray(fast[0]), np.asarray(slow[0]))
    np.testing.assert_array_equal(np.asarray(fast[1]), np.asarray(slow[1]))
