"""The one gateway to pallas_kernels: models and decoding call these, which pick a kernel or its reference.

Which acceptance rule the decode loop runs is one setting, `VERIFY_IMPL`:

- "reference" (the default): the pure-jnp rule, on every backend;
- "pallas": the Pallas kernel (Triton on GPU, Mosaic on TPU; the interpreter on CPU, slow, for checks only);
- "auto": pallas_kernels' own choice (the kernel on GPU/TPU, the reference on CPU).

The default stays "reference". The compiled Triton kernel first failed on an H200 (jax 0.11.2; an i1 loop bound
the device's Triton refused), then, fixed, passed there on 2026-12-04: its tests and the tiny-shape loop, chains
and 7-node trees, greedy and T = 1 rows, the same tokens as the reference (`benchmarks/device_check.sh`). It becomes
the GPU default once it is also timed at a full vocabulary, which no device run has done yet. The environment variable
`DSPARK_VERIFY_IMPL` sets it, read once at import; code may assign `ops.VERIFY_IMPL` before its first `generate`
call (a compiled loop keeps the rule it was traced with) or pass `impl=` to `accept_chain`.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from dspark_jax.errors import UsageError

VERIFY_IMPLS = ("reference", "pallas", "auto")
# An environment variable (not a config field) so that a device run can switch the kernel on without code edits;
# it picks between two implementations of the same rule, never the model's behaviour.
VERIFY_IMPL = os.environ.get("DSPARK_VERIFY_IMPL") or "reference"


def verify_impl(impl: str | None = None) -> str:
    """The acceptance implementation to use: `impl` when given, else the module setting; validated."""
    name, value = ("impl", impl) if impl is not None else ("DSPARK_VERIFY_IMPL", VERIFY_IMPL)
    if value not in VERIFY_IMPLS:
        raise UsageError(f"{name} must be one of {', '.join(VERIFY_IMPLS)}, got {value!r}")
    return value


def chain_parents(batch: int, nodes: int) -> jax.Array:
    """i32[batch, nodes] parent index of a chain: node i hangs under node i - 1, node 0 under the root."""
    return jnp.broadcast_to(jnp.arange(nodes, dtype=jnp.int32) - 1, (batch, nodes))


def accept_chain(
    draft_tokens, num_proposed, target_probs, draft_probs, uniforms, residual_uniforms, impl: str | None = None
):
    """Speculative acceptance of a chain of drafts (spec §6.6).

    draft_tokens i32[batch, slots]; num_proposed i32[batch]; target_probs f32[batch, slots + 1, vocab];
    draft_probs f32[batch, slots, vocab]; uniforms f32[batch, slots]; residual_uniforms f32[batch].
    impl: "reference" | "pallas" | "auto" (see the module docstring); None = `VERIFY_IMPL`. "pallas" on a CPU
    runs the kernel in interpret mode.
    Returns (accepted i32[batch], next_token i32[batch]).
    """
    from pallas_kernels import _common
    from pallas_kernels.verify import verify

    impl = verify_impl(impl)
    interpret = impl == "pallas" and not _common.has_accelerator()
    parents = chain_parents(*draft_tokens.shape)
    accepted, _, next_token = verify(
        draft_tokens,
        parents,
        num_proposed,
        target_probs,
        draft_probs,
        uniforms,
        residual_uniforms,
        impl=impl,
        interpret=interpret,
    )
    return accepted, next_token


def accept_tree(
    tokens,
    parents,
    num_proposed,
    target_probs,
    rows,
    uniforms,
    residual_uniforms,
    impl: str | None = None,
    max_siblings: int | None = None,
):
    """Speculative acceptance over a draft tree (trees §2): recursive rejection sampling, siblings in index order.

    tokens, parents i32[batch, nodes] (parents[j] < j, -1 = the anchor); num_proposed i32[batch] (nodes
    [0, num_proposed) are verified); target_probs f32[batch, nodes + 1, vocab] (row 0 at the anchor, row 1 + j
    after node j); rows f32[batch, nodes, vocab] the law D_j each token was drawn from, or None when every row is
    one_hot(tokens[j]) (deterministic candidates: the one-hot fast path of the reference and of the kernel, trees
    §2.4, which builds no one-hots and streams no vocabulary on a rejection);
    uniforms f32[batch, nodes]; residual_uniforms f32[batch]. max_siblings: siblings are contiguous and at most
    this many (the tree builder's order; the kernel's unroll becomes O(nodes * max_siblings)).
    Returns (accept_len i32[batch], accepted_nodes i32[batch, nodes] padded with -1, next_token i32[batch]).
    """
    from pallas_kernels import _common
    from pallas_kernels.verify import verify

    impl = verify_impl(impl)
    # rows None reaches the kernel's one-hot fast path, or the reference's (verify dispatches both).
    result = verify(
        tokens,
        parents,
        num_proposed,
        target_probs,
        rows,
        uniforms,
        residual_uniforms,
        impl=impl,
        interpret=impl == "pallas" and not _common.has_accelerator(),
        max_siblings=max_siblings,
    )
    return tuple(result)
