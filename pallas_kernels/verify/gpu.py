"""Triton (GPU) variant of the verify kernel: the shared body from `_kernel.py` with masked vocab-tile loads.

Layout on the GPU (all refs live in global memory; Triton keeps each loaded tile in registers):

* grid = (batch,): one program per batch row; programs are independent.
* per row: `target_probs[b]` f32[nodes+1, vocab] and `draft_probs[b]` f32[nodes, vocab] are read tile by tile
  (`block_v` lanes, a power of two as Triton requires); the vocab is NOT padded -- the last tile is a masked
  load that yields 0 beyond `vocab`, so any vocab size (e.g. 151936) works without copying the inputs.
* per-row packed scalars (f32[1, 2N + N*N + 1], i32[1, N + 1]) are read with scalar loads; output
  i32[batch, 1, 2].

The pallas_call is pinned to the Triton lowering with `pltriton.CompilerParams` (without it, jax 0.10+ lowers
GPU pallas_calls through Mosaic GPU, which has no lowering for parts of this body).

Memory traffic per row, V = vocab: every rejection streams (m + 2) * V floats (m = siblings rejected before it
at the same node); the final draw streams (m' + 1) * V twice at most (the second pass stops at the crossing
tile). Work is sequential within a row, so small batches use few SMs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .. import _common
from . import tuning
from ._kernel import verify_pallas
from .reference import VerifyResult


def _triton():
    # Imported lazily: the Triton Pallas backend is deprecated from jax 0.11 and only needed when this runs.
    from jax.experimental.pallas import triton as pltriton

    return pltriton


def gpu_config(vocab: int, block_v: int | None = None) -> tuple[int, int, int]:
    """(block_v, num_warps, num_stages) for `vocab` from `tuning.GPU_BLOCKS`, rounded to a legal tile."""
    row = _common.lookup_by_size(tuning.GPU_BLOCKS, vocab) or tuning.FALLBACK["gpu"]
    tuned_block, num_warps = row
    block = _common.gpu_block(block_v if block_v is not None else tuned_block, vocab)
    return block, int(num_warps), int(tuning.GPU_NUM_STAGES)


def _masked_loader(block_v: int):
    def for_vocab(vocab: int):
        if vocab % block_v == 0:

            def load(ref, row, start):
                return ref[row, pl.ds(start, block_v)]

            return load
        pltriton = _triton()

        def load(ref, row, start):
            # A Python-int row would reach the interpreter's masked-load rule as an index without a shape.
            row = jnp.asarray(row, jnp.int32)
            lanes = start + jax.lax.broadcasted_iota(jnp.int32, (block_v,), 0)
            return pltriton.load(ref.at[row, pl.ds(start, block_v)], mask=lanes < vocab, other=0.0)

        return load

    return for_vocab


@functools.partial(jax.jit, static_argnames=("block_v", "num_warps", "num_stages", "interpret", "max_siblings"))
def verify_gpu(
    draft_tokens: jax.Array,
    parents: jax.Array,
    num_proposed: jax.Array,
    target_probs: jax.Array,
    draft_probs: jax.Array,
    uniforms: jax.Array,
    residual_uniforms: jax.Array,
    *,
    block_v: int,
    num_warps: int = 4,
    num_stages: int = 2,
    interpret: bool = False,
    max_siblings: int | None = None,
) -> VerifyResult:
    """Acceptance step as a Triton Pallas kernel; same inputs/outputs as `reference.verify_reference`.

    Args:
      draft_tokens: i32[batch, nodes]; parents: i32[batch, nodes]; num_proposed: i32[batch];
      target_probs: f32[batch, nodes+1, vocab]; draft_probs: f32[batch, nodes, vocab];
      uniforms: f32[batch, nodes]; residual_uniforms: f32[batch]  (other float dtypes are cast to f32).
      draft_probs None: one-hot rows (the one-hot fast path, see `_kernel.py`).
      block_v: vocab tile, a power of two (see `gpu_config`); vocab need not be a multiple of it.
      num_warps / num_stages: Triton launch parameters.
      interpret: run through the Pallas interpreter (any backend, e.g. CPU tests).
      max_siblings: siblings are contiguous and at most this many (see `_kernel.make_kernel`); None = any order.

    Returns:
      VerifyResult(accept_len i32[batch], accepted_nodes i32[batch, nodes], next_token i32[batch]).

    The gathers of probabilities at drafted tokens and the path reconstruction run as XLA ops around the
    kernel (see `_kernel.py`).
    """
    if not _common.is_power_of_2(block_v):
        raise ValueError(f"block_v must be a power of two for Triton, got {block_v}")
    return verify_pallas(
        draft_tokens,
        parents,
        num_proposed,
        target_probs,
        draft_probs,
        uniforms,
        residual_uniforms,
        block_v=block_v,
        vocab_multiple=None,
        load_tile_for=_masked_loader(block_v),
        scalar_memory_space=None,
        compiler_params=_triton().CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=_common.interpret_arg(interpret),
        max_siblings=max_siblings,
        name="dspark_verify_triton",
    )
