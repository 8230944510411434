"""Pure sampling maths: per-row temperature / top-k / top-p -> probabilities, greedy argmax, draws with explicit keys.

The same function turns target and draft logits into distributions, which is what keeps speculative sampling
lossless with top-k and top-p (spec §6.4, §6.6). The settings are data (`SamplingParams`, one value per row), so
one compiled decode loop serves greedy and sampled requests side by side.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.configs import SamplingConfig

# Top-k and top-p cut from this many best tokens, found with lax.top_k: a full-vocabulary sort per position
# happens only when some row needs more (top_k above it, or a top-p nucleus that reaches past it).
TOP_CANDIDATES = 64
GREEDY_BELOW = 1e-5  # spec §6.4: temperatures below this are argmax decoding


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling settings per row: temperature, top_p f32[batch]; top_k i32[batch] (0 = off).

    A `SamplingConfig` converts to scalar arrays, which broadcast over any batch.
    """

    temperature: jax.Array
    top_p: jax.Array
    top_k: jax.Array

    @classmethod
    def of(cls, configs) -> "SamplingParams":
        """From one `SamplingConfig` (scalars) or a list of them (one per row). Host numpy arrays."""
        if isinstance(configs, SamplingConfig):
            configs = [configs]
            shape = ()
        else:
            shape = (len(configs),)
        return cls(
            np.asarray([c.temperature for c in configs], np.float32).reshape(shape),
            np.asarray([c.top_p for c in configs], np.float32).reshape(shape),
            np.asarray([c.top_k for c in configs], np.int32).reshape(shape),
        )

    @property
    def greedy(self) -> jax.Array:
        """bool[batch]: rows decoded by argmax."""
        return jnp.asarray(self.temperature) < GREEDY_BELOW


def as_params(sampling: SamplingConfig | SamplingParams) -> SamplingParams:
    return SamplingParams.of(sampling) if isinstance(sampling, SamplingConfig) else sampling


def first_argmax(x: jax.Array) -> jax.Array:
    """i32[...] index of the first maximum along the last axis (jnp.argmax's tie rule).

    Two plain reductions (max, then the smallest index holding it) instead of argmax's (value, index) reduction,
    which XLA:CPU does not vectorise: 7x faster over a 4096-token vocabulary, and greedy decoding takes a few
    argmaxes per round. A row of NaNs gives the last index.
    """
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    first = jnp.min(jnp.where(x == top, index, x.shape[-1]), axis=-1)
    return jnp.minimum(first, x.shape[-1] - 1)


def _per_row(x: jax.Array, like: jax.Array) -> jax.Array:
    """A per-row value [batch] (or a scalar) shaped to broadcast against like[batch, ..., vocab]."""
    x = jnp.asarray(x)
    return x.reshape(x.shape + (1,) * (like.ndim - x.ndim))


def _cutoff(ranked: jax.Array, scaled: jax.Array, top_k: jax.Array, top_p: jax.Array):
    """The smallest scaled logit kept by top-k then top-p, from `ranked` [..., n] = the n best scaled logits in
    descending order (n = vocab for a full sort). Returns (cutoff [..., 1], exact bool[...]): exact is False
    where the n candidates do not decide the cut (top_k > n, or a nucleus reaching past them).
    """
    n, vocab = ranked.shape[-1], scaled.shape[-1]
    k_on = (top_k > 0) & (top_k < vocab)
    kth = jnp.take_along_axis(ranked, jnp.clip(top_k - 1, 0, n - 1)[..., None], axis=-1)
    kth = jnp.where(k_on[..., None], kth, -jnp.inf)  # [..., 1]; ties with the k-th token are kept
    lse = jax.nn.logsumexp(jnp.where(scaled >= kth, scaled, -jnp.inf), axis=-1, keepdims=True)
    sorted_probs = jnp.where(ranked >= kth, jnp.exp(ranked - lse), 0.0)
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass strictly above each ranked token
    kept = (sorted_probs > 0) & (before < top_p[..., None])  # a prefix of the ranking
    last = jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True) - 1, 0)
    nucleus = jnp.where(top_p[..., None] < 1.0, jnp.take_along_axis(ranked, last, axis=-1), -jnp.inf)
    cutoff = jnp.maximum(kth, nucleus)
    exact = (~k_on | (top_k <= n)) & ((top_p >= 1.0) | (jnp.sum(sorted_probs, axis=-1) >= top_p))
    return cutoff, exact


def probabilities(logits: jax.Array, sampling: SamplingConfig | SamplingParams) -> jax.Array:
    """f32[batch, ..., vocab] logits -> f32[batch, ..., vocab] distributions under each row's settings.

    Greedy rows get the one-hot of the first argmax. Sampled rows: logits / temperature, keep the top_k best (ties
    with the k-th kept), softmax, then keep the smallest set of most likely tokens whose mass reaches top_p (ties at
    the border kept) and renormalise. The cut is read from the TOP_CANDIDATES best tokens unless some row needs a
    full sort; both give the same cut (the switch is per call, not per row).
    """
    p = as_params(sampling)
    logits = logits.astype(jnp.float32)
    greedy = _per_row(p.greedy, logits)
    temperature = jnp.where(greedy, 1.0, _per_row(p.temperature, logits))
    scaled = logits / temperature
    top_k = jnp.broadcast_to(_per_row(p.top_k, logits)[..., 0], logits.shape[:-1])
    top_p = jnp.broadcast_to(_per_row(p.top_p, logits)[..., 0], logits.shape[:-1])
    vocab = logits.shape[-1]
    filtered = jnp.any((top_p < 1.0) | ((top_k > 0) & (top_k < vocab)))

    def full_sort():
        return _cutoff(jnp.flip(jnp.sort(scaled, axis=-1), axis=-1), scaled, top_k, top_p)[0]

    def from_candidates():
        cutoff, exact = _cutoff(jax.lax.top_k(scaled, min(TOP_CANDIDATES, vocab))[0], scaled, top_k, top_p)
        return jax.lax.cond(jnp.all(exact), lambda: cutoff, full_sort)

    def no_filter():
        return jnp.full(logits.shape[:-1] + (1,), -jnp.inf, jnp.float32)

    cutoff = jax.lax.cond(filtered, from_candidates, no_filter)
    probs = jax.nn.softmax(jnp.where(scaled >= cutoff, scaled, -jnp.inf), axis=-1)
    return jnp.where(greedy, jax.nn.one_hot(first_argmax(logits), vocab, dtype=jnp.float32), probs)


def draw(probs: jax.Array, keys: jax.Array | None, greedy) -> jax.Array:
    """Sample ids i32[batch] from f32[batch, vocab] with per-row keys [batch]; greedy rows (bool[batch] or a
    scalar) take the argmax and need no key (keys may be None when every row is greedy)."""
    best = first_argmax(probs)
    if keys is None:
        return best
    sampled = jax.vmap(lambda p, k: jax.random.categorical(k, jnp.log(p)))(probs, keys).astype(jnp.int32)
    return jnp.where(greedy, best, sampled)


def residual(target_probs: jax.Array, draft_probs: jax.Array) -> jax.Array:
    """Normalised max(0, target - draft); falls back to the target where that mass is <= 1e-8 (spec §6.6)."""
    r = jnp.maximum(target_probs - draft_probs, 0.0)
    mass = jnp.sum(r, axis=-1, keepdims=True)
    return jnp.where(mass > 1e-8, r / jnp.maximum(mass, 1e-30), target_probs)
