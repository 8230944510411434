"""Target side of a round (spec §6.6): one target pass over [anchor, drafts] through its cache, then acceptance."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax import ops
from dspark_jax.cache import KVCache
from dspark_jax.configs import SamplingConfig
from dspark_jax.models.qwen3 import Qwen3
from dspark_jax.sampling import SamplingParams, as_params, first_argmax, probabilities


def target_pass(
    target: Qwen3,
    cache: KVCache,
    tokens: jax.Array,
    anchor_positions: jax.Array,
    tap_layer_ids: tuple[int, ...],
    positions: jax.Array | None = None,
    mask: jax.Array | None = None,
):
    """tokens i32[batch, w] = [anchor, x_0..x_{w-2}] at positions P..P+w-1.

    Tree rounds (trees §4) pass positions i32[batch, w] = P + [0, 1 + depth] and mask bool[batch, w, cache_len]
    (`cache.tree_mask`): the rows still land in slots P..P+w-1, each seeing the prefix and its own ancestors.

    Returns (logits f32[batch, w, vocab], taps [batch, w, taps * hidden] or None, cache with the rows written).
    Row i's logits are the target's distribution for position P + i + 1, causally independent of later rows,
    so verifying k < w - 1 drafts needs no second pass.
    """
    w = tokens.shape[1]
    if positions is None:
        positions = anchor_positions[:, None] + jnp.arange(w, dtype=jnp.int32)[None, :]
    if mask is None:
        hidden, taps, cache = target(tokens, positions, cache, tap_layer_ids)
    else:
        hidden, taps, cache = target(tokens, positions, cache, tap_layer_ids, mask=mask)
    return target.logits(hidden), taps, cache


def accept(
    sampling: SamplingConfig | SamplingParams,
    draft_tokens: jax.Array,
    draft_probs: jax.Array,
    num_proposed: jax.Array,
    target_logits: jax.Array,
    keys: jax.Array | None,
):
    """Speculative rejection sampling over a chain (spec §6.6).

    sampling: per-row settings; draft_tokens i32[batch, slots]; draft_probs f32[batch, slots, vocab];
    num_proposed i32[batch]; target_logits f32[batch, slots + 1, vocab]; keys: per-row keys [batch] (None when
    every row is greedy).
    Returns (accepted i32[batch], next_token i32[batch]).

    When every row is greedy the rule needs no randomness and no distributions (every ratio is 0 or 1): drafts are
    accepted while they equal the target's argmax, and the next token is the argmax after the last accepted one.
    That path builds no [batch, slots + 1, vocab] one-hots; a batch with any sampled row takes the general path,
    where greedy rows get one-hot distributions and the same outcome.
    """
    sampling = as_params(sampling)
    if keys is None:
        return greedy_accept(draft_tokens, num_proposed, target_logits)

    def general():
        target_probs = probabilities(target_logits, sampling)
        slots = draft_tokens.shape[1]
        pairs = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
        uniforms = jax.vmap(lambda k: jax.random.uniform(k, (slots,)))(pairs[:, 0])
        residual_u = jax.vmap(lambda k: jax.random.uniform(k, ()))(pairs[:, 1])
        return ops.accept_chain(draft_tokens, num_proposed, target_probs, draft_probs, uniforms, residual_u)

    all_greedy = jnp.all(jnp.broadcast_to(sampling.greedy, draft_tokens.shape[:1]))
    return jax.lax.cond(all_greedy, lambda: greedy_accept(draft_tokens, num_proposed, target_logits), general)


def greedy_accept(draft_tokens: jax.Array, num_proposed: jax.Array, target_logits: jax.Array):
    """Acceptance when every row is greedy: (accepted i32[batch], next_token i32[batch]); the same outcome as
    the rejection rule on one-hot distributions."""
    best = first_argmax(target_logits)  # i32[b, slots + 1]
    slots = draft_tokens.shape[1]
    proposed = jnp.arange(slots, dtype=jnp.int32)[None, :] < num_proposed[:, None]
    matches = (draft_tokens == best[:, :slots]) & proposed
    accepted = jnp.sum(jnp.cumprod(matches.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    return accepted, jnp.take_along_axis(best, accepted[:, None], axis=1)[:, 0]
