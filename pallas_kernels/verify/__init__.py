"""Speculative-decoding acceptance step (rejection sampling over a draft tree): dispatch entry point.

`verify` picks the Pallas kernel (Triton on GPU, Mosaic on TPU) or the pure-jnp reference, which defines the
semantics (see `reference.py` for the exact rule and the choices the spec left open).
"""

from __future__ import annotations

import jax

from .. import _common
from .gpu import gpu_config, verify_gpu
from .reference import VerifyResult, verify_reference, verify_reference_onehot
from .tpu import tpu_config, tpu_max_nodes, verify_tpu

__all__ = [
    "VerifyResult",
    "verify",
    "verify_reference",
    "verify_reference_onehot",
    "verify_gpu",
    "verify_tpu",
    "gpu_config",
    "tpu_config",
    "tpu_max_nodes",
]

_IMPLS = ("auto", "pallas", "reference")


def verify(
    draft_tokens: jax.Array,
    parents: jax.Array,
    num_proposed: jax.Array,
    target_probs: jax.Array,
    draft_probs: jax.Array,
    uniforms: jax.Array,
    residual_uniforms: jax.Array,
    *,
    impl: str = "auto",
    interpret: bool = False,
    block_v: int | None = None,
    platform: str | None = None,
    max_siblings: int | None = None,
) -> VerifyResult:
    """Accept a prefix path of the draft tree and draw the next token.

    Args:
      draft_tokens: i32[batch, nodes] -- token of each draft node.
      parents: i32[batch, nodes] -- parent node index, -1 = root; topologically ordered (parent < node).
        A chain of k nodes is [-1, 0, 1, ..., k-2].
      num_proposed: i32[batch] -- only nodes with index < num_proposed are proposed (0 allowed).
      target_probs: f32[batch, nodes+1, vocab] -- row 0 = target at the root, row i+1 = target after node i.
      draft_probs: f32[batch, nodes, vocab] -- draft distribution node i's token was sampled from; None when
        every row is one_hot(draft_tokens[i]) (deterministic candidates): the one-hot fast path (trees §2.4), which
        reads no draft rows and streams no vocabulary on a rejection.
      uniforms: f32[batch, nodes] -- U(0,1) per node for the acceptance test.
      residual_uniforms: f32[batch] -- U(0,1) per row for the extra token.
      impl: "auto" (Pallas kernel on GPU/TPU, reference on CPU), "pallas", or "reference".
      interpret: run the Pallas kernel in interpret mode (required for impl="pallas" on CPU); True uses the
        generic interpreter, a backend params object (e.g. `pltpu.InterpretParams()`) is passed through.
      block_v: vocab tile override for the kernel (default: `tuning.py` by platform and vocab).
      platform: kernel variant, "gpu" (Triton) or "tpu" (Mosaic); default: the backend jax runs on, and the
        Triton variant when that is CPU (interpret mode).
      max_siblings: the caller guarantees siblings are contiguous and at most this many (the tree builder's
        order), which makes the kernel's unrolled walk O(nodes * max_siblings); None = any topological order.
        The reference ignores it. On TPU, trees beyond `tpu_max_nodes` (VMEM) run the reference under "auto".

    Returns:
      VerifyResult(accept_len i32[batch], accepted_nodes i32[batch, nodes] padded with -1,
      next_token i32[batch]).

    Traceable: no host syncs and no Python control flow on traced values; `impl`, `interpret`, `block_v` and
    `platform` are static, so this can be called inside `jax.jit` / `lax.while_loop`.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    args = (draft_tokens, parents, num_proposed, target_probs, draft_probs, uniforms, residual_uniforms)
    onehot = draft_probs is None

    def reference():
        if onehot:
            return verify_reference_onehot(
                draft_tokens, parents, num_proposed, target_probs, uniforms, residual_uniforms
            )
        return verify_reference(*args)

    here = _common.platform()
    if impl == "reference" or (impl == "auto" and not _common.has_accelerator()):
        return reference()
    if not interpret and not _common.has_accelerator():
        raise ValueError(f"impl='pallas' needs a GPU or TPU backend (jax runs on {here}); pass interpret=True")
    variant = _common.platform(platform) if platform is not None else here
    vocab = target_probs.shape[-1]
    if variant == _common.TPU:
        block = tpu_config(vocab, block_v)
        if impl == "auto" and draft_tokens.shape[1] > tpu_max_nodes(vocab, block, onehot=onehot):
            return reference()
        return verify_tpu(*args, block_v=block, interpret=interpret, max_siblings=max_siblings)
    # "gpu", or "cpu" (interpret mode only) -> the Triton variant.
    block, num_warps, num_stages = gpu_config(vocab, block_v)
    return verify_gpu(
        *args, block_v=block, num_warps=num_warps, num_stages=num_stages, interpret=interpret, max_siblings=max_siblings
    )
