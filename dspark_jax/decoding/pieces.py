"""One decode round cut into separately jitted pieces, on the loop's own shapes: for benchmarks and checks.

The decode loop runs every round inside one lax.while_loop, which cannot be timed from inside. These are the same
four pieces, built from the functions the loop calls, each one jitted call on a `DecodeState` from
`Prepared.prefill` (`loop.prepare`):

    draft_backbone   push the pending context rows into the draft cache, then the block forward   (spec §6.3)
    draft_head       the sequential (Markov / RNN) head and the left-to-right drafting of the slots (spec §6.4)
    verify_pass      one target pass over [anchor, drafts] through the target cache                (spec §6.6)
    accept_commit    acceptance and the state update                                               (spec §6.6-6.7)

Each takes `repeat` (traced, so one compile serves every value): the piece runs 1 + repeat times inside the call,
in a fori_loop whose carry feeds each run's output into the next through a test XLA cannot fold (so nothing is
hoisted out of the loop) while every run computes the same values, so the result does not depend on `repeat`.
The caches stay inside that loop and are written in place, as in the decode loop. `round_split` times a piece per
round as (t(repeat=n) - t(repeat=0)) / n over the fastest calls, which cancels dispatch and argument handling.
Verification runs at the full block width (the widest pass a threshold or scheduler policy compiles).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.decoding import loop, propose
from dspark_jax.decoding.propose import Proposal, sample_slots
from dspark_jax.decoding.state import DecodeState
from dspark_jax.decoding.verify import target_pass


def anchors_of(state: DecodeState) -> tuple[jax.Array, jax.Array]:
    """(anchors i32[batch], anchor positions i32[batch]): each row's newest committed token and its position."""
    pos = state.lengths - 1
    return state.tokens[jnp.arange(pos.shape[0]), pos], pos


def _never(*arrays) -> jax.Array:
    """bool scalar, False at run time, that depends on every element of `arrays` (XLA cannot fold it)."""
    return sum(jnp.sum(a.astype(jnp.float32)) for a in arrays if a is not None) > 1e30


def _repeat(repeat, body, init):
    """body applied 1 + repeat times; each application maps a carry to the next, the last carry is returned."""
    return jax.lax.fori_loop(0, repeat, lambda _, carry: body(carry), body(init))


# ------------------------------------------------------------------------------------------- the round's pieces


@functools.partial(jax.jit, static_argnames=("draft_def",))
def _draft_backbone(draft_def, draft_state, state, repeat):
    draft = nnx.merge(draft_def, draft_state)
    anchors, pos = anchors_of(state)

    def body(carry):
        cache = carry[0]
        hidden, new = propose.draft_backbone(draft, cache, state.pending, state.num_pending, anchors, pos)
        # The next run pushes the same rows again: the cache goes back to the input's lengths.
        return dataclasses.replace(new, lengths=cache.lengths), hidden, new.lengths

    cache, hidden, lengths = _repeat(repeat, body, (state.draft_cache, None, None))
    return hidden, dataclasses.replace(cache, lengths=lengths)


@functools.partial(jax.jit, static_argnames=("draft_def",))
def _draft_head(draft_def, draft_state, state, hidden, repeat):
    draft = nnx.merge(draft_def, draft_state)
    anchors, _ = anchors_of(state)
    _, draft_keys, _ = loop._row_keys(state.keys)  # the loop's own split of the row keys

    def body(carry):
        h = carry[0]
        p = sample_slots(draft, h, anchors, state.sampling, draft_keys)
        return h + _never(p.tokens, p.confidence_logits).astype(h.dtype), p  # p is carried out: all of it is live

    return _repeat(repeat, body, (hidden, None))[1]


@functools.partial(jax.jit, static_argnames=("target_def", "tap_layer_ids"))
def _verify_pass(target_def, target_state, state, drafts, repeat, *, tap_layer_ids):
    target = nnx.merge(target_def, target_state)
    anchors, pos = anchors_of(state)
    block = anchors[:, None] if drafts is None else jnp.concatenate([anchors[:, None], drafts], axis=1)

    def body(carry):
        cache, tokens = carry[:2]
        logits, taps, new = target_pass(target, cache, tokens, pos, tap_layer_ids)
        flag = _never(logits[..., :8], None if taps is None else taps[..., :8])  # a slice: the carry keeps the rest
        return dataclasses.replace(new, lengths=cache.lengths), tokens + flag.astype(tokens.dtype), logits, taps

    cache, _, logits, taps = _repeat(repeat, body, (state.target_cache, block, None, None))
    return logits, taps, cache


@functools.partial(jax.jit, static_argnames=("spec",))
def _accept_commit(state, proposal, logits, taps, target_cache, draft_cache, repeat, *, spec):
    keys, _, accept_keys = loop._row_keys(state.keys)  # the loop's own split of the row keys
    caches = {"target_cache": state.target_cache, "draft_cache": state.draft_cache}
    counters = ("lengths", "done", "rounds", "keys")

    def body(carry):
        s, _, lg = carry
        s = dataclasses.replace(s, **caches)
        # The logits ride in the carry and take a (zero) update that depends on it, so the acceptance is never
        # hoisted out of the loop; updating one element of a carried buffer is done in place.
        lg = lg.at[0, 0, 0].add(_never(s.tokens).astype(lg.dtype))
        new = loop._accept_and_commit(s, spec, proposal, lg, taps, target_cache, draft_cache, keys, accept_keys)
        # The next run commits the same round again: counters back to the input's; this run's are kept aside.
        again = dataclasses.replace(
            new, target_cache=None, draft_cache=None, **{k: getattr(state, k) for k in counters}
        )
        kept = {k: getattr(new, k) for k in counters}
        kept.update(t=new.target_cache.lengths, d=None if new.draft_cache is None else new.draft_cache.lengths)
        return again, kept, lg

    init = (dataclasses.replace(state, target_cache=None, draft_cache=None), None, logits)
    again, kept, _ = _repeat(repeat, body, init)
    return dataclasses.replace(
        again,
        target_cache=dataclasses.replace(target_cache, lengths=kept.pop("t")),
        draft_cache=None if draft_cache is None else dataclasses.replace(draft_cache, lengths=kept.pop("d")),
        **{k: kept[k] for k in counters},
    )


