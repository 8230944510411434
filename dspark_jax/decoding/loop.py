"""Prefill, then every round inside one jitted lax.while_loop with donated state; the public `generate()`.

Round (spec §6): propose (draft) -> verify (one target pass over [anchor, drafts]) -> accept -> commit. Commit is
a write of at most `width` tokens and a length update; rollback of rejected rows is a length update, never a copy.
Plain decoding (no draft) is the same loop with a width-1 block.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.cache import as_bits, as_values, set_at
from dspark_jax.configs import Qwen3Config, SamplingConfig, VerifyPolicy
from dspark_jax.decoding.calibration import factors_for
from dspark_jax.decoding.prefill import prefill_prompts
from dspark_jax.decoding.propose import propose
from dspark_jax.decoding.schedule import (
    PROBE_PAYBACK_ROUNDS,
    SchedulerState,
    num_to_verify,
    plan_width,
    policy_threshold,
    prefix_confidences,
)
from dspark_jax.decoding.state import DecodeState
from dspark_jax.decoding.tree import TreeConfig
from dspark_jax.decoding.verify import accept, target_pass
from dspark_jax.errors import UsageError
from dspark_jax.sampling import SamplingParams, draw, first_argmax, probabilities

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 256
BATCH_BUCKETS = tuple(1 << i for i in range(13))  # 1 .. 4096 rows
STREAM_ROUNDS = 4  # rounds per jitted call when generate() streams its output
STOP_SLOTS = 4  # stop ids are padded with -1 to a multiple of this, so their number rarely changes the shapes


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Everything static about one compiled loop (hashable: it keys the jit cache). Sampling settings, stop
    tokens, limits and the verify threshold are data in DecodeState, so they never recompile the loop; batch and
    cache length come from buckets (`prepare`)."""

    tap_layer_ids: tuple[int, ...]
    block_size: int  # drafts per round; 0 = plain decoding
    context_len: int  # positions must stay below this (the target's max_position_embeddings)
    cache_len: int
    max_rounds: int
    # Target-pass widths compiled into the loop, ascending, the last = width. A round runs the narrowest one that
    # holds every live row's anchor + verified drafts, so a verify policy that cuts blocks short also saves the
    # target's work on the cut rows. `full` needs only the whole block.
    verify_widths: tuple[int, ...] = ()
    scheduler: bool = False  # verify="scheduler": drafts to verify from the cost-aware prefix scheduler (spec §11)
    tree: TreeConfig | None = None  # tree rounds (trees §7); verify_widths then count tree rows (anchor + nodes)

    @property
    def width(self) -> int:
        return self.block_size + 1

    @property
    def widths(self) -> tuple[int, ...]:
        return self.verify_widths or (self.width,)


@dataclasses.dataclass
class GenerateResult:
    """Output of `generate` (interfaces.md §3)."""

    tokens: list[list[int]]
    acceptance_lengths: list[list[int]]
    proposal_lengths: list[list[int]]
    tau: float
    seconds: float = 0.0
    # Per prompt, per round: the draft's pre-sigmoid confidence of each slot (zeros without a confidence head;
    # empty for plain decoding). With full-block verification these and acceptance_lengths are the calibration
    # data of spec §10.
    confidence_logits: list[list[list[float]]] = dataclasses.field(default_factory=list)
    # Tree rounds only (trees §5, §9): per prompt, per round, the nodes verified and the sibling rank of each
    # accepted node along the path (empty for chains).
    nodes_verified: list[list[int]] = dataclasses.field(default_factory=list)
    accepted_ranks: list[list[list[int]]] = dataclasses.field(default_factory=list)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


def _row_keys(keys):
    """Split each row's key into (next row key, sampling key, acceptance key)."""
    parts = jax.vmap(lambda k: jax.random.split(k, 3))(keys)
    return parts[:, 0], parts[:, 1], parts[:, 2]


def _is_stop(tokens, stop_ids):
    """bool[...] for i32[...] tokens against i32[stop_slots] stop ids (-1 = an empty slot, never a token)."""
    return jnp.any(tokens[..., None] == stop_ids, axis=-1)


@functools.partial(jax.jit, static_argnames=("target_def", "draft_def", "spec"))
def prefill(
    target_def,
    target_state,
    draft_def,
    draft_state,
    prompts,
    prompt_lens,
    limits,
    keys,
    stop_ids,
    thresholds,
    sampling: SamplingParams,
    scheduler: SchedulerState | None = None,
    *,
    spec: LoopSpec,
) -> DecodeState:
    """Target over the padded prompts, first token from the last prompt position (spec §6.2).

    prompts: i32[batch, bucket] right-padded; prompt_lens, limits: i32[batch]; keys: per-row keys [batch];
    stop_ids: i32[stop_slots] padded with -1; thresholds: f32[batch] verify-policy thresholds; sampling: per-row
    settings; done from the start: rows with prompt_lens >= limits (bucket padding); scheduler: the prefix
    scheduler's state (see DecodeState), None unless spec.scheduler.
    """
    target = nnx.merge(target_def, target_state)
    bsz, bucket = prompts.shape
    draft = None if draft_def is None else nnx.merge(draft_def, draft_state)
    done = prompt_lens >= limits
    needed = None if scheduler is None else _may_draft_again(scheduler, done, prompt_lens + 1, limits)
    last, cache, draft_cache = prefill_prompts(
        target, draft, prompts, prompt_lens, spec.cache_len, spec.tap_layer_ids, draft_needed=needed
    )
    keys, sample_keys, _ = _row_keys(keys)
    first = draw(probabilities(target.logits(last), sampling), sample_keys, sampling.greedy)
    buf_len = spec.cache_len + spec.width
    tokens = jnp.zeros((bsz, buf_len), jnp.int32).at[:, :bucket].set(prompts)
    tokens = tokens.at[jnp.arange(bsz), prompt_lens].set(first)
    cache = dataclasses.replace(cache, lengths=prompt_lens)
    pending = num_pending = None
    if draft_def is not None:
        draft_cache = dataclasses.replace(draft_cache, lengths=prompt_lens)
        taps_width = len(spec.tap_layer_ids) * target.config.hidden_size
        pending = jnp.zeros((bsz, spec.width, taps_width), target.config.dtype)
        num_pending = jnp.zeros((bsz,), jnp.int32)
    zeros = jnp.zeros((bsz, spec.max_rounds), jnp.int32)
    return DecodeState(
        tokens=tokens,
        lengths=prompt_lens + 1,
        limits=limits,
        stop_ids=stop_ids,
        thresholds=thresholds,
        sampling=sampling,
        done=_is_stop(first, stop_ids) | done,
        keys=keys,
        target_cache=cache,
        draft_cache=draft_cache,
        pending=pending,
        num_pending=num_pending,
        rounds=jnp.zeros((bsz,), jnp.int32),
        acceptance=zeros,
        proposals=zeros,
        confidences=None if draft_def is None else jnp.zeros((bsz, spec.max_rounds, spec.block_size), jnp.float32),
        scheduler=scheduler,
        accepted_ranks=None if spec.tree is None else jnp.full((bsz, spec.max_rounds, spec.block_size), -1, jnp.int32),
    )


