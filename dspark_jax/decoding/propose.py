"""Draft side of a round (spec §6.3-§6.4): push pending context, block forward, left-to-right slot sampling."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.cache import KVCache
from dspark_jax.configs import SamplingConfig
from dspark_jax.errors import UsageError
from dspark_jax.models.draft import Draft
from dspark_jax.sampling import SamplingParams, as_params, draw, first_argmax, probabilities


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Proposal:
    """One block per row. tokens i32[batch, slots]; probs f32[batch, slots, vocab] (what each token was drawn
    from); base_logits / logits f32[batch, slots, vocab] (before / after the sequential head); confidence_logits
    f32[batch, slots] (pre-sigmoid; zeros without a confidence head); hidden [batch, slots, hidden].
    """

    tokens: jax.Array
    probs: jax.Array
    base_logits: jax.Array
    logits: jax.Array
    confidence_logits: jax.Array
    hidden: jax.Array


def sample_slots(
    draft: Draft,
    hidden: jax.Array,
    anchors: jax.Array,
    sampling: SamplingConfig | SamplingParams,
    keys: jax.Array | None,
    forced_tokens: jax.Array | None = None,
) -> Proposal:
    """Draw the block's tokens left to right (spec §6.4) as a lax.scan over slots.

    hidden: [batch, slots, hidden]; anchors: i32[batch] (x_{-1}); sampling: per-row settings; keys: per-row PRNG
    keys [batch] (None only when every row is greedy). `forced_tokens` i32[batch, slots] replays recorded drafts:
    they feed the sequential head instead of the sampled ones (teacher forcing for parity checks). When every row
    is greedy, `probs` is left zero (acceptance then compares argmaxes and never reads it).
    """
    sampling = as_params(sampling)
    base = draft.base_logits(hidden)  # f32[b, j, v]
    bsz, slots = anchors.shape[0], hidden.shape[1]
    greedy = jnp.broadcast_to(sampling.greedy, (bsz,))
    slot_keys = (
        jax.vmap(lambda k: jax.random.split(k, slots))(keys)
        if keys is not None
        else jnp.zeros((bsz, slots), jnp.uint32)
    )
    forced = forced_tokens if forced_tokens is not None else jnp.zeros((bsz, slots), jnp.int32)

    def pick(logits, key_j):
        """(token i32[batch], probs f32[batch, vocab]) for one slot."""

        def argmax():
            return first_argmax(logits), jnp.zeros_like(logits)

        def sampled():
            probs = probabilities(logits, sampling)
            return draw(probs, key_j, greedy), probs

        return argmax() if keys is None else jax.lax.cond(jnp.all(greedy), argmax, sampled)

    def step(carry, xs):
        prev, state = carry
        h_j, u_j, key_j, forced_j = xs
        logits, confidence, state = draft.slot_head(h_j, u_j, prev, state)
        token, probs = pick(logits, key_j)
        nxt = forced_j if forced_tokens is not None else token
        conf = confidence if confidence is not None else jnp.zeros((bsz,), jnp.float32)
        return (nxt, state), (token, probs, logits, conf)

    xs = (
        jnp.swapaxes(hidden, 0, 1),
        jnp.swapaxes(base, 0, 1),
        jnp.swapaxes(slot_keys, 0, 1),
        jnp.swapaxes(forced, 0, 1),
    )
    init = (anchors.astype(jnp.int32), draft.init_head_state((bsz,)))
    _, (tokens, probs, logits, conf) = jax.lax.scan(step, init, xs)
    return Proposal(
        jnp.swapaxes(tokens, 0, 1),
        jnp.swapaxes(probs, 0, 1),
        base,
        jnp.swapaxes(logits, 0, 1),
        jnp.swapaxes(conf, 0, 1),
        hidden,
    )


def propose(
    draft: Draft,
    cache: KVCache,
    pending: jax.Array,
    num_pending: jax.Array,
    anchors: jax.Array,
    anchor_positions: jax.Array,
    sampling: SamplingConfig | SamplingParams,
    keys: jax.Array | None,
    forced_tokens: jax.Array | None = None,
) -> tuple[Proposal, KVCache]:
    """Push pending context rows, then run one block per row.

    pending: [batch, w, taps * hidden] raw target features of positions cache.lengths..+num_pending (rows beyond a
    row's count are ignored); anchors, anchor_positions: i32[batch]. Afterwards cache.lengths = anchor_positions
    for rows whose pending rows reach the anchor (spec §6.3 step 4; block rows never enter the cache).
    """
    hidden, cache = draft_backbone(draft, cache, pending, num_pending, anchors, anchor_positions)
    return sample_slots(draft, hidden, anchors, sampling, keys, forced_tokens), cache


def draft_backbone(
    draft: Draft,
    cache: KVCache,
    pending: jax.Array,
    num_pending: jax.Array,
    anchors: jax.Array,
    anchor_positions: jax.Array,
) -> tuple[jax.Array, KVCache]:
    """The draft's layers for one round (spec §6.3): push pending context rows, then the block forward.

    Returns (hidden [batch, slots, hidden] after the final norm, the cache with the context rows appended).
    """
    cache = draft.push_context(cache, pending, cache.lengths)
    cache = dataclasses.replace(cache, lengths=cache.lengths + num_pending)
    return draft.block_hidden(cache, anchors, anchor_positions), cache


@functools.partial(jax.jit, static_argnames=("graphdef", "sampling", "cache_len"))
def _propose_features(graphdef, state, cache, taps, anchors, anchor_positions, keys, sampling, cache_len):
    draft = nnx.merge(graphdef, state)
    if cache is None:
        cache = draft.init_cache(anchors.shape[0], cache_len)
    num = jnp.full(anchors.shape, taps.shape[1], jnp.int32)
    return propose(draft, cache, taps, num, anchors, anchor_positions, sampling, keys)


def propose_from_features(
    handle, taps, anchor, *, temperature=0.0, top_p=1.0, top_k=0, key=None, cache=None, anchor_position=None
):
    """Research API behind `draft.propose`: context features for the positions right after the cache, one block.

    taps: f32[batch, t, taps * hidden] (or [t, taps * hidden]); anchor: i32[batch] (or a scalar). With no cache,
    the features cover positions 0..t-1 and the anchor sits at t. Returns (Proposal, cache) so a later call can
    feed only the new rows.
    """
    taps = jnp.asarray(taps, jnp.float32)
    anchor = jnp.asarray(anchor, jnp.int32)
    if taps.ndim == 2:
        taps = taps[None]
    if anchor.ndim == 0:
        anchor = anchor.reshape(1)
    width = handle.config.num_taps * handle.config.model.hidden_size
    if taps.ndim != 3 or taps.shape[2] != width or anchor.shape != taps.shape[:1]:
        raise UsageError(
            f"propose needs taps [batch, t, {width}] and anchor [batch], got taps {list(taps.shape)} "
            f"and anchor {list(anchor.shape)}"
        )
    if cache is not None and cache.lengths.shape != anchor.shape:
        raise UsageError(f"cache holds {cache.lengths.shape[0]} row(s) but {anchor.shape[0]} anchor(s) were given")
    start = jnp.zeros(anchor.shape, jnp.int32) if cache is None else cache.lengths
    if anchor_position is None:
        anchor_position = start + taps.shape[1]
    anchor_position = jnp.broadcast_to(jnp.asarray(anchor_position, jnp.int32), anchor.shape)
    if cache is not None and int(jnp.max(start)) + taps.shape[1] > cache.cache_len:
        # push_context writes with dynamic_update_slice, which would clamp (shift) an overflowing write.
        raise UsageError(
            f"cache holds {cache.cache_len} positions but {taps.shape[1]} rows after "
            f"{int(jnp.max(start))} need {int(jnp.max(start)) + taps.shape[1]}"
        )
    sampling = SamplingConfig(temperature, top_p, top_k)
    keys = None
    if not sampling.greedy:
        base = key if key is not None else jax.random.key(0)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(anchor.shape[0]))
    cache_len = 256 * (1 + (int(jnp.max(anchor_position)) + 256) // 256)
    return _propose_features(
        handle.graphdef, handle.state, cache, taps, anchor, anchor_position, keys, sampling, cache_len
    )
