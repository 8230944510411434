"""Prompt prefill (spec §6.2) in fixed-size chunks through the caches: memory bounded by the chunk, not the prompt.

Each chunk of C prompt positions runs through the target with its K/V written into the target cache (its queries
see the earlier chunks there), and its tapped features are pushed into the draft's context cache. A loop over chunks
keeps one copy of the model in the program; the caches are carried through it and updated in place.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dspark_jax.cache import KVCache, as_bits, as_values
from dspark_jax.models.draft import Draft
from dspark_jax.models.qwen3 import Qwen3

# Prompt positions per target pass. Measured on a 2-core CPU (8k-token prompt, the embedded 6-layer hidden-512
# target, f32): 128 and 256 ran 3-10% faster than 512 and 1024 ran ~30% slower. 512 is kept because every pass
# re-reads all weights (8 GB for a bf16 4B target), which a 256-row chunk barely amortises on an accelerator; the
# scratch memory grows linearly with the chunk (0.4 GiB at 512 for the 4B shape in f32, independent of the prompt).
PREFILL_CHUNK = 512


def prefill_prompts(
    target: Qwen3,
    draft: Draft | None,
    prompts: jax.Array,
    prompt_lens: jax.Array,
    cache_len: int,
    tap_layer_ids: tuple[int, ...],
    chunk: int = PREFILL_CHUNK,
    draft_needed: jax.Array | None = None,
) -> tuple[jax.Array, KVCache, KVCache | None]:
    """Run right-padded prompts through the target chunk by chunk, filling the target and draft caches.

    Args:
      prompts: i32[batch, bucket] right-padded; prompt_lens: i32[batch], at least 1 for real rows.
      cache_len: slots of both caches; tap_layer_ids: the target layers whose outputs feed the draft (() without).
      chunk: static chunk size C; a bucket shorter than C is one chunk of the bucket's length.
      draft_needed: bool[] or None (always): whether to fill the draft cache (the scheduler's gate may know that the
        draft never runs for this batch; the draft cache is then left empty).
    Returns:
      last: [batch, hidden] final-normed target hidden at each row's position prompt_lens - 1 (zeros for a row
        with prompt_lens 0); the target cache and the draft cache (None without a draft) holding positions
        [0, prompt_lens) of each row. Their `lengths` are left at 0 for the caller to set. Positions past a row's
        length (padding, up to the end of the last chunk that any row needs) are written too but are invisible once
        lengths are set; writes past cache_len are dropped. Chunks past the longest prompt are not run.
    """
    bsz, bucket = prompts.shape
    c = min(chunk, bucket)
    total = -(-bucket // c) * c
    prompts = jnp.pad(prompts, ((0, 0), (0, total - bucket)))
    rows = jnp.arange(bsz)
    cfg = target.config

    def run_chunk(i, carry):
        cache, draft_cache, last = carry
        start = i * c
        tokens = jax.lax.dynamic_slice_in_dim(prompts, start, c, axis=1)
        positions = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (bsz, c))
        hidden, taps, cache = target(tokens, positions, cache, tap_layer_ids)
        if draft is not None:
            starts = jnp.full((bsz,), start, jnp.int32)
            if draft_needed is None:
                draft_cache = draft.push_context(draft_cache, taps, starts)
            else:
                draft_cache = jax.lax.cond(
                    draft_needed, lambda: draft.push_context(draft_cache, taps, starts), lambda: draft_cache
                )
        offset = prompt_lens - 1 - start  # the row's last prompt position within this chunk, if it falls here
        here = (offset >= 0) & (offset < c)
        picked = hidden[rows, jnp.clip(offset, 0, c - 1)].astype(last.dtype)
        return cache, draft_cache, jnp.where(here[:, None], picked, last)

    carry = (
        target.init_cache(bsz, cache_len),
        None if draft is None else draft.init_cache(bsz, cache_len),
        jnp.zeros((bsz, cfg.hidden_size), cfg.dtype),
    )
    if total == c:
        carry = run_chunk(0, carry)
    else:
        num_chunks = (jnp.max(prompt_lens) + c - 1) // c
        dtypes = jax.tree.map(lambda a: a.dtype, carry)  # 16-bit caches are carried as bits (`as_bits`)
        bits = jax.lax.fori_loop(
            0, num_chunks, lambda i, b: as_bits(run_chunk(i, as_values(b, dtypes))), as_bits(carry)
        )
        carry = as_values(bits, dtypes)
    cache, draft_cache, last = carry
    return last, cache, draft_cache