def _round(target, draft, state: DecodeState, spec: LoopSpec, width: int | None = None) -> DecodeState:
    """One propose -> verify -> accept -> commit step for every row; rows already done are left unchanged.

    width: verify="scheduler" only: the compiled target-pass width this round runs (the loop picks it from the
    plan before the round, `_planned`), so the pass needs no switch over widths."""
    if spec.tree is not None:
        from dspark_jax.decoding.tree_loop import tree_round  # it uses this module's commit step

        return tree_round(target, draft, state, spec)
    keys, draft_keys, accept_keys = _row_keys(state.keys)
    anchor_pos = state.lengths - 1
    anchors = state.tokens[jnp.arange(anchor_pos.shape[0]), anchor_pos]
    proposal = draft_cache = num_proposed = None
    scheduler = state.scheduler
    block = anchors[:, None]
    if draft is not None:
        args = (draft, state.draft_cache, state.pending, state.num_pending, anchors, anchor_pos, state.sampling)
        if spec.scheduler:
            proposal, draft_cache, num_proposed, scheduler, plan = _scheduled_proposal(state, spec, args, draft_keys)
        else:
            proposal, draft_cache = propose(*args, draft_keys)
            num_proposed = _num_proposed(state, spec, proposal)
        block = jnp.concatenate([block, proposal.tokens], axis=1)
    if width is not None:
        # A narrower pass: rows past `width` are never read (k < width), so they are padded, not computed.
        logits, taps, target_cache = target_pass(
            target, state.target_cache, block[:, :width], anchor_pos, spec.tap_layer_ids
        )
        pad = ((0, 0), (0, spec.width - width), (0, 0))
        logits, taps = jnp.pad(logits, pad), None if taps is None else jnp.pad(taps, pad)
    elif len(spec.widths) == 1:
        logits, taps, target_cache = target_pass(target, state.target_cache, block, anchor_pos, spec.tap_layer_ids)
    else:
        needed = jnp.max(jnp.where(state.done, 1, num_proposed + 1))
        branch = jnp.searchsorted(jnp.asarray(spec.widths, jnp.int32), needed).astype(jnp.int32)

        def narrow(w):
            def run(cache):
                logits, taps, cache = target_pass(target, cache, block[:, :w], anchor_pos, spec.tap_layer_ids)
                pad = ((0, 0), (0, spec.width - w), (0, 0))  # rows past w are never read: k < w
                return jnp.pad(logits, pad), None if taps is None else jnp.pad(taps, pad), cache

            return run

        logits, taps, target_cache = switch_in_place(branch, [narrow(w) for w in spec.widths], state.target_cache)
    before = dataclasses.replace(state, scheduler=scheduler)
    state = _accept_and_commit(
        before, spec, proposal, logits, taps, target_cache, draft_cache, keys, accept_keys, num_proposed
    )
    if spec.scheduler and draft is not None:
        state = dataclasses.replace(state, scheduler=_gate(before, state, plan))
    return state


def switch_in_place(index: jax.Array, branches, cache):
    """branches[index](cache) -> (..., the cache updated), as `lax.switch` would run it, but each branch inside a
    `lax.while_loop` whose condition holds at most once; an index outside the branches runs none and returns
    (zeros..., cache). A conditional's branch that writes the cache works on a copy: under `lax.switch` XLA:CPU
    copied the whole target cache (every layer's K and V) every threshold or tree round; a while loop writes its
    carry in place. On CPU the carry holds 16-bit arrays as bits (`cache.as_bits`), as the decode loop's does."""
    outputs = jax.eval_shape(branches[-1], cache)
    start = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), outputs[:-1]) + (cache,)
    dtypes = jax.tree.map(lambda a: a.dtype, start)
    carry = (index, as_bits(start))
    for i, branch in enumerate(branches):

        def body(c, branch=branch):
            return jnp.full_like(index, -1), as_bits(branch(as_values(c[1], dtypes)[-1]))

        carry = jax.lax.while_loop(lambda c, i=i: c[0] == i, body, carry)
    return as_values(carry[1], dtypes)


def _room(state: DecodeState, spec: LoopSpec) -> jax.Array:
    """i32[batch] drafts a row may verify without its committed tokens (or the extra one) leaving the context."""
    return jnp.maximum(spec.context_len - 2 - (state.lengths - 1), 0)


def _num_proposed(state: DecodeState, spec: LoopSpec, proposal) -> jax.Array:
    """i32[batch] drafts to verify this round: the threshold policy's cut, never past the context window."""
    return jnp.minimum(num_to_verify(proposal.confidence_logits, state.thresholds), _room(state, spec))


def _planned(state: DecodeState, spec: LoopSpec) -> jax.Array:
    """i32[] index into spec.widths of the next drafting round's width: planned from the rows' previous confidences
    (`plan_width`), or the width the cost table's timing run forces."""
    sched = state.scheduler
    widths = jnp.asarray(spec.widths, jnp.int32)
    planned, _ = plan_width(sched.prior, ~state.done, widths, sched.width_seconds)
    return jnp.where(sched.forced >= 0, sched.forced, planned)