def _count(repeat: int) -> jax.Array:
    return jnp.asarray(repeat, jnp.int32)


def draft_backbone(draft, state: DecodeState, repeat: int = 0):
    """Context push + block forward. draft: a DraftHandle. Returns (hidden [batch, block, hidden] after the final
    norm, the draft cache with the pending rows appended)."""
    return _draft_backbone(*draft.decode_parts(), state, _count(repeat))


def draft_head(draft, state: DecodeState, hidden: jax.Array, repeat: int = 0) -> Proposal:
    """Sequential head + drafting over `hidden` (from draft_backbone) with the round's keys and per-row sampling."""
    return _draft_head(*draft.decode_parts(), state, hidden, _count(repeat))


def verify_pass(target, state: DecodeState, drafts: jax.Array | None, spec: loop.LoopSpec, repeat: int = 0):
    """Target pass over [anchor, drafts] (drafts i32[batch, block], or None for plain decoding's width-1 block).

    Returns (logits f32[batch, 1 + block, vocab], taps or None, the target cache with the block's rows written).
    """
    return _verify_pass(*target.decode_parts(), state, drafts, _count(repeat), tap_layer_ids=spec.tap_layer_ids)


def accept_commit(
    state: DecodeState,
    spec: loop.LoopSpec,
    proposal: Proposal | None,
    logits: jax.Array,
    taps: jax.Array | None,
    target_cache,
    draft_cache,
    repeat: int = 0,
) -> DecodeState:
    """Acceptance + commit (proposal and draft_cache None: plain decoding), given the round's verify output and
    caches: the state the loop carries into the next round."""
    return _accept_commit(state, proposal, logits, taps, target_cache, draft_cache, _count(repeat), spec=spec)


def one_round(target, draft, state: DecodeState, spec: loop.LoopSpec) -> DecodeState:
    """The four pieces in order: one full-width round, as the loop runs it with verify="full"."""
    proposal = draft_cache = None
    if draft is not None:
        hidden, draft_cache = draft_backbone(draft, state)
        proposal = draft_head(draft, state, hidden)
    logits, taps, target_cache = verify_pass(target, state, None if proposal is None else proposal.tokens, spec)
    return accept_commit(state, spec, proposal, logits, taps, target_cache, draft_cache)


# ------------------------------------------------------------------------------------------------------ timing


def median_seconds(fn, make_args, iters: int) -> float:
    """Median wall time of fn(*make_args()) over `iters` calls after one warm-up (compile) call; make_args builds
    each call's inputs outside the timed region."""
    jax.block_until_ready(fn(*make_args()))
    times = []
    for _ in range(iters):
        args = make_args()
        jax.block_until_ready(args)
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _per_round(piece, reps: int, n: int) -> float:
    """Seconds per run of piece(repeat): (t(n) - t(0)) / n, each t the fastest of `reps` calls after a warm-up
    (noise only ever adds time)."""

    def fastest(repeat):
        jax.block_until_ready(piece(repeat))
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            jax.block_until_ready(piece(repeat))
            times.append(time.perf_counter() - start)
        return min(times)

    t0 = fastest(0)
    return max(fastest(n) - t0, 0.0) / n


def round_split(target, draft, prep: loop.Prepared, reps: int = 5, n: int = 16) -> dict:
    """Seconds per round of each piece on the first round's shapes (draft None: plain decoding's step).

    Returns {"prefill_s", ["draft_backbone_s", "sequential_head_s",] "verify_s", "accept_commit_s",
    "pieces_sum_s"}.
    """
    spec = prep.spec
    state = prep.prefill(target, draft)
    out = {"prefill_s": median_seconds(lambda: prep.prefill(target, draft), lambda: (), reps)}
    proposal = draft_cache = drafts = None
    if draft is not None:
        out["draft_backbone_s"] = _per_round(lambda r: draft_backbone(draft, state, r), reps, n)
        hidden, draft_cache = draft_backbone(draft, state)
        out["sequential_head_s"] = _per_round(lambda r: draft_head(draft, state, hidden, r), reps, n)
        proposal = draft_head(draft, state, hidden)
        drafts = proposal.tokens
    out["verify_s"] = _per_round(lambda r: verify_pass(target, state, drafts, spec, r), reps, n)
    logits, taps, target_cache = verify_pass(target, state, drafts, spec)
    out["accept_commit_s"] = _per_round(
        lambda r: accept_commit(state, spec, proposal, logits, taps, target_cache, draft_cache, r), reps, n
    )
    out["pieces_sum_s"] = sum(v for k, v in out.items() if k != "prefill_s")
    return out
