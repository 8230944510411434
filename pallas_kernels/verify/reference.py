"""Pure-jnp reference for the speculative-decoding acceptance step; it DEFINES the right answer.

Multi-candidate rejection sampling over a draft tree given by parent indices (a chain is the special case).
The Pallas kernels in this package must agree with :func:`verify_reference` up to float summation order.

Rule, per batch row (rows are independent)::

    cur = root; dist = target_probs[0]
    walk the proposed children c of cur in increasing node index:
        accept c  iff  uniforms[c] < min(1, dist[x_c] / max(draft_probs[c, x_c], 1e-8))
        accepted: cur = c, dist = target_probs[c + 1], continue with c's children
        rejected: r = max(0, dist - draft_probs[c]); Z = sum(r)
                  dist = r * (1 / Z)   if Z > 1e-8   else dist (unchanged: the distribution before this rejection)
    no (remaining) children: next_token = inverse-CDF draw from dist with residual_uniforms

Because nodes are topologically ordered (parent < child), the walk is one forward pass over node indices:
node j is tried iff j < num_proposed and parents[j] == cur at the moment j is reached. Children of an
ancestor that were not tried yet are skipped once the walk moved below them, exactly as in the tree walk.

Inverse CDF: with cs = cumsum(dist), next_token = the smallest v with cs[v] > u * cs[-1], clamped to the last
index with non-zero mass (rounding can leave no such v, or pick a trailing zero); 0 if dist has no mass.

Choices the spec left open (the kernels follow them too):

* Rejection with positive residual mass <= 1e-8 keeps `dist` unchanged. For a chain that is "sample from
  pi_A instead"; in a tree the next sibling is then also tested against that unchanged distribution.
* The residual is normalised as `r * (1 / Z)` (one reciprocal, then a multiply), the form the kernels use.
* `num_proposed` is clipped to [0, nodes]; draft tokens are clipped to [0, vocab) before any gather, so
  padding tokens of unproposed nodes (e.g. -1) are harmless. Parents of proposed nodes must satisfy
  -1 <= parent < node; other values give unspecified (but memory-safe) results.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Floors from the spec: draft probability in the acceptance ratio, and the residual mass below which the
# residual is considered empty.
PROB_FLOOR = 1e-8
MASS_FLOOR = 1e-8


class VerifyResult(NamedTuple):
    """Outputs of the acceptance step (a pytree, so it can be carried through `lax.while_loop`).

    accept_len: i32[batch] -- number of accepted nodes A (length of the accepted path from the root).
    accepted_nodes: i32[batch, nodes] -- node ids along the accepted path, in order, padded with -1.
    next_token: i32[batch] -- the extra token: correction (after a rejection) or bonus (leaf accepted).
    """

    accept_len: jax.Array
    accepted_nodes: jax.Array
    next_token: jax.Array


def inverse_cdf(dist: jax.Array, u: jax.Array) -> jax.Array:
    """Draw from unnormalised non-negative `dist: f32[batch, vocab]` with `u: f32[batch]`; returns i32[batch].

    Smallest v with cumsum(dist)[v] > u * total (total = the last cumsum entry, so threshold and sum agree),
    clamped to the last index with non-zero mass; 0 when the row has no mass.
    """
    vocab = dist.shape[-1]
    cs = jnp.cumsum(dist, axis=-1)
    thr = u * cs[:, -1]
    hit = cs > thr[:, None]
    first = jnp.argmax(hit, axis=-1).astype(jnp.int32)
    idx = jnp.arange(vocab, dtype=jnp.int32)
    last_nz = jnp.max(jnp.where(dist > 0, idx, -1), axis=-1)
    tok = jnp.where(jnp.any(hit, axis=-1), jnp.minimum(first, last_nz), last_nz)
    return jnp.maximum(tok, 0).astype(jnp.int32)


def _walk(draft_tokens, parents, num_proposed, target_probs, uniforms, residual_uniforms, judge) -> VerifyResult:
    """The walk over node indices both references take (the module docstring's rule). judge(j, dist, x, q) gives
    node j's acceptance ratio f32[batch] and the residual f32[batch, vocab] a rejection leaves, for its token
    x i32[batch] under the current dist f32[batch, vocab] (q = dist[x])."""
    batch, nodes = draft_tokens.shape
    vocab = target_probs.shape[-1]
    target_probs = target_probs.astype(jnp.float32)
    uniforms = uniforms.astype(jnp.float32)
    tokens = jnp.clip(draft_tokens.astype(jnp.int32), 0, vocab - 1)
    parents = parents.astype(jnp.int32)
    k = jnp.clip(num_proposed.astype(jnp.int32), 0, nodes)
    rows = jnp.arange(batch)

    def step(j, carry):
        cur, dist, alen, path = carry
        eligible = (j < k) & (parents[:, j] == cur)
        x = tokens[:, j]
        q = dist[rows, x]
        ratio, resid = judge(j, dist, x, q)
        accept = eligible & (uniforms[:, j] < jnp.minimum(1.0, ratio))
        reject = eligible & ~accept
        mass = jnp.sum(resid, axis=-1)
        applied = reject & (mass > MASS_FLOOR)
        inv = 1.0 / jnp.where(applied, mass, 1.0)
        dist = jnp.where(
            accept[:, None], target_probs[:, j + 1], jnp.where(applied[:, None], resid * inv[:, None], dist)
        )
        path = jnp.where(accept[:, None] & (jnp.arange(nodes) == alen[:, None]), j, path)
        return jnp.where(accept, j, cur), dist, alen + accept.astype(jnp.int32), path

    init = (
        jnp.full((batch,), -1, jnp.int32),
        target_probs[:, 0],
        jnp.zeros((batch,), jnp.int32),
        jnp.full((batch, nodes), -1, jnp.int32),
    )
    # (No loop at all for nodes == 0: the body cannot even be traced on size-0 node axes.)
    _, dist, alen, path = jax.lax.fori_loop(0, nodes, step, init) if nodes else init
    next_token = inverse_cdf(dist, residual_uniforms.astype(jnp.float32))
    return VerifyResult(alen, path, next_token)


@jax.jit
def verify_reference(
    draft_tokens: jax.Array,
    parents: jax.Array,
    num_proposed: jax.Array,
    target_probs: jax.Array,
    draft_probs: jax.Array,
    uniforms: jax.Array,
    residual_uniforms: jax.Array,
) -> VerifyResult:
    """Reference acceptance step (see the module docstring for the rule).

    Args:
      draft_tokens: i32[batch, nodes] -- token of each draft node.
      parents: i32[batch, nodes] -- parent node of each node, -1 = the root; topologically ordered.
      num_proposed: i32[batch] -- nodes with index < num_proposed are proposed, the rest are ignored.
      target_probs: f32[batch, nodes+1, vocab] -- row 0 = target at the root, row i+1 = target after node i.
      draft_probs: f32[batch, nodes, vocab] -- draft distribution node i's token was sampled from.
      uniforms: f32[batch, nodes] -- U(0,1) per node for the acceptance test.
      residual_uniforms: f32[batch] -- U(0,1) per row for the extra token.

    Returns:
      VerifyResult(accept_len i32[batch], accepted_nodes i32[batch, nodes], next_token i32[batch]).

    Cost: a `lax.fori_loop` over nodes, each step O(batch * vocab) vectorised work; memory O(batch * vocab)
    beyond the inputs. No Python loop over the vocabulary and no host syncs (jit/while_loop safe).
    """
    draft_probs = draft_probs.astype(jnp.float32)
    rows = jnp.arange(draft_tokens.shape[0])

    def judge(j, dist, x, q):
        p_row = draft_probs[:, j]
        return q / jnp.maximum(p_row[rows, x], PROB_FLOOR), jnp.maximum(dist - p_row, 0.0)

    return _walk(draft_tokens, parents, num_proposed, target_probs, uniforms, residual_uniforms, judge)


@jax.jit
def verify_reference_onehot(
    draft_tokens: jax.Array,
    parents: jax.Array,
    num_proposed: jax.Array,
    target_probs: jax.Array,
    uniforms: jax.Array,
    residual_uniforms: jax.Array,
) -> VerifyResult:
    """The rule of :func:`verify_reference` when every draft row is `one_hot(draft_tokens[j])` (deterministic
    top-k candidates), without building the [batch, nodes, vocab] one-hots.

    With D = one_hot(x) the test is `u < min(1, dist[x])` and a rejection leaves `max(0, dist - one_hot(x))`, i.e.
    dist with dist[x] zeroed (dist[x] <= 1): one element write instead of a [vocab] row per node. The residual is
    the same array as the reference's, so the result equals the reference on explicit one-hot rows.
    """
    rows = jnp.arange(draft_tokens.shape[0])

    def judge(j, dist, x, q):
        # max(0, dist - one_hot(x)) differs from dist at x only: the same array as the reference's residual.
        return q, dist.at[rows, x].set(jnp.maximum(q - 1.0, 0.0))

    return _walk(draft_tokens, parents, num_proposed, target_probs, uniforms, residual_uniforms, judge)