def _scheduled_proposal(state: DecodeState, spec: LoopSpec, propose_args, draft_keys):
    """verify="scheduler": propose, verify every row's drafts up to the width planned from the rows' previous
    confidences (`_planned`; 0 drafts when width 1 pays best), and plan the next round's width from this round's
    confidences (spec §11); whether drafting goes on is `_gate`'s call, after acceptance.

    Returns (proposal, draft cache, num_proposed i32[batch], the SchedulerState with the rows' new prior, and the
    plan (this round's width index, the next round's) for `_gate`).
    """
    sched = state.scheduler
    live = ~state.done
    widths = jnp.asarray(spec.widths, jnp.int32)
    proposal, cache = propose(*propose_args, draft_keys)
    planned = _planned(state, spec)
    s = prefix_confidences(proposal.confidence_logits, sched.temperatures)
    following, _ = plan_width(s, live, widths, sched.width_seconds)  # the next round's plan
    sched = dataclasses.replace(sched, prior=jnp.where(live[:, None], s, sched.prior))
    k = jnp.full(live.shape, widths[planned] - 1, jnp.int32)
    return proposal, cache, jnp.minimum(k, _room(state, spec)), sched, (planned, following)


def _gate(before: DecodeState, after: DecodeState, plan) -> SchedulerState:
    """The draft gate after a scheduler drafting round: keep drafting iff what drafting rounds have measurably
    delivered to the live rows (`SchedulerState.observed`) beats plain decoding of them. Acceptance has already
    happened, so this only steers later rounds."""
    planned, following = plan
    sched = before.scheduler
    live = ~before.done
    sched, delivered = sched.observed(after.lengths - before.lengths, live, sched.width_seconds[planned])
    return sched.after_round(delivered, jnp.sum(live), sched.width_seconds[following])


def _flush_pending(draft, state: DecodeState) -> DecodeState:
    """Push the pending context rows into the draft cache (when plain rounds have filled them up)."""
    cache = state.draft_cache
    cache = draft.push_context(cache, state.pending, cache.lengths)
    cache = dataclasses.replace(cache, lengths=cache.lengths + state.num_pending)
    return dataclasses.replace(state, draft_cache=cache, num_pending=jnp.zeros_like(state.num_pending))


def _plain_next_token(state: DecodeState, logits: jax.Array, keys: jax.Array) -> jax.Array:
    """i32[batch] the target's next token from f32[batch, vocab] logits under each row's settings; a batch whose
    live rows are all greedy takes the argmax without building distributions."""
    sampling = state.sampling
    return jax.lax.cond(
        jnp.all(sampling.greedy | state.done),
        lambda: first_argmax(logits),
        lambda: draw(probabilities(logits, sampling), keys, sampling.greedy),
    )


def _may_draft_again(sched: SchedulerState, done: jax.Array, lengths: jax.Array, limits: jax.Array) -> jax.Array:
    """bool[]: whether the draft can run again before every row is done: the gate is open, or its next probe (the
    round after the one that brings `idle_rounds` to `probe_every`) leaves PROBE_PAYBACK_ROUNDS of the rounds the
    live rows have left (each round commits at least one token) to pay it back. When it cannot, the draft never runs
    again (`_plain_round` holds the gate shut), so the rows plain rounds collect are not pushed (a draft context pass
    over batch x width rows costs ~2-5 % of the plain rounds in between on a CPU) and prefill skips the prompt's.
    While the gate stays shut both sides of the test fall by one a round or the right one by more: once False, it
    stays False."""
    remaining = jnp.max(jnp.where(done, 0, limits - lengths + 1))
    return sched.drafting | (sched.probe_every - sched.idle_rounds + PROBE_PAYBACK_ROUNDS < remaining)


def _plain_round(target, draft, state: DecodeState, spec: LoopSpec) -> DecodeState:
    """A scheduler round while the gate has the draft off: one target position per row, as in plain decoding, whose
    features join the pending context rows, so a later round can draft again. The pending rows are pushed into the
    draft cache only when they fill up (every `spec.width` rounds): the push reads the draft's context weights
    (~4 % of the embedded target's bytes) whether it writes one row or eight; and not at all once no probe can come
    early enough to pay back before the batch is done (`_may_draft_again`), when the gate stays shut for good.
    Records 1 committed token, 0 drafts and zero confidences for the round."""
    full = jnp.max(state.num_pending) >= state.pending.shape[1]
    needed = _may_draft_again(state.scheduler, state.done, state.lengths, state.limits)
    # Not `lax.cond`: with the state as its operand XLA:CPU copied the draft cache and the pending rows around it
    # every round, flush or not (bf16: 5 bitcast copies a round).
    flush = [lambda s: (_flush_pending(draft, s),)]
    (state,) = switch_in_place(jnp.where(full & needed, 0, -1), flush, state)
    keys, _, accept_keys = _row_keys(state.keys)
    bsz = state.lengths.shape[0]
    rows = jnp.arange(bsz)
    live = ~state.done
    anchor_pos = state.lengths - 1
    anchors = state.tokens[rows, anchor_pos]
    logits, taps, target_cache = target_pass(
        target, state.target_cache, anchors[:, None], anchor_pos, spec.tap_layer_ids
    )
    next_token = _plain_next_token(state, logits[:, 0], accept_keys)
    row_slot = jnp.where(live, state.num_pending, state.pending.shape[1])  # done rows write out of bounds: dropped
    pending = set_at(state.pending, (rows, row_slot), taps[:, 0])
    new_lengths = state.lengths + 1
    finished = _is_stop(next_token, state.stop_ids) | (new_lengths - 1 >= state.limits)
    slot = jnp.where(live, state.lengths, state.tokens.shape[1])  # done rows write out of bounds: dropped
    round_idx = jnp.minimum(state.rounds, spec.max_rounds - 1)
    record = jnp.where(live, round_idx, spec.max_rounds)  # likewise for the statistics
    gate = state.scheduler.after_round(jnp.float32(0), jnp.sum(live))
    return dataclasses.replace(
        state,
        tokens=state.tokens.at[rows, slot].set(next_token, mode="drop"),
        lengths=jnp.where(live, new_lengths, state.lengths),
        done=state.done | (live & finished),
        keys=keys,
        target_cache=dataclasses.replace(target_cache, lengths=jnp.where(live, state.lengths, target_cache.lengths)),
        pending=pending,
        num_pending=state.num_pending + live.astype(jnp.int32),
        rounds=state.rounds + live.astype(jnp.int32),
        acceptance=state.acceptance.at[rows, record].set(1, mode="drop"),
        proposals=state.proposals.at[rows, record].set(0, mode="drop"),
        confidences=state.confidences.at[rows, record].set(0.0, mode="drop"),
        scheduler=dataclasses.replace(gate, drafting=gate.drafting & needed),  # no context kept: no probe
    )


