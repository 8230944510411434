"""One tree round of the decode loop (trees §3-§6): build the tree, one masked target pass over all its nodes,
recursive rejection sampling along it, K/V compaction of the accepted path, then the chain's commit step.

Called from `loop._round` when `LoopSpec.tree` is set; the chain path is untouched. With verify="scheduler" the
verified nodes come from the pooled greedy over the batch's node scores (tree_schedule.py, trees §6) on a token
cost table derived from the per-width round times that `loop.round_seconds_table` measures in this very loop (tree
build included); the target pass then runs at the narrowest compiled width that holds every live row's nodes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dspark_jax import ops
from dspark_jax.cache import compact_path, tree_mask
from dspark_jax.decoding import loop
from dspark_jax.decoding.propose import draft_backbone
from dspark_jax.decoding.state import DecodeState
from dspark_jax.decoding.tree import TOPK, TreeProposal, build_tree
from dspark_jax.decoding.tree_schedule import expected_throughput, forced_nodes, schedule_nodes, token_seconds
from dspark_jax.decoding.verify import target_pass
from dspark_jax.sampling import SamplingParams, first_argmax, probabilities


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PathProposal:
    """What the chain's commit step reads of a proposal: the accepted path's tokens and confidence logits,
    [batch, B] each (entries past the accepted length are ignored)."""

    tokens: jax.Array
    confidence_logits: jax.Array


def greedy_accept_tree(tokens, parents, num_proposed, target_logits):
    """Acceptance when every row is greedy: walk the tree taking the child equal to the target's argmax.

    tokens, parents i32[b, N]; num_proposed i32[b]; target_logits f32[b, N+1, V]. Same outcome as the rejection
    rule on one-hot distributions. Returns (accept_len i32[b], accepted_nodes i32[b, N], next_token i32[b]).
    """
    best = first_argmax(target_logits)  # [b, N+1]
    b, n = tokens.shape
    rows = jnp.arange(b)

    def step(j, carry):
        cur, alen, path = carry
        hit = (j < num_proposed) & (parents[:, j] == cur) & (tokens[:, j] == best[rows, cur + 1])
        path = jnp.where(hit[:, None] & (jnp.arange(n) == alen[:, None]), j, path)
        return jnp.where(hit, j, cur), alen + hit.astype(jnp.int32), path

    init = (jnp.full((b,), -1, jnp.int32), jnp.zeros((b,), jnp.int32), jnp.full((b, n), -1, jnp.int32))
    cur, alen, path = jax.lax.fori_loop(0, n, step, init)
    return alen, path, best[rows, cur + 1]


def accept_tree(sampling: SamplingParams, tree: TreeProposal, target_logits, keys, max_siblings: int):
    """Recursive rejection sampling over each row's tree (trees §1-§2). target_logits f32[b, N+1, V]; keys: per-row
    keys [b]. An all-greedy batch compares argmaxes; otherwise the kernel (ops.accept_tree) with each node's row
    D_c, one-hot fast path when every row drafted deterministic top-k candidates."""
    args = (tree.tokens, tree.parents, tree.num_verify)

    def general():
        target_probs = probabilities(target_logits, sampling)
        n = tree.tokens.shape[1]
        pairs = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
        uniforms = jax.vmap(lambda k: jax.random.uniform(k, (n,)))(pairs[:, 0])
        residual_u = jax.vmap(lambda k: jax.random.uniform(k, ()))(pairs[:, 1])

        def onehot():
            return ops.accept_tree(*args, target_probs, None, uniforms, residual_u, max_siblings=max_siblings)

        def rows():
            return ops.accept_tree(*args, target_probs, tree.rows(), uniforms, residual_u, max_siblings=max_siblings)

        return jax.lax.cond(jnp.all(tree.row_mode == TOPK), onehot, rows)

    greedy = jnp.broadcast_to(sampling.greedy, tree.tokens.shape[:1])
    return jax.lax.cond(jnp.all(greedy), lambda: greedy_accept_tree(*args, target_logits), general)


def tree_round(target, draft, state: DecodeState, spec) -> DecodeState:
    """One tree round for every row (trees §3-§5); rows already done are left unchanged."""
    cfg = spec.tree
    keys, draft_keys, accept_keys = loop._row_keys(state.keys)
    bsz = state.lengths.shape[0]
    rows = jnp.arange(bsz)
    anchor_pos = state.lengths - 1
    anchors = state.tokens[rows, anchor_pos]
    hidden, draft_cache = draft_backbone(
        draft, state.draft_cache, state.pending, state.num_pending, anchors, anchor_pos
    )
    block = spec.block_size
    full = cfg.nodes + 1
    widths = spec.verify_widths or (full,)
    live = ~state.done
    policy = seconds = None
    if spec.scheduler:
        sched = state.scheduler
        width_arr = jnp.asarray(widths, jnp.int32)
        seconds = token_seconds(width_arr, sched.width_seconds, jnp.sum(live), bsz * full + 1)

        def policy(score, eligible):
            chosen = schedule_nodes(score, eligible, live, seconds)
            forced = forced_nodes(eligible, width_arr[jnp.maximum(sched.forced, 0)])
            return jnp.where(sched.forced >= 0, forced, chosen)

    tree = build_tree(
        draft, hidden, anchors, state.sampling, draft_keys, cfg, loop._room(state, spec), state.thresholds, policy
    )
    depth1 = jnp.concatenate([jnp.zeros((bsz, 1), jnp.int32), 1 + tree.depth], axis=1)
    tokens = jnp.concatenate([anchors[:, None], tree.tokens], axis=1)  # [b, N+1]
    positions = anchor_pos[:, None] + depth1
    mask = tree_mask(tree.parents, anchor_pos, spec.cache_len, block)
    if len(widths) == 1:
        logits, taps, target_cache = target_pass(
            target, state.target_cache, tokens, anchor_pos, spec.tap_layer_ids, positions, mask
        )
    else:
        # The verified set is an index prefix closed under ancestors: the first w rows are a tree of their own.
        needed = jnp.max(jnp.where(state.done, 1, tree.num_verify + 1))
        branch = jnp.searchsorted(jnp.asarray(widths, jnp.int32), needed).astype(jnp.int32)
        if spec.scheduler:  # the cost table's timing runs pin the width
            branch = jnp.where(state.scheduler.forced >= 0, state.scheduler.forced, branch)

        def narrow(w):
            def run(cache):
                logits, taps, cache = target_pass(
                    target,
                    cache,
                    tokens[:, :w],
                    anchor_pos,
                    spec.tap_layer_ids,
                    positions[:, :w],
                    mask[:, :w],
                )
                pad = ((0, 0), (0, full - w), (0, 0))  # rows past w are never read: N_v < w
                return jnp.pad(logits, pad), jnp.pad(taps, pad), cache

            return run

        logits, taps, target_cache = loop.switch_in_place(branch, [narrow(w) for w in widths], state.target_cache)
    alen, path, next_token = accept_tree(state.sampling, tree, logits, accept_keys, cfg.branch)
    if path.shape[1] < block:
        path = jnp.pad(path, ((0, 0), (0, block - path.shape[1])), constant_values=-1)
    path = path[:, :block]  # at most B accepted nodes: depth < B
    target_cache = compact_path(target_cache, path, anchor_pos)
    on_path = path >= 0
    node = jnp.maximum(path, 0)
    path_tokens = jnp.where(on_path, jnp.take_along_axis(tree.tokens, node, axis=1), 0)
    path_conf = jnp.where(on_path, jnp.take_along_axis(tree.conf_logits, node, axis=1), 0.0)
    path_rank = jnp.where(on_path, jnp.take_along_axis(tree.rank, node, axis=1), -1)
    # Draft context (trees §5): the old anchor's and the accepted nodes' target features, in path order.
    src = jnp.concatenate([jnp.zeros((bsz, 1), jnp.int32), 1 + node], axis=1)  # [b, B+1]
    pending_taps = jnp.take_along_axis(taps, src[:, :, None], axis=1)
    new = loop._accept_and_commit(
        state,
        spec,
        PathProposal(path_tokens, path_conf),
        logits,
        pending_taps,
        target_cache,
        draft_cache,
        keys,
        accept_keys,
        tree.num_verify,
        outcome=(alen, next_token),
    )
    # Ranks of the committed path nodes (a stop token can cut the path: committed = accepted then).
    kept = jnp.minimum(new.lengths - state.lengths, alen)
    slot = jnp.arange(block, dtype=jnp.int32)[None, :]
    ranks = jnp.where(slot < kept[:, None], path_rank, -1)
    round_idx = jnp.minimum(state.rounds, spec.max_rounds - 1)
    record = jnp.where(live, round_idx, spec.max_rounds)  # done rows write out of bounds: dropped
    new = dataclasses.replace(new, accepted_ranks=state.accepted_ranks.at[rows, record].set(ranks, mode="drop"))
    if spec.scheduler:  # the draft gate: does what drafting delivers beat plain decoding of the live rows?
        verified = jnp.arange(cfg.nodes)[None, :] < tree.num_verify[:, None]
        _, cost = expected_throughput(tree.score, verified, live, seconds)
        sched, delivered = state.scheduler.observed(new.lengths - state.lengths, live, cost)
        new = dataclasses.replace(new, scheduler=sched.after_round(delivered, jnp.sum(live), cost))
    return new
