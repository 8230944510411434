"""The one verify kernel body, shared by the Triton (gpu.py) and Mosaic (tpu.py) variants.

The variants differ only in how a vocab tile is loaded (masked Triton load vs. zero-padded vocab), the memory
space of the per-row scalars, and compiler params; everything else -- scalar packing, the kernel, and turning
its output back into a :class:`VerifyResult` -- lives here.

Work split:

* Wrapper (plain jnp, before the kernel): gathers every probability the acceptance tests can need at a drafted
  token, so the kernel never indexes the vocabulary by a data-dependent token:
  `q0[j] = target[parents[j] + 1, x_j]` and `D[i, j] = draft[i, x_j]` (O(nodes^2) scalars per row).
* Kernel (grid = (batch,), one program per row): walks the nodes in index order (statically unrolled), doing
  the acceptance test on scalars; on a rejection it streams the vocab once to get the residual mass Z; at the
  end it streams the vocab twice for the inverse-CDF draw (total + last non-zero, then an early-exit search
  for the crossing tile, then a binary search inside that tile with masked sums).
* Wrapper (after): rebuilds accept_len / accepted_nodes from the last accepted node by walking parents.

One-hot fast path (trees §2.4; `draft_probs=None`: every row is one_hot(x_j), deterministic top-k candidates): no
draft rows exist at all. `D[i, j] = [x_i == x_j]`, the ratio's denominator is 1, and the residual mass after
rejecting x is the scalar `sum(dist) - min(dist[x], 1)` (the rejection zeroes dist[x] <= 1), with `sum(dist)` the
target row's sum (gathered by the wrapper) or, after an applied rejection, `Z * (1 / Z)`: rejections stream no
vocabulary. The final draw re-derives the distribution from the target tile with each rejected sibling's token
zeroed and rescaled -- one tile read per vocab tile.

The running distribution is never written to memory. It is re-derived per tile from the target row of the
current node and the draft rows of the already-rejected siblings ("level mates"), each applied as
`max(0, d - p_i) * inv_Z_i` in rejection order -- the same formula as the reference. This keeps the kernel free
of read-after-write through memory (racy in Triton without barriers) and of scratch buffers, at the cost of
re-reading one draft tile per rejected sibling: a row whose current node has m rejected children reads
(m + 1) tiles per vocab tile. Chains reject at most once, so at most 2 tiles per vocab tile.

Packed per-row scalars (all lengths static; the kernel sees them with a unit middle axis, `[batch, 1, width]`,
so that a per-row block's last two dims equal the array's -- a Mosaic block-shape rule):

* `fscal: f32[batch, 2*nodes + nodes*nodes + 1]` = [uniforms | q0 | D (row-major over (i, j)) | residual_u];
  the one-hot path appends `s0[j]` = sum of the target row node j is first tested against (f32[nodes]).
* `iscal: i32[batch, nodes + 1]` = [parents | num_proposed (clipped to [0, nodes])]; the one-hot path appends the
  (clipped) tokens (i32[nodes]).
* kernel output `out: i32[batch, 1, 2]` = [last accepted node (-1 = root) | next_token].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .reference import MASS_FLOOR, PROB_FLOOR, VerifyResult

# load_tile(ref, row, start) -> f32 tile whose last axis holds vocab[start : start + block_v] of `row`
# (0 beyond the real vocabulary).
LoadTile = Callable[[Any, jax.Array, jax.Array], jax.Array]


def pack_scalars(draft_tokens, parents, num_proposed, target_probs, draft_probs, uniforms, residual_uniforms):
    """Gather the per-node probabilities at drafted tokens and pack the per-row scalars.

    Args: as :func:`pallas_kernels.verify.reference.verify_reference` (target/draft already f32); draft_probs
    None = one-hot rows (then D comes from token equality and the one-hot path's extra scalars are appended).
    Returns: `(fscal f32[batch, 2N + N*N + 1 (+ N)], iscal i32[batch, N + 1 (+ N)])`, N = nodes.
    """
    batch, nodes = draft_tokens.shape
    vocab = target_probs.shape[-1]
    tokens = jnp.clip(draft_tokens.astype(jnp.int32), 0, vocab - 1)
    par = parents.astype(jnp.int32)
    k = jnp.clip(num_proposed.astype(jnp.int32), 0, nodes)
    # Row of the distribution node j is tested against when it is the first child tried (parent + 1); the
    # clip only guards unproposed garbage.
    prow = jnp.clip(par + 1, 0, nodes)
    flat_target = target_probs.reshape(batch, (nodes + 1) * vocab)
    q0 = jnp.take_along_axis(flat_target, prow * vocab + tokens, axis=1)
    if draft_probs is None:  # one_hot(x_i)[x_j]
        d = (tokens[:, :, None] == tokens[:, None, :]).astype(jnp.float32)
        extra_f = [jnp.take_along_axis(jnp.sum(target_probs, axis=-1), prow, axis=1)]
        extra_i = [tokens]
    else:
        d = jnp.take_along_axis(draft_probs, jnp.broadcast_to(tokens[:, None, :], (batch, nodes, nodes)), axis=2)
        extra_f = extra_i = []
    fscal = jnp.concatenate(
        [uniforms.astype(jnp.float32), q0, d.reshape(batch, nodes * nodes), residual_uniforms[:, None], *extra_f],
        axis=1,
    ).astype(jnp.float32)
    iscal = jnp.concatenate([par, k[:, None], *extra_i], axis=1)
    return fscal, iscal


def make_kernel(
    *,
    nodes: int,
    n_tiles: int,
    block_v: int,
    load_tile: LoadTile,
    max_siblings: int | None = None,
    onehot: bool = False,
):
    """Kernel body for one batch row.

    onehot: every draft row is one_hot(x_j) (the one-hot fast path, module docstring): the kernel then takes no
    draft ref, `kernel(fs_ref, is_ref, tgt_ref, out_ref)`.

    max_siblings: when the caller guarantees that siblings are contiguous and at most this many (the tree
    builder's depth-major order with K children per node), the rejected siblings of node j lie in
    [j - max_siblings + 1, j), so the statically unrolled walk is O(nodes * max_siblings) instead of O(nodes^2).
    None: every earlier node is a candidate sibling (any topological order).

    Refs (batch dim squeezed by the BlockSpecs):
      fs_ref: f32[1, 2N + N*N + 1], is_ref: i32[1, N + 1] -- packed scalars (see module docstring).
      tgt_ref: f32[N + 1, Vk], drf_ref: f32[N, Vk] -- the row's target / draft probabilities; Vk is the vocab
        as the variant sees it (Triton: unpadded, masked loads; Mosaic: padded to a multiple of block_v).
      out_ref: i32[1, 2] -- [last accepted node, next token].
    """
    n, t_sz = nodes, block_v
    log2_block = t_sz.bit_length() - 1
    if 1 << log2_block != t_sz:
        raise ValueError(f"block_v must be a power of two for the in-tile binary search, got {t_sz}")

    def kernel(fs_ref, is_ref, tgt_ref, *refs):
        drf_ref, out_ref = (None, refs[0]) if onehot else refs
        k = is_ref[0, n]
        par = [is_ref[0, j] for j in range(n)]
        tok = [is_ref[0, n + 1 + j] for j in range(n)] if onehot else None

        def fs(i):
            return fs_ref[0, i]

        def tile_start(t):
            return pl.multiple_of(t * t_sz, t_sz)

        def dist_tile(start, cur, mates):
            # Distribution at `cur` after its rejected children: target row, then each applied residual.
            d = load_tile(tgt_ref, cur + 1, start)
            if onehot:  # max(0, d - one_hot(x_i)) * inv: only lane x_i changes before the rescale
                lanes = start + lax.broadcasted_iota(jnp.int32, d.shape, d.ndim - 1)
                for i, active, inv in mates:
                    resid = jnp.where(lanes == tok[i], jnp.maximum(d - 1.0, 0.0), d) * inv
                    d = jnp.where(active, resid, d)
                return d
            for i, active, inv in mates:

                def apply(d, i=i, inv=inv):
                    return jnp.maximum(d - load_tile(drf_ref, i, start), 0.0) * inv

                # A branch (not a select) so unrelated draft rows are never loaded.
                d = lax.cond(active, apply, lambda d: d, d)
            return d

        cur = jnp.int32(-1)
        applied, inv_mass, mass_of = [], [], []
        for j in range(n):
            eligible = (j < k) & (par[j] == cur)
            # Children of `cur` tried before j were all rejected (otherwise the walk would have moved on).
            lo = 0 if max_siblings is None else max(0, j - max_siblings + 1)
            mates = [(i, applied[i] & (par[i] == cur), inv_mass[i]) for i in range(lo, j)]
            q = fs(n + j)
            for i, active, inv in mates:
                q = jnp.where(active, jnp.maximum(q - fs(2 * n + i * n + j), 0.0) * inv, q)
            p = fs(2 * n + j * n + j)
            ratio = q / jnp.maximum(p, PROB_FLOOR)
            accept = eligible & (fs(j) < jnp.minimum(1.0, ratio))
            reject = eligible & jnp.logical_not(accept)

            def mass_body(t, acc, j=j, cur=cur, mates=mates):
                start = tile_start(t)
                d = dist_tile(start, cur, mates)
                return acc + jnp.sum(jnp.maximum(d - load_tile(drf_ref, j, start), 0.0))

            # Zero trips unless rejected. (A loop bound rather than lax.cond: Triton's cond lowering cannot
            # yield a constant from a branch.)
            if onehot:
                # sum(dist) - min(dist[x_j], 1): the dist's sum is the target row's, or 1 = Z * (1 / Z) after the
                # latest applied rejection (mates are in rejection order).
                total = fs(2 * n + n * n + 1 + j)
                for i, active, inv in mates:
                    total = jnp.where(active, mass_of[i] * inv, total)
                mass = jnp.where(reject, total - jnp.minimum(q, 1.0), 0.0)
                mass_of.append(mass)
            else:
                # Typed bounds: with Python ints the Triton lowering made the select an i1, and an scf.for whose
                # bounds differ in type fails to verify on the device (seen on an H200, jax 0.11.2).
                trips = jnp.where(reject, jnp.int32(n_tiles), jnp.int32(0))
                mass = lax.fori_loop(jnp.int32(0), trips, mass_body, jnp.float32(0.0))
            app = reject & (mass > MASS_FLOOR)
            applied.append(app)
            inv_mass.append(jnp.where(app, 1.0 / jnp.where(app, mass, 1.0), 0.0))
            cur = jnp.where(accept, jnp.int32(j), cur)

        mates = [(i, applied[i] & (par[i] == cur), inv_mass[i]) for i in range(n)]

        def tile(t):
            start = tile_start(t)
            d = dist_tile(start, cur, mates)
            return start, d, start + lax.broadcasted_iota(jnp.int32, d.shape, d.ndim - 1)

        def total_body(t, carry):
            total, last_nz = carry
            _, d, idx = tile(t)
            return total + jnp.sum(d), jnp.maximum(last_nz, jnp.max(jnp.where(d > 0, idx, -1)))

        total, last_nz = lax.fori_loop(0, n_tiles, total_body, (jnp.float32(0.0), jnp.int32(-1)))
        thr = fs(2 * n + n * n) * total

        # Running sums are accumulated in the same order as `total`, so the crossing test is consistent with it.
        def search_cond(carry):
            t, _, found = carry
            return (t < n_tiles) & (found < 0)

        def search_body(carry):
            t, run, _ = carry
            _, d, _ = tile(t)
            s = jnp.sum(d)
            hit = run + s > thr
            return t + 1, jnp.where(hit, run, run + s), jnp.where(hit, t, -1)

        _, run, found = lax.while_loop(search_cond, search_body, (jnp.int32(0), jnp.float32(0.0), jnp.int32(-1)))

        def in_tile():
            start, d, idx = tile(found)
            lane = idx - start

            # Smallest lane m with run + sum(d[:m+1]) > thr; masked sums are monotone in m (f32 addition is).
            def bisect(_, lohi):
                lo, hi = lohi
                mid = jnp.right_shift(lo + hi, 1)
                ok = run + jnp.sum(jnp.where(lane <= mid, d, 0.0)) > thr
                return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

            lo, _ = lax.fori_loop(0, log2_block, bisect, (jnp.int32(0), jnp.int32(t_sz - 1)))
            return jnp.minimum(start + lo, last_nz)

        token = lax.cond(found >= 0, in_tile, lambda: last_nz)
        out_ref[0, 0] = cur
        out_ref[0, 1] = jnp.maximum(token, 0)

    return kernel


def path_from_last(last: jax.Array, parents: jax.Array, nodes: int) -> tuple[jax.Array, jax.Array]:
    """accept_len i32[batch] and accepted_nodes i32[batch, nodes] from the last accepted node (-1 = none)."""
    batch = last.shape[0]
    par = parents.astype(jnp.int32)
    # anc[:, d] = ancestor d steps above `last` (-1 past the root); the path is anc reversed.
    anc = [last]
    for _ in range(nodes - 1):
        prev = anc[-1]
        up = jnp.take_along_axis(par, jnp.clip(prev, 0, max(nodes - 1, 0))[:, None], axis=1)[:, 0]
        anc.append(jnp.where(prev >= 0, up, -1))
    anc = jnp.stack(anc, axis=1) if nodes else jnp.zeros((batch, 0), jnp.int32)
    alen = jnp.sum(anc >= 0, axis=1).astype(jnp.int32)
    pos = jnp.arange(nodes, dtype=jnp.int32)[None, :]
    src = jnp.clip(alen[:, None] - 1 - pos, 0, max(nodes - 1, 0))
    path = jnp.where(pos < alen[:, None], jnp.take_along_axis(anc, src, axis=1), -1) if nodes else anc
    return alen, path.astype(jnp.int32)


def verify_pallas(
    draft_tokens,
    parents,
    num_proposed,
    target_probs,
    draft_probs,
    uniforms,
    residual_uniforms,
    *,
    block_v: int,
    vocab_multiple: int | None,
    load_tile_for: Callable[[int], LoadTile],
    scalar_memory_space: Any,
    compiler_params: Any,
    interpret: Any,
    name: str,
    max_siblings: int | None = None,
) -> VerifyResult:
    """Pack, run the shared kernel over grid (batch,), unpack. Called by the gpu/tpu wrappers (static args).

    draft_probs None: every draft row is one_hot(draft_tokens[j]) (the one-hot fast path; no draft rows are read).
    vocab_multiple: pad the vocab axis with zeros to this multiple (Mosaic), or None to leave it (Triton masks).
    load_tile_for(vocab_as_seen) -> the variant's tile loader.
    """
    batch, nodes = draft_tokens.shape
    onehot = draft_probs is None
    target_probs = target_probs.astype(jnp.float32)
    draft_probs = None if onehot else draft_probs.astype(jnp.float32)
    fscal, iscal = pack_scalars(
        draft_tokens, parents, num_proposed, target_probs, draft_probs, uniforms, residual_uniforms
    )
    vocab = target_probs.shape[-1]
    if vocab_multiple is not None and vocab % vocab_multiple:
        pad = vocab_multiple - vocab % vocab_multiple
        target_probs = jnp.pad(target_probs, ((0, 0), (0, 0), (0, pad)))
        draft_probs = None if onehot else jnp.pad(draft_probs, ((0, 0), (0, 0), (0, pad)))
    if nodes == 0 and not onehot:
        # A zero-size block is not expressible; one unproposed dummy node changes nothing (num_proposed <= 0).
        draft_probs = jnp.zeros((batch, 1, target_probs.shape[-1]), jnp.float32)
    seen_vocab = target_probs.shape[-1]
    n_tiles = -(-seen_vocab // block_v)
    kernel = make_kernel(
        nodes=nodes,
        n_tiles=n_tiles,
        block_v=block_v,
        load_tile=load_tile_for(seen_vocab),
        max_siblings=max_siblings,
        onehot=onehot,
    )

    def row_spec(*block):
        return pl.BlockSpec((None, *block), lambda b: (b,) + (0,) * len(block))

    def scalar_spec(width):
        return pl.BlockSpec((None, 1, width), lambda b: (b, 0, 0), memory_space=scalar_memory_space)

    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((batch, 1, 2), jnp.int32),
        grid=(batch,),
        in_specs=[
            scalar_spec(fscal.shape[-1]),
            scalar_spec(iscal.shape[-1]),
            row_spec(*target_probs.shape[1:]),
            *([] if onehot else [row_spec(*draft_probs.shape[1:])]),
        ],
        out_specs=scalar_spec(2),
        compiler_params=compiler_params,
        interpret=interpret,
        name=name,
    )(fscal[:, None, :], iscal[:, None, :], target_probs, *([] if onehot else [draft_probs]))
    alen, path = path_from_last(out[:, 0, 0], parents, nodes)
    return VerifyResult(alen, path, out[:, 0, 1])