def _accept_and_commit(
    state: DecodeState,
    spec: LoopSpec,
    proposal,
    logits,
    taps,
    target_cache,
    draft_cache,
    keys,
    accept_keys,
    num_proposed=None,
    outcome=None,
) -> DecodeState:
    """Acceptance (spec §6.6) and the state update (§6.7) after the target pass of a round.

    proposal: the round's Proposal (None for plain decoding); logits f32[batch, width, vocab] and taps from the
    target pass; target_cache / draft_cache with the round's rows written; keys: the rows' next keys;
    num_proposed: i32[batch] drafts to verify (default: the verify policy's cut); outcome: (accepted, next_token)
    decided by the caller (tree rounds, trees §5: `proposal.tokens` is then the accepted path, `taps` its rows).
    """
    bsz = state.lengths.shape[0]
    rows = jnp.arange(bsz)
    live = ~state.done
    if proposal is None:
        next_token = _plain_next_token(state, logits[:, 0], accept_keys)
        drafts = jnp.zeros((bsz, 0), jnp.int32)
        accepted = num_proposed = jnp.zeros((bsz,), jnp.int32)
    else:
        drafts = proposal.tokens
        if num_proposed is None:
            num_proposed = _num_proposed(state, spec, proposal)
        if outcome is not None:
            accepted, next_token = outcome
        else:
            accepted, next_token = accept(state.sampling, drafts, proposal.probs, num_proposed, logits, accept_keys)
    # Stop tokens among the accepted drafts end the row there, without an extra token (spec §6.6).
    has_stop = jnp.zeros((bsz,), bool)
    if spec.block_size:
        slot = jnp.arange(spec.block_size, dtype=jnp.int32)[None, :]
        stop_in_drafts = _is_stop(drafts, state.stop_ids) & (slot < accepted[:, None])
        has_stop = jnp.any(stop_in_drafts, axis=1)
        accepted = jnp.where(has_stop, jnp.argmax(stop_in_drafts, axis=1).astype(jnp.int32) + 1, accepted)
        num_proposed = jnp.where(has_stop, accepted, num_proposed)  # the terminal round's effective proposal
    extra = ~has_stop
    committed = accepted + extra.astype(jnp.int32)
    window = jnp.arange(spec.width, dtype=jnp.int32)[None, :]
    padded = jnp.concatenate([drafts, jnp.zeros((bsz, 1), jnp.int32)], axis=1)
    values = jnp.where(
        window < accepted[:, None], padded, jnp.where(window == accepted[:, None], next_token[:, None], 0)
    )
    written = jax.vmap(lambda row, v, s: jax.lax.dynamic_update_slice_in_dim(row, v, s, 0))(
        state.tokens, values, state.lengths
    )
    new_lengths = state.lengths + committed
    finished = has_stop | (extra & _is_stop(next_token, state.stop_ids)) | (new_lengths - 1 >= state.limits)

    def keep(new, old):
        mask = live.reshape(live.shape + (1,) * (new.ndim - 1))
        return jnp.where(mask, new, old)

    round_idx = jnp.minimum(state.rounds, spec.max_rounds - 1)
    target_cache = dataclasses.replace(target_cache, lengths=keep(new_lengths - 1, state.target_cache.lengths))
    if proposal is not None:
        draft_cache = dataclasses.replace(draft_cache, lengths=keep(draft_cache.lengths, state.draft_cache.lengths))
    return DecodeState(
        tokens=keep(written, state.tokens),
        lengths=keep(new_lengths, state.lengths),
        limits=state.limits,
        stop_ids=state.stop_ids,
        thresholds=state.thresholds,
        sampling=state.sampling,
        done=state.done | (live & finished),
        keys=keys,
        target_cache=target_cache,
        draft_cache=draft_cache,
        pending=None if proposal is None else keep(taps.astype(state.pending.dtype), state.pending),
        num_pending=None if proposal is None else keep(committed, state.num_pending),
        rounds=state.rounds + live.astype(jnp.int32),
        acceptance=state.acceptance.at[rows, round_idx].set(keep(committed, state.acceptance[rows, round_idx])),
        proposals=state.proposals.at[rows, round_idx].set(keep(num_proposed, state.proposals[rows, round_idx])),
        scheduler=state.scheduler,
        confidences=None
        if proposal is None
        else state.confidences.at[rows, round_idx].set(
            keep(proposal.confidence_logits, state.confidences[rows, round_idx])
        ),
    )


