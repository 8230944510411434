"""Offline speculative-decoding metrics (spec §7.1) from per-round acceptance and proposal lengths; numpy only."""

from __future__ import annotations

import numpy as np


def round_arrays(acceptance_lengths: list[list[int]], proposal_lengths: list[list[int]]):
    """Flatten per-prompt round lists into (committed i64[rounds], proposed i64[rounds])."""
    committed = np.array([a for row in acceptance_lengths for a in row], np.int64)
    proposed = np.array([p for row in proposal_lengths for p in row], np.int64)
    assert committed.shape == proposed.shape, "acceptance and proposal lengths disagree"
    return committed, proposed


def speculative_metrics(acceptance_lengths, proposal_lengths, block_size: int) -> dict:
    """τ, mean proposal length, verify rate, per-slot prefix survival and conditional acceptance.

    Accepted drafts per round are taken as committed - 1 (the target adds one token per round; a round ended by a
    stop token among the drafts counts one draft fewer here, a negligible undercount).
    Prefix survival at slot j = rounds with more than j accepted drafts / rounds with more than j proposed.
    Conditional acceptance at j (the paper's Figure 2) = among rounds whose slots 0..j-1 were all accepted and
    whose slot j was proposed, the fraction that also accepted slot j.
    """
    committed, proposed = round_arrays(acceptance_lengths, proposal_lengths)
    rounds = committed.size
    if rounds == 0:
        return {"rounds": 0, "tau": 0.0}
    accepted = np.maximum(committed - 1, 0)
    survival, conditional = [], []
    for j in range(block_size):
        offered = proposed > j
        survival.append(float(np.sum(accepted[offered] > j) / max(np.sum(offered), 1)))
        reached = offered & (accepted >= j)
        conditional.append(float(np.sum(accepted[reached] > j) / max(np.sum(reached), 1)))
    return {
        "rounds": int(rounds),
        "tau": float(committed.sum() / rounds),
        "mean_proposal_length": float(proposed.mean()),
        "verify_rate": float(committed.sum() / (proposed.sum() + rounds)),
        "prefix_survival": survival,
        "conditional_acceptance": conditional,
    }
