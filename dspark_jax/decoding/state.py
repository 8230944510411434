"""DecodeState: everything the round loop carries, as one pytree with named, shaped fields."""

from __future__ import annotations

import dataclasses

import jax

from dspark_jax.cache import KVCache
from dspark_jax.decoding.schedule import SchedulerState
from dspark_jax.sampling import SamplingParams


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Loop carry. Positions count from the start of each row's prompt.

    tokens: i32[batch, buf_len] prompt then committed tokens; lengths: i32[batch] committed tokens, so the anchor
      (newest committed token, not yet consumed by the target) sits at lengths - 1;
    limits: i32[batch] the anchor position at which a row stops (prompt length + max_new_tokens, capped by the cache);
    stop_ids: i32[stop_slots] stop tokens padded with -1 (data, not part of the compiled loop's key);
    thresholds: f32[batch] per-row confidence threshold of the verify policy (0 = verify the full block);
    sampling: per-row temperature / top_p / top_k (data, so mixed requests share one compiled loop);
    done: bool[batch] (padding rows of a batch bucket start done); keys: per-row PRNG keys [batch];
    target_cache: holds positions [0, anchor) of each row;
    draft_cache / pending / num_pending: the draft's context K/V for positions [0, Q) and the raw target features
      [batch, width, taps * hidden] of positions [Q, anchor) waiting to be pushed (None for plain decoding);
    rounds: i32[batch]; acceptance / proposals: i32[batch, max_rounds] per-round committed tokens and drafts
      verified (spec §6.7 statistics); confidences: f32[batch, max_rounds, block] each round's pre-sigmoid
      confidence logits (calibration data, spec §10; None for plain decoding);
    scheduler: the prefix scheduler's cost table, temperatures and draft gate (spec §11; None unless
      verify="scheduler").
    """

    tokens: jax.Array
    lengths: jax.Array
    limits: jax.Array
    stop_ids: jax.Array
    thresholds: jax.Array
    sampling: SamplingParams
    done: jax.Array
    keys: jax.Array
    target_cache: KVCache
    draft_cache: KVCache | None
    pending: jax.Array | None
    num_pending: jax.Array | None
    rounds: jax.Array
    acceptance: jax.Array
    proposals: jax.Array
    confidences: jax.Array | None = None
    scheduler: SchedulerState | None = None
    accepted_ranks: jax.Array | None = None  # i32[batch, max_rounds, block] tree rounds: path ranks, -1 padded