@functools.partial(jax.jit, static_argnames=("target_def", "draft_def", "spec"), donate_argnames=("state",))
def decode_loop(
    target_def, target_state, draft_def, draft_state, state: DecodeState, max_rounds: jax.Array, *, spec: LoopSpec
) -> DecodeState:
    """Rounds in one lax.while_loop until every row is done or `max_rounds` (i32[], data) rounds have run in this
    call; `state` is donated (its buffers are reused in place). Calling it again on the result continues exactly
    where it stopped (streaming output, timing a fixed number of rounds): the rounds are the same either way.

    Nothing syncs with the host inside. With verify="scheduler" the rounds run in inner loops, one per compiled
    width (drafting rounds at that width while the gate is open and the plan stays there) and one of plain rounds
    (no draft work but one context row) while the gate is shut, so a batch where speculation loses runs near plain
    speed, and no round chooses among widths inside it (`switch_in_place`). On CPU the state's
    16-bit arrays ride the loops as their bits (`cache.as_bits`), so XLA:CPU does not copy the caches every round.
    """

    def more(carry):
        s, n = carry
        return ~jnp.all(s.done) & (n < max_rounds)

    dtypes = jax.tree.map(lambda a: a.dtype, state)

    def counted(round_fn):
        return lambda carry: (as_bits(round_fn(as_values(carry[0], dtypes))), carry[1] + 1)

    def body(s):
        target = nnx.merge(target_def, target_state)
        draft = None if draft_def is None else nnx.merge(draft_def, draft_state)
        return _round(target, draft, s, spec)

    start = (as_bits(state), jnp.zeros((), jnp.int32))
    if not spec.scheduler:
        return as_values(jax.lax.while_loop(more, counted(body), start)[0], dtypes)

    def plain_body(s):
        return _plain_round(nnx.merge(target_def, target_state), nnx.merge(draft_def, draft_state), s, spec)

    def at_width(i):
        def round_at(s):
            target = nnx.merge(target_def, target_state)
            return _round(target, nnx.merge(draft_def, draft_state), s, spec, width=spec.widths[i])

        def stays(c):
            return more(c) & c[0].scheduler.drafting & (_planned(c[0], spec) == i)

        return lambda carry: jax.lax.while_loop(stays, counted(round_at), carry)

    def phases(carry):
        # A plan that moves to a width whose loop already ran this pass waits for the next pass (an empty loop
        # costs one condition).
        for i in range(len(spec.widths)):
            carry = at_width(i)(carry)
        return jax.lax.while_loop(lambda c: more(c) & ~c[0].scheduler.drafting, counted(plain_body), carry)

    return as_values(jax.lax.while_loop(more, phases, start)[0], dtypes)


def _bucket(n: int, floor: int) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def batch_bucket(n: int) -> int:
    """The compiled batch size that holds n rows (the rest are padding rows, done from the start)."""
    if n > BATCH_BUCKETS[-1]:
        raise UsageError(
            f"{n} prompts in one call; the largest batch bucket is {BATCH_BUCKETS[-1]} (split the prompts)"
        )
    return next(b for b in BATCH_BUCKETS if b >= n)


