"""The one gateway to pallas_kernels: models and decoding call these, which pick a kernel or its reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def chain_parents(batch: int, nodes: int) -> jax.Array:
    """i32[batch, nodes] parent index of a chain: node i hangs under node i - 1, node 0 under the root."""
    return jnp.broadcast_to(jnp.arange(nodes, dtype=jnp.int32) - 1, (batch, nodes))


def accept_chain(
    draft_tokens, num_proposed, target_probs, draft_probs, uniforms, residual_uniforms, impl: str = "auto"
):
    """Speculative acceptance of a chain of drafts (spec §6.6).

    draft_tokens i32[batch, slots]; num_proposed i32[batch]; target_probs f32[batch, slots + 1, vocab];
    draft_probs f32[batch, slots, vocab]; uniforms f32[batch, slots]; residual_uniforms f32[batch].
    Returns (accepted i32[batch], next_token i32[batch]).
    """
    from pallas_kernels.verify import verify

    parents = chain_parents(*draft_tokens.shape)
    accepted, _, next_token = verify(
        draft_tokens, parents, num_proposed, target_probs, draft_probs, uniforms, residual_uniforms, impl=impl
    )
    return accepted, next_token
