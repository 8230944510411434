"""verify="scheduler" over draft trees (trees §6): which nodes each row verifies, decided batch-wide from the nodes'
acceptance estimates and a cost table indexed by the round's target tokens. Pure functions of arrays.

The chain scheduler (schedule.py) plans one width from the previous round's confidences. A tree round instead
runs the paper's greedy causal procedure (spec §11) on the current round's node scores: candidates (row, node) are
pooled in the stable order (s desc, row, score rank), s = exp(score) the node's estimated chance of acceptance, and
taken while the expected throughput Θ = E / round_seconds[N_tok] strictly improves; the walk stops at the first
candidate that does not improve it. Lossless: a node's s is computed from its ancestors' tokens only (never its
own), every ancestor precedes it in the pool (scores never increase from parent to child; ties go to the lower
score rank, and a parent ranks before its children), so whether node n is verified depends only on candidates
before it, none drawn after or from x_n (trees §1, L2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_seconds(widths: jax.Array, width_seconds: jax.Array, live_rows: jax.Array, size: int) -> jax.Array:
    """f32[size] round_seconds[n]: the seconds of a tree round whose target pass carries n tokens (n = Σ_live 1 + N_v).

    widths: i32[W] the compiled target-pass widths (ascending, the first 1); width_seconds: f32[W] one whole round
    (tree build, target pass, acceptance, compaction) at each width, timed in the compiled loop as the chain's
    table (loop.round_seconds_table); live_rows: i32[] rows still decoding. A pass at width w over the live rows
    carries live_rows * w tokens; between those points the table interpolates linearly, below the first it is the
    narrowest round's time (the anchors alone), and above the last the widest's. size = batch * (N + 1) + 1.
    """
    points = jnp.maximum(live_rows, 1).astype(jnp.float32) * widths.astype(jnp.float32)
    return jnp.interp(jnp.arange(size, dtype=jnp.float32), points, width_seconds.astype(jnp.float32))


def schedule_nodes(score: jax.Array, eligible: jax.Array, live: jax.Array, seconds: jax.Array) -> jax.Array:
    """bool[b, N] nodes to verify under the pooled greedy with the first-non-improvement stop (trees §6).

    score: f32[b, N] each row's node scores (log estimate of P(accepted)) in score-rank order, best first;
    eligible: bool[b, N] valid and in-room nodes (the rest, and done rows' nodes, get s = 0 and are never taken);
    live: bool[b]; seconds: f32[T] round seconds by target tokens (`token_seconds`, T >= b * (N + 1) + 1).
    Each row's verified set is a prefix of its eligible nodes in score-rank order, hence closed under ancestors
    and earlier siblings.
    """
    b, n = score.shape
    s = jnp.where(eligible & live[:, None], jnp.exp(score), 0.0).reshape(-1)  # exp(-inf) = 0 for invalid nodes
    row = jnp.repeat(jnp.arange(b, dtype=jnp.int32), n)
    rank = jnp.tile(jnp.arange(n, dtype=jnp.int32), b)
    order = jnp.lexsort((rank, row, -s))  # the last key sorts first: s desc, then row, then score rank
    pooled = s[order]
    rows_live = jnp.sum(live).astype(jnp.float32)
    last = seconds.shape[0] - 1
    taken = jnp.arange(1, b * n + 1, dtype=jnp.int32)
    tokens = jnp.minimum(rows_live.astype(jnp.int32) + taken, last)
    theta = (rows_live + jnp.cumsum(pooled)) / seconds[tokens]  # Θ after taking the first k + 1 candidates
    before = jnp.concatenate([(rows_live / seconds[jnp.minimum(rows_live.astype(jnp.int32), last)])[None], theta[:-1]])
    improves = (pooled > 0) & (theta > before)
    count = jnp.sum(jnp.cumprod(improves.astype(jnp.int32)))  # candidates taken before the first non-improvement
    chosen = jnp.zeros((b * n,), bool).at[order].set(jnp.arange(b * n) < count)
    return chosen.reshape(b, n)


def forced_nodes(eligible: jax.Array, width: jax.Array) -> jax.Array:
    """bool[b, N] the first width - 1 eligible nodes of each row in score-rank order (how the cost table times a
    round at a compiled width: every row verifies as many nodes as the width holds)."""
    before = jnp.cumsum(eligible.astype(jnp.int32), axis=1)  # eligible nodes up to and including this one
    return eligible & (before <= width - 1)


def expected_throughput(
    score: jax.Array, verified: jax.Array, live: jax.Array, seconds: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(f32[] Θ, f32[] round seconds) of a round's verified sets (any order): Θ = Σ_live (1 + Σ_verified s) /
    round_seconds[Σ_live (1 + N_v)], the scheduler's objective at its choice, which the draft gate compares with
    plain decoding, and the round's cost from the table (what a probe round like it costs)."""
    s = jnp.where(verified & live[:, None], jnp.exp(score), 0.0)
    expected = jnp.sum(jnp.where(live, 1.0 + jnp.sum(s, axis=1), 0.0))
    tokens = jnp.sum(jnp.where(live, 1 + jnp.sum(verified, axis=1), 0))
    cost = seconds[jnp.minimum(tokens, seconds.shape[0] - 1)]
    return expected / cost, cost
