"""Mosaic (TPU) variant of the verify kernel: the shared body from `_kernel.py` with VMEM row blocks.

Layout on the TPU:

* grid = (batch,), marked "parallel" (rows are independent and every block, outputs included, is per row).
* VMEM, per grid step (double-buffered by the pipeline): `target_probs[b]` f32[nodes+1, Vp] and
  `draft_probs[b]` f32[nodes, Vp], Vp = vocab zero-padded to a multiple of `block_v` (itself a multiple of the
  128-lane width); padded lanes carry zero mass, so they are never accepted or sampled. Tiles are (1, block_v)
  loads at a dynamic row. This costs about 2 * (2*nodes + 1) * Vp * 4 bytes of VMEM (~20 MiB for nodes=8,
  vocab=151936), so `vmem_limit_bytes` is raised to fit; very long trees x large vocabs exceed VMEM.
  The padding is a copy of both probability tensors when vocab % block_v != 0.
* SMEM: the packed per-row scalars (f32[1, 2N + N*N + 1], i32[1, N + 1]) and the output row i32[1, 2].

Only the Mosaic lowering of this variant is exercised off-TPU (cross-lowering test); it has not been run on
TPU hardware here.
"""

from __future__ import annotations

import functools

import jax
from jax.experimental import pallas as pl

from .. import _common
from . import tuning
from ._kernel import verify_pallas
from .reference import VerifyResult

_LANES = 128
_VMEM_HEADROOM = 8 * 1024 * 1024
_VMEM_CAP = 100 * 1024 * 1024


def _tpu():
    from jax.experimental.pallas import tpu as pltpu

    return pltpu


def tpu_config(vocab: int, block_v: int | None = None) -> int:
    """block_v for `vocab` from `tuning.TPU_BLOCKS`: a power-of-two multiple of 128 lanes."""
    row = _common.lookup_by_size(tuning.TPU_BLOCKS, vocab) or tuning.FALLBACK["tpu"]
    block = _common.tpu_block(block_v if block_v is not None else row[0], vocab, lane=_LANES)
    # The in-tile bisection needs a power of two; round down to one that is still a lane multiple.
    return max(_LANES, 1 << (block.bit_length() - 1))


def _loader(block_v: int):
    def for_vocab(vocab: int):
        del vocab  # padded to a multiple of block_v by the wrapper

        def load(ref, row, start):
            return ref[pl.ds(row, 1), pl.ds(start, block_v)]

        return load

    return for_vocab


def tpu_vmem_bytes(nodes: int, vocab: int, block_v: int, onehot: bool = False) -> int:
    """VMEM one grid step needs: double-buffered target [nodes+1, Vp] and draft [nodes, Vp] f32 rows (no draft
    rows on the one-hot path)."""
    rows = (1 if onehot else 2) * max(nodes, 1) + 1
    return 2 * rows * _common.round_up(vocab, block_v) * 4 + _VMEM_HEADROOM


def tpu_max_nodes(vocab: int, block_v: int, onehot: bool = False) -> int:
    """The largest node count whose rows fit the VMEM cap (about 40 at vocab 151936, 80 on the one-hot path): the
    TPU node cap."""
    per_node = 2 * (1 if onehot else 2) * _common.round_up(vocab, block_v) * 4
    return max(0, (_VMEM_CAP - _VMEM_HEADROOM - 2 * _common.round_up(vocab, block_v) * 4) // per_node)


@functools.partial(jax.jit, static_argnames=("block_v", "interpret", "max_siblings"))
def verify_tpu(
    draft_tokens: jax.Array,
    parents: jax.Array,
    num_proposed: jax.Array,
    target_probs: jax.Array,
    draft_probs: jax.Array,
    uniforms: jax.Array,
    residual_uniforms: jax.Array,
    *,
    block_v: int,
    interpret: bool = False,
    max_siblings: int | None = None,
) -> VerifyResult:
    """Acceptance step as a Mosaic TPU Pallas kernel; same inputs/outputs as `reference.verify_reference`.

    Args:
      draft_tokens: i32[batch, nodes]; parents: i32[batch, nodes]; num_proposed: i32[batch];
      target_probs: f32[batch, nodes+1, vocab]; draft_probs: f32[batch, nodes, vocab];
      uniforms: f32[batch, nodes]; residual_uniforms: f32[batch]  (other float dtypes are cast to f32).
      draft_probs None: one-hot rows (the one-hot fast path, see `_kernel.py`).
      block_v: vocab tile, a power of two and a multiple of 128 (see `tpu_config`); vocab is padded to it.
      interpret: run through the Pallas interpreter (any backend, e.g. CPU tests).
      max_siblings: siblings are contiguous and at most this many (see `_kernel.make_kernel`); None = any order.

    Returns:
      VerifyResult(accept_len i32[batch], accepted_nodes i32[batch, nodes], next_token i32[batch]).
    """
    if block_v % _LANES or not _common.is_power_of_2(block_v):
        raise ValueError(f"block_v must be a power-of-two multiple of {_LANES}, got {block_v}")
    pltpu = _tpu()
    nodes = draft_tokens.shape[1]
    onehot = draft_probs is None
    vmem = tpu_vmem_bytes(nodes, target_probs.shape[-1], block_v, onehot)
    if vmem > _VMEM_CAP:
        cap = tpu_max_nodes(target_probs.shape[-1], block_v, onehot)
        raise ValueError(f"{nodes} nodes need {vmem >> 20} MiB of VMEM at this vocab; the TPU kernel takes <= {cap}")
    return verify_pallas(
        draft_tokens,
        parents,
        num_proposed,
        target_probs,
        draft_probs,
        uniforms,
        residual_uniforms,
        block_v=block_v,
        vocab_multiple=block_v,
        load_tile_for=_loader(block_v),
        scalar_memory_space=pltpu.SMEM,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel",), vmem_limit_bytes=int(min(vmem, _VMEM_CAP))
        ),
        interpret=_common.interpret_arg(interpret),
        max_siblings=max_siblings,
        name="dspark_verify_mosaic",
    )
