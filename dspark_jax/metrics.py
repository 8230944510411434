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


# ------------------------------------------------------------------------------------ calibration (spec §7.3, §10)

ECE_BINS = 20


def prefix_predictions(confidence_logits: np.ndarray, temperatures=None) -> np.ndarray:
    """f64[rounds, B] s_j = prod_{i<=j} sigmoid(z_i / t_i), clipped to [1e-8, 1 - 1e-8] (t = 1 when None)."""
    z = np.asarray(confidence_logits, np.float64)
    t = np.ones(z.shape[-1]) if temperatures is None else np.asarray(temperatures, np.float64)
    q = 1.0 / (1.0 + np.exp(-z / t))
    return np.clip(np.cumprod(q, axis=-1), 1e-8, 1 - 1e-8)


def ece(pred: np.ndarray, label: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: equal-width bins on the prediction, sum of (count / total) * |mean pred - mean
    label| over bins."""
    pred, label = np.asarray(pred, np.float64), np.asarray(label, np.float64)
    if pred.size == 0:
        return 0.0
    idx = np.minimum((pred * bins).astype(np.int64), bins - 1)
    gap = np.abs(np.bincount(idx, pred, bins) - np.bincount(idx, label, bins))  # |sum pred - sum label| per bin
    return float(gap.sum() / pred.size)


def auroc(pred: np.ndarray, label: np.ndarray) -> float | None:
    """P(a random positive outranks a random negative), ties counting 1/2 (exact, through average ranks)."""
    pred, label = np.asarray(pred, np.float64), np.asarray(label, bool)
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return None
    order = np.argsort(pred, kind="mergesort")
    ranks = np.empty(pred.size, np.float64)
    sorted_pred = pred[order]
    # average rank (1-based) of each run of equal predictions
    starts = np.flatnonzero(np.r_[True, sorted_pred[1:] != sorted_pred[:-1]])
    ends = np.r_[starts[1:], pred.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[label].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def calibration_data(confidence_logits, acceptance_lengths, proposal_lengths):
    """Flatten per-prompt round lists into (z f64[rounds, B], accepted i64[rounds], proposed i64[rounds])."""
    z = np.array([r for row in confidence_logits for r in row], np.float64)
    committed, proposed = round_arrays(acceptance_lengths, proposal_lengths)
    assert z.shape[0] == committed.size, "confidence logits and acceptance lengths disagree"
    return z, np.maximum(committed - 1, 0), proposed


def calibration_metrics(z: np.ndarray, accepted: np.ndarray, proposed: np.ndarray, temperatures=None) -> dict:
    """Per-slot ECE, AUROC, Brier, mean prediction and mean label of the prefix predictions s_j against the prefix
    labels 1[accepted > j], over rounds that proposed slot j; `summary` = count-weighted means over slots."""
    s = prefix_predictions(z, temperatures)
    per_slot = []
    for j in range(z.shape[1]):
        rows = proposed > j
        pred, label = s[rows, j], (accepted[rows] > j).astype(np.float64)
        per_slot.append(
            {
                "count": int(rows.sum()),
                "ece": ece(pred, label),
                "auroc": auroc(pred, label),
                "brier": float(np.mean((pred - label) ** 2)) if pred.size else 0.0,
                "mean_prediction": float(pred.mean()) if pred.size else 0.0,
                "mean_label": float(label.mean()) if pred.size else 0.0,
            }
        )
    counts = np.array([p["count"] for p in per_slot], np.float64)
    summary = {
        key: float(np.dot(counts, [p[key] for p in per_slot]) / max(counts.sum(), 1.0))
        for key in ("ece", "brier", "mean_prediction", "mean_label")
    }
    return {"per_slot": per_slot, "summary": summary}


def reliability_bins(pred: np.ndarray, label: np.ndarray, bins: int = ECE_BINS) -> dict:
    """The reliability diagram of predictions against 0/1 labels: per equal-width bin (the ECE's bins) the count,
    mean prediction and mean label (None for an empty bin)."""
    pred, label = np.asarray(pred, np.float64), np.asarray(label, np.float64)
    idx = np.minimum((pred * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    sums_p, sums_l = np.bincount(idx, pred, bins), np.bincount(idx, label, bins)
    return {
        "count": count.tolist(),
        "mean_prediction": [float(p / c) if c else None for p, c in zip(sums_p, count)],
        "mean_label": [float(lab / c) if c else None for lab, c in zip(sums_l, count)],
    }


def calibration_reliability(z: np.ndarray, accepted: np.ndarray, proposed: np.ndarray, temperatures=None) -> list:
    """Per slot j, reliability_bins of the prefix predictions s_j against the prefix labels 1[accepted > j], over
    rounds that proposed slot j (the rounds calibration_metrics scores)."""
    s = prefix_predictions(z, temperatures)
    out = []
    for j in range(z.shape[1]):
        rows = proposed > j
        out.append(reliability_bins(s[rows, j], (accepted[rows] > j).astype(np.float64)))
    return out


def macro_average(rows: list[dict], keys) -> dict:
    """Unweighted mean over `rows` (one per benchmark, as the paper's Table 1 averages) of each key: scalars and
    equal-length lists (elementwise); None values are left out of a mean, and a key with no value at all is None."""
    out = {}
    for key in keys:
        values = [r.get(key) for r in rows if r.get(key) is not None]
        if not values:
            out[key] = None
        elif isinstance(values[0], (list, tuple)):
            cols = list(zip(*values))
            out[key] = [
                float(np.mean([v for v in c if v is not None])) if any(v is not None for v in c) else None for c in cols
            ]
        else:
            out[key] = float(np.mean(values))
    return out


# ------------------------------------------------------------------------------------------- trees (trees §3, §9)

RANK_FACTOR_FALLBACK = 0.5  # c_{d,r} = 0.5^r before measurement (trees §3); mirrors decoding.tree's constant
RANK_PRIOR_ROUNDS = 1.0  # pseudo-rounds of the fallback mixed into each depth's counts (no factor is ever 0)


def accepted_rank_histogram(accepted_ranks, block_size: int, branch: int) -> np.ndarray:
    """i64[B, K] how often the accepted path's node at depth d had sibling rank r (draw order), over all rounds.

    accepted_ranks: per prompt, per round, the ranks of the committed path nodes (GenerateResult.accepted_ranks).
    """
    hist = np.zeros((block_size, branch), np.int64)
    for prompt in accepted_ranks:
        for path in prompt:
            for d, r in enumerate(path[:block_size]):
                if 0 <= r < branch:
                    hist[d, r] += 1
    return hist


def tree_metrics(acceptance_lengths, nodes_verified, accepted_ranks, block_size: int, branch: int) -> dict:
    """Trees §9 over all rounds: nodes verified per round = sum N_v / rounds; tau per verified node = sum committed /
    sum (N_v + 1) (the anchor row counts, as the chain's verify rate); the accepted-rank histogram per depth [B][K];
    per-depth acceptance (rounds whose path passed depth d / rounds that reached it); the share of rounds whose
    accepted path left the rank-0 chain (some node of rank > 0)."""
    committed, verified = round_arrays(acceptance_lengths, nodes_verified)
    rounds = committed.size
    hist = accepted_rank_histogram(accepted_ranks, block_size, branch)
    paths = [path for prompt in accepted_ranks for path in prompt]
    depths = np.array([len(p) for p in paths], np.int64)
    off_chain = sum(any(r > 0 for r in p) for p in paths)
    per_depth = [float(np.sum(depths > d) / max(np.sum(depths >= d), 1)) for d in range(block_size)]
    return {
        "nodes_verified_per_round": float(verified.sum() / max(rounds, 1)),
        "tau_per_verified_node": float(committed.sum() / max(verified.sum() + rounds, 1)),
        "accepted_rank_histogram": hist.tolist(),
        "per_depth_acceptance": per_depth,
        "share_rounds_off_rank0": float(off_chain / max(len(paths), 1)),
    }


def rank_factors(histogram, prior: float = RANK_FACTOR_FALLBACK, strength: float = RANK_PRIOR_ROUNDS) -> np.ndarray:
    """f64[B, K] per-rank factors c_{d,r} (trees §3) from an accepted-rank histogram [B, K] of full-tree rounds.

    c_{d,r} estimates P(rank-r child accepted | parent accepted) / P(rank-0 child accepted | parent accepted): the
    ratio of depth d's counts, each smoothed by `strength` pseudo-rounds of the fallback prior^r, so a depth with few
    rounds stays near the fallback and a rank never seen accepted keeps a positive factor (log c is a score term).
    Forced non-increasing in r; c_{d,0} = 1. A child the measuring tree left out counts as not accepted, so with
    N below the tree's capacity the deep, high-rank factors lean low (conservative: such nodes are then verified
    less often).
    """
    hist = np.asarray(histogram, np.float64)
    fallback = prior ** np.arange(hist.shape[1], dtype=np.float64)
    smoothed = hist + strength * fallback[None, :]
    factors = smoothed / smoothed[:, :1]
    return np.minimum.accumulate(factors, axis=1)