def cache_bucket(needed: int, context_len: int, block_size: int) -> int:
    """Cache length for `needed` positions: a power of two (so requests of similar size share one compiled loop),
    never more than the context plus one block needs."""
    cap = -(-(context_len + block_size + 2) // 64) * 64
    return min(_bucket(needed, MIN_CACHE_BUCKET), cap)


def check_prompts(prompts, vocab: int, context_len: int) -> list[list[int]]:
    """`generate`'s prompts as lists of ints: a non-empty list of prompts, each a non-empty list (or 1-D array) of
    token ids in [0, vocab) shorter than the context; anything else is a one-line UsageError."""
    if getattr(prompts, "ndim", None) == 2:  # a numpy or jax array of equal-length prompts
        prompts = np.asarray(prompts).tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise UsageError("prompts must be a non-empty list of token-id lists, got " + repr(prompts)[:60])
    out = []
    for i, p in enumerate(prompts):
        if getattr(p, "ndim", None) == 1:  # a numpy or jax array
            p = np.asarray(p).tolist()
        if not isinstance(p, (list, tuple)):  # a flat list of ids would otherwise be one prompt per token
            raise UsageError(
                f"prompt {i} is {p!r}, not a list of token ids: prompts is a list of prompts (one prompt: [[1, 2, 3]])"
            )
        if not p:
            raise UsageError(f"prompt {i} is empty; every prompt needs at least one token")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
        if bad:
            raise UsageError(f"prompt {i} has token id {bad[0]!r} outside the vocabulary [0, {vocab})")
        if len(p) >= context_len:
            raise UsageError(
                f"prompt {i} has {len(p)} tokens; the model's context of {context_len} positions holds at most "
                f"{context_len - 1} prompt tokens (one position is the first new token's)"
            )
        out.append([int(t) for t in p])
    return out


def _check_tree(tree, draft, policy: VerifyPolicy, target_config) -> TreeConfig | None:
    """generate's `tree` argument as a TreeConfig (None = chain rounds), checked against the target, draft and
    policy."""
    if tree is None:
        return None
    if not isinstance(target_config, Qwen3Config):  # Qwen3MoeConfig is one
        why = {
            "DeepseekV4Config": "its compressors consume tokens in sequence, so a tree needs its own design",
            "Gemma4Config": "its per-layer-type caches have no tree compaction yet",
        }.get(type(target_config).__name__, "its attention takes no tree mask")
        raise UsageError(
            f"tree decoding is not supported for a {type(target_config).__name__} target: {why} "
            "(accepted: Qwen3 and Qwen3-MoE targets; use chain decoding, tree=None)"
        )
    if isinstance(tree, str):
        tree = TreeConfig.parse(tree)
    if not isinstance(tree, TreeConfig):
        raise UsageError(f"tree must be a TreeConfig or 'N[,K[,W]]', got {tree!r}")
    if draft is None:
        raise UsageError("tree decoding needs a draft; plain decoding accepts tree=None only")
    block = draft.config.block_size
    tree.check(block)
    if tree.temperatures is None and draft.calibration is not None:
        tree = dataclasses.replace(tree, temperatures=tuple(float(t) for t in np.asarray(draft.calibration)))
    if tree.rank_factors is None and getattr(draft, "rank_factors", None) is not None:  # measured (trees §3)
        tree = dataclasses.replace(tree, rank_factors=factors_for(draft.rank_factors, block, tree.branch))
    return tree


def _per_prompt(name: str, value, n: int) -> list:
    """A generate() setting given once (for every prompt) or as a list with one value per prompt."""
    if isinstance(value, (list, tuple, np.ndarray)):
        values = list(value)
        if len(values) != n:
            raise UsageError(f"{name} has {len(values)} values for {n} prompts; give one value or one per prompt")
        return values
    return [value] * n


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated request batch: the loop's static spec and the arrays `prefill` takes (host numpy). Rows past
    `num_prompts` pad the batch to its bucket."""

    spec: LoopSpec
    prompts: np.ndarray  # i32[batch, bucket] right-padded
    prompt_lens: np.ndarray  # i32[batch]
    limits: np.ndarray  # i32[batch]
    keys: jax.Array  # per-row keys [batch]
    stop_ids: np.ndarray  # i32[stop_slots], -1 padded
    thresholds: np.ndarray  # f32[batch]
    sampling: SamplingParams  # per-row settings (numpy)
    stops: tuple[int, ...]
    max_new_tokens: int
    num_prompts: int
    temperatures: np.ndarray | None = None  # f32[block], verify="scheduler" only
    width_seconds: np.ndarray | None = None  # f32[len(spec.widths)] round seconds per width, "scheduler" only
    plain_seconds: float | None = None  # a round without the draft, verify="scheduler" only
    prior: np.ndarray | None = None  # f32[block] the pair's typical prefix confidences (`typical_prior`), or None
    gain: np.ndarray | None = None  # f32[len(spec.widths)] tokens per round of the timing run's slowest row, or None
    spread: np.ndarray | None = None  # f32[len(spec.widths)] the variance of that row's tokens per round, or None

    def prefill(self, target, draft, **scheduler) -> DecodeState:
        """Run `prefill` for this batch (draft None: plain decoding). `scheduler`: keyword arguments of
        SchedulerState.initial (by default the measured `gain` and `spread`, `prior`, the loop's widths)."""
        sched = None
        if self.spec.scheduler:
            measured = {"prior": self.prior, "gain": self.gain, "spread": self.spread, "widths": self.spec.widths}
            scheduler = {**measured, **scheduler}
            sched = SchedulerState.initial(
                self.temperatures, self.width_seconds, self.plain_seconds, len(self.prompt_lens), **scheduler
            )
        draft_def, draft_state = (None, None) if draft is None else draft.decode_parts()
        return prefill(
            *target.decode_parts(),
            draft_def,
            draft_state,
            jnp.asarray(self.prompts),
            jnp.asarray(self.prompt_lens),
            jnp.asarray(self.limits),
            self.keys,
            jnp.asarray(self.stop_ids),
            jnp.asarray(self.thresholds),
            jax.tree.map(jnp.asarray, self.sampling),
            sched,
            spec=self.spec,
        )


@jax.jit
def _row_streams(key, rows):
    """Row i's key fold_in(key, i) for i32[batch] rows. Jitted: the same vmap traced eagerly took ~0.5 ms of every
    `prepare`."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(rows)


def prepare(
    target,
    draft=None,
    prompts=None,
    max_new_tokens: int = 256,
    temperature=0.0,
    top_p=1.0,
    top_k=0,
    seed: int = 0,
    verify: str = "full",
    stop_token_ids=None,
    tree=None,
) -> Prepared:
    """Validate `generate`'s arguments (raising UsageError) and build the loop's spec and inputs.

    temperature, top_p and top_k take one value for every prompt or a list with one per prompt. tree: None (chain),
    a TreeConfig or its CLI form "N[,K[,W]]".
    """
    config = getattr(target, "config", None)
    if not hasattr(config, "max_position_embeddings") or not hasattr(target, "decode_parts"):
        raise UsageError(
            f"target must be what dj.load_target returns, got {type(config if config is not None else target).__name__}"
            " (generate(target, draft, ...): the target comes first)"
        )
    policy = VerifyPolicy.parse(verify)
    tree = _check_tree(tree, draft, policy, config)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**63:
        raise UsageError(f"seed must be an integer of at most 64 bits, got {seed!r}")
    context_len = config.max_position_embeddings
    prompts = check_prompts(prompts, config.vocab_size, context_len)
    n = len(prompts)
    rows = [
        SamplingConfig(*settings)
        for settings in zip(
            _per_prompt("temperature", temperature, n), _per_prompt("top_p", top_p, n), _per_prompt("top_k", top_k, n)
        )
    ]
    batch = batch_bucket(n)
    if draft is not None:
        draft.config.check_target(config)
        if policy.kind != "full" and not draft.config.enable_confidence_head:
            raise UsageError(
                f"verify {verify!r} needs a draft with a confidence head; this draft has none (accepted: full)"
            )
    elif policy.kind != "full":
        raise UsageError(f"verify {verify!r} needs a draft; plain decoding accepts only 'full'")
    if stop_token_ids is not None and not isinstance(stop_token_ids, (list, tuple, np.ndarray)):
        raise UsageError(f"stop_token_ids must be a list of token ids, got {stop_token_ids!r}")
    stops = tuple(target.stop_token_ids if stop_token_ids is None else stop_token_ids)
    bad = [
        t
        for t in stops
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < config.vocab_size
    ]
    if bad:
        raise UsageError(f"stop_token_ids must be token ids in [0, {config.vocab_size}), got {bad[0]!r}")
    stops = tuple(int(t) for t in stops)
    block = 0 if draft is None else draft.config.block_size
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > context_len:
        warnings.warn(
            f"max_new_tokens {max_new_tokens} is capped at {context_len - longest} for the longest prompt "
            f"({longest} tokens): the model's context is {context_len} positions",
            stacklevel=2,
        )
    bucket = min(_bucket(longest, MIN_PROMPT_BUCKET), context_len)
    lens = np.ones((batch,), np.int32)  # padding rows: one token, limit 1, so done from the start
    lens[:n] = [len(p) for p in prompts]
    limits = np.ones((batch,), np.int32)
    limits[:n] = np.minimum(lens[:n] + max_new_tokens, context_len - 1)
    # From the buckets, not the actual lengths: requests of similar size must share one compiled loop.
    reach = block if tree is None else max(block, tree.nodes)  # a tree pass writes N + 1 slots from the anchor
    cache_len = cache_bucket(max(bucket, min(bucket + max_new_tokens, context_len - 1)) + reach + 2, context_len, reach)
    # A threshold or the scheduler can cut a block anywhere: narrower target passes at powers of two, then the
    # whole block.
    widths = () if policy.kind == "full" else tuple(sorted({1 << i for i in range(block.bit_length())} | {block + 1}))
    if tree is not None:  # the same over tree rows: the verified nodes are an index prefix
        m = tree.nodes
        widths = () if policy.kind == "full" else tuple(sorted({1 << i for i in range(m.bit_length())} | {m + 1}))
    spec = LoopSpec(
        () if draft is None else draft.config.target_layer_ids,
        block,
        context_len,
        cache_len,
        cache_len,  # every round commits a token, so no row runs more rounds than the cache has positions
        widths,
        policy.kind == "scheduler",
        tree,
    )
    stop_slots = STOP_SLOTS * max(1, -(-len(stops) // STOP_SLOTS))
    stop_ids = np.full((stop_slots,), -1, np.int32)
    stop_ids[: len(stops)] = stops
    thresholds = np.full((batch,), policy_threshold(policy), np.float32)
    sampling = SamplingParams.of(rows + [SamplingConfig()] * (batch - n))  # padding rows: greedy
    padded = np.zeros((batch, bucket), np.int32)
    for i, p in enumerate(prompts):
        padded[i, : len(p)] = p
    keys = _row_streams(jax.random.key(seed), np.arange(batch, dtype=np.int32))
    prep = Prepared(
        spec,
        padded,
        lens,
        limits,
        keys,
        stop_ids,
        thresholds,
        sampling,
        stops,
        max_new_tokens,
        n,
    )
    if not spec.scheduler:
        return prep
    temperatures = np.ones((block,), np.float32) if draft.calibration is None else draft.calibration
    prep = dataclasses.replace(prep, temperatures=np.asarray(temperatures, np.float32))
    width_seconds, plain_seconds = round_seconds_table(target, draft, prep)
    prior = typical_prior(target, draft, prep)
    gain, spread = _TYPICAL_GAIN.get(_table_key(target, draft, prep), (None, None))
    return dataclasses.replace(
        prep, width_seconds=width_seconds, plain_seconds=plain_seconds, prior=prior, gain=gain, spread=spread
    )


def generate(
    target,
    draft=None,
    prompts=None,
    max_new_tokens: int = 256,
    temperature=0.0,
    top_p=1.0,
    top_k=0,
    seed: int = 0,
    verify: str = "full",
    stop_token_ids=None,
    on_tokens=None,
    tree=None,
) -> GenerateResult:
    """Generate continuations of token-id prompts, speculatively when `draft` is given (interfaces.md §3).

    Output follows the target alone: greedy output equals plain greedy token for token, sampled output follows the
    target's (temperature / top-k / top-p) distribution. Row i draws from its own stream fold_in(key(seed), i).
    temperature, top_p and top_k take one value or a list with one value per prompt; they are data, so any mix
    runs in the loop compiled for the batch and cache buckets.

    on_tokens: optional callable streaming the output: the loop then runs STREAM_ROUNDS rounds per call and, after
    each call, `on_tokens(list[list[int]])` receives each prompt's tokens committed since the previous call (the
    same compiled loop and the same rounds, so the tokens are those of a call without it).

    tree: None (chain rounds, the default), a TreeConfig or "N[,K[,W]]": tree rounds (trees §7); the result then
    also holds nodes verified and accepted sibling ranks per round.
    """
    prep = prepare(
        target, draft, prompts, max_new_tokens, temperature, top_p, top_k, seed, verify, stop_token_ids, tree=tree
    )
    spec = prep.spec
    draft_def = draft_state = None
    if draft is not None:
        draft_def, draft_state = draft.decode_parts()
    target_def, target_state = target.decode_parts()
    start = time.perf_counter()
    state = prep.prefill(target, draft)
    if on_tokens is None:
        state = decode_loop(target_def, target_state, draft_def, draft_state, state, spec.max_rounds, spec=spec)
    else:
        sent = [0] * prep.num_prompts
        while True:
            tokens, lengths, done = jax.device_get((state.tokens, state.lengths, state.done))
            rows = _outputs(prep, tokens, lengths)
            on_tokens([row[n:] for row, n in zip(rows, sent)])
            sent = [len(row) for row in rows]
            if done.all():
                break
            state = decode_loop(target_def, target_state, draft_def, draft_state, state, STREAM_ROUNDS, spec=spec)
    tokens, lengths, rounds, acc, props, conf = jax.device_get(
        (state.tokens, state.lengths, state.rounds, state.acceptance, state.proposals, state.confidences)
    )
    seconds = time.perf_counter() - start
    out_tokens = _outputs(prep, tokens, lengths)
    out_acc, out_prop, out_conf = [], [], []
    for i in range(prep.num_prompts):
        out_acc.append(acc[i, : rounds[i]].tolist())
        out_prop.append(props[i, : rounds[i]].tolist())
        out_conf.append([] if conf is None else conf[i, : rounds[i]].tolist())
    total_rounds = int(rounds[: prep.num_prompts].sum())
    tau = float(sum(map(sum, out_acc)) / total_rounds) if total_rounds else 0.0
    result = GenerateResult(out_tokens, out_acc, out_prop, tau, seconds, out_conf)
    if spec.tree is not None:
        ranks = jax.device_get(state.accepted_ranks)
        result.nodes_verified = [list(p) for p in out_prop]
        result.accepted_ranks = [
            [[r for r in row if r >= 0] for row in ranks[i, : rounds[i]].tolist()] for i in range(prep.num_prompts)
        ]
    return result


def _outputs(prep: Prepared, tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    """Each prompt's generated tokens so far (prompt excluded), cut after the first stop token."""
    out = []
    for i in range(prep.num_prompts):
        n = prep.prompt_lens[i]
        row = tokens[i, n : min(lengths[i], n + prep.max_new_tokens)].tolist()
        for j, t in enumerate(row):
            if t in prep.stops:
                row = row[: j + 1]
                break
        out.append(row)
    return out


_ROUND_SECONDS: dict = {}
_TYPICAL_CONFIDENCES: dict = {}  # same keys: f32[rounds, block] confidence logits of the table's widest timing run
_TYPICAL_GAIN: dict = {}  # same keys: per width, (mean, variance) of tokens per round of that run's slowest live row
TIMED_ROUNDS = 16  # rounds per timed call of the loop when measuring the scheduler's costs


def round_seconds_table(target, draft, prep: Prepared, reps: int = 3) -> tuple[np.ndarray, float]:
    """The scheduler's cost table (spec §11's 1 / SPS), measured by running this batch's compiled loop:
    (f32[len(spec.widths)] seconds of a speculative round at each compiled target-pass width, seconds of a round
    without the draft).

    Each entry times TIMED_ROUNDS rounds of the very loop the request will run (same buckets, so the compilation
    is shared with it), with the width forced, or with the draft gate held shut, on this batch's prompts with no
    stop tokens: in-loop rounds cost more than their pieces timed one by one (while-loop overhead, fusion,
    bookkeeping), and those are the numbers the scheduler must compare. The settings take turns for `reps` passes
    and each keeps its fastest (noise only ever adds). The cost depends on shapes, not on weights or tokens:
    measured once per (model configs, loop spec, batch bucket, greedy or sampled batch) in this process.
    """
    spec = prep.spec
    key = _table_key(target, draft, prep)
    if key not in _ROUND_SECONDS:
        room = spec.cache_len - spec.width - 2 - int(prep.prompt_lens.max())
        rounds = max(1, min(TIMED_ROUNDS, room // spec.width))
        live = prep.prompt_lens < prep.limits
        timing = dataclasses.replace(
            prep,
            limits=np.where(live, spec.cache_len - spec.width - 2, prep.limits).astype(np.int32),
            stop_ids=np.full_like(prep.stop_ids, -1),
            width_seconds=np.ones((len(spec.widths),), np.float32),
            plain_seconds=1.0,
        )

        def seconds(**scheduler) -> float:
            state = jax.block_until_ready(timing.prefill(target, draft, **scheduler))
            begin = time.perf_counter()
            args = (*target.decode_parts(), *draft.decode_parts(), state, rounds)
            state = jax.block_until_ready(decode_loop(*args, spec=spec))
            elapsed = (time.perf_counter() - begin) / rounds
            if scheduler.get("forced") == len(spec.widths) - 1:  # every draft of every round verified
                n = np.asarray(state.rounds)[live]
                z = np.asarray(state.confidences)[live]
                _TYPICAL_CONFIDENCES[key] = np.concatenate([z[i, : n[i]] for i in range(len(n))])
                committed = np.asarray(state.acceptance)[live]
                _TYPICAL_GAIN[key] = slowest_row_stats([committed[i, : n[i]] for i in range(len(n))], spec.widths)
            return elapsed

        # Every setting once per pass, passes repeated: all settings see the same machine (a shared machine's load
        # moves within seconds, and one entry timed in a busy moment would flip the plan); the first pass compiles.
        settings = [dict(forced=i) for i in range(len(spec.widths))] + [dict(drafting=False)]
        times = np.array([[seconds(**kw) for kw in settings] for _ in range(reps + 1)][1:])
        best = times.min(axis=0)
        # On a loaded machine an entry can come out below a cheaper one's; the costs are ordered by construction (a
        # wider pass does more; a plain round is a width-1 round without the draft), so a misordered entry is
        # raised to its neighbour's: noise then never makes drafting, or a wider pass, look cheaper than it is.
        width_seconds = np.maximum.accumulate(best[:-1]).astype(np.float32)
        _ROUND_SECONDS[key] = width_seconds, float(min(best[-1], width_seconds[0]))
    return _ROUND_SECONDS[key]


def slowest_row_stats(committed: list[np.ndarray], widths) -> tuple[np.ndarray, np.ndarray]:
    """(f32[len(widths)] mean, f32[len(widths)] variance) of the tokens a round commits to the slowest row, per
    compiled width, from each live row's i32[rounds] commits in rounds that verified every draft.

    A round at width w verifies the same drafts' first w positions, so it commits min(c, w) of a whole-block
    round's c (acceptance is a prefix). A batch's first round is planned at its width, and the table's raw gain at
    the widest width overstates what a narrower round can deliver (batch 8 on a CPU plans width 4: raw 2.9 tokens,
    capped 2.3), which opened the gate for rounds that cost the slowest row 1-3 plain rounds each."""
    means, variances = [], []
    for w in widths:
        slowest = min((np.minimum(c, w) for c in committed), key=np.mean)
        means.append(np.mean(slowest))
        variances.append(np.var(slowest))
    return np.asarray(means, np.float32), np.asarray(variances, np.float32)


def _table_key(target, draft, prep: Prepared) -> tuple:
    # The batch bucket is not in LoopSpec (shapes come from the arrays) but sets every cost: without it, a table
    # timed at batch 1 was reused at batch 64, where drafting costs several times more.
    greedy = bool(np.all(np.asarray(prep.sampling.greedy)))
    batch = len(prep.prompt_lens)
    return (target.config, draft.config, prep.spec, batch, greedy, jax.default_backend())


def typical_prior(target, draft, prep: Prepared) -> np.ndarray | None:
    """f32[block] the mean prefix confidences s_j (under this request's temperatures) of the rounds the cost
    table's widest timing run drafted (`round_seconds_table`), or None when that table was not measured here.

    The scheduler plans its first round on it instead of on ones: a batch where drafting does not pay then starts
    as plain decoding rather than with a whole-block round. It comes from earlier rounds of the same pair (on the
    prompts of the request that measured the table), never from a round's own drafts, so decoding stays lossless.
    """
    z = _TYPICAL_CONFIDENCES.get(_table_key(target, draft, prep))
    if z is None or not len(z):
        return None
    s = prefix_confidences(jnp.asarray(z), jnp.asarray(prep.temperatures))
    return np.asarray(jnp.mean(s, axis=0), np.float32)
