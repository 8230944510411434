"""Sequential temperature scaling of the confidence head (spec §10): per-slot temperatures fitted so that the
prefix products s_j = prod_{i<=j} sigmoid(z_i / t_i) match how often slots 0..j were all accepted.

Fitted on full-block rounds (`generate(..., verify="full")`'s `confidence_logits` and `acceptance_lengths`) and
stored beside the draft as `calibration.json`, which `load_draft` reads and the scheduler uses. That file's reading
and writing live in dspark_jax.checkpoints (re-exported here).

The same file may hold the per-rank factors of draft trees (trees §3): `"rank_factors"`, c_{d,r} as [B][K] lists
measured by `evaluate --save-calibration` on full-tree rounds; `load_rank_factors` reads them (load_draft keeps them
on the DraftHandle) and `factors_for` fits them to a tree's branch factor.
"""

from __future__ import annotations

import json
import os

import numpy as np

from dspark_jax.checkpoints import CALIBRATION_FILE, load_calibration, save_calibration
from dspark_jax.errors import UsageError
from dspark_jax.metrics import RANK_FACTOR_FALLBACK, ece, prefix_predictions

GRID = np.geomspace(0.25, 8.0, 200)  # spec §10 port decision: log-spaced temperatures in [0.25, 8]


def fit_temperatures(z: np.ndarray, accepted: np.ndarray, proposed: np.ndarray) -> np.ndarray:
    """f64[B] temperatures, slot by slot: t_j minimises the ECE of s_j given t_0..t_{j-1} already fixed.

    z: f64[rounds, B] confidence logits; accepted / proposed: i64[rounds] accepted and verified drafts per round
    (rounds that did not verify slot j do not count for it). A slot no round verified keeps t = 1.
    """
    z = np.asarray(z, np.float64)
    temps = np.ones(z.shape[1])
    for j in range(z.shape[1]):
        rows = proposed > j
        if not rows.any():
            continue
        label = (accepted[rows] > j).astype(np.float64)
        errors = []
        for t in GRID:
            temps[j] = t
            errors.append(ece(prefix_predictions(z[rows, : j + 1], temps[: j + 1])[:, j], label))
        temps[j] = GRID[int(np.argmin(errors))]
    return temps


def load_rank_factors(folder: str, block_size: int) -> np.ndarray | None:
    """The folder's per-rank factors f32[B, K] (calibration.json's "rank_factors"), or None when it has none."""
    path = os.path.join(folder, CALIBRATION_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            raw = json.load(f).get("rank_factors")
        factors = None if raw is None else np.asarray(raw, np.float32)
    except (OSError, ValueError, AttributeError, TypeError):
        raise UsageError(f"{path} has unreadable rank_factors; expected [{block_size}][K] numbers in (0, 1]") from None
    if factors is None:
        return None
    ok = factors.ndim == 2 and factors.shape[0] == block_size and factors.shape[1] >= 1
    if not ok or not np.all((factors > 0) & (factors <= 1)) or not np.all(factors[:, 0] == 1):
        raise UsageError(
            f"{path} holds rank_factors of shape {list(factors.shape)}; expected [{block_size}][K] numbers in (0, 1] "
            "with rank 0 equal to 1"
        )
    return factors


def factors_for(stored, block_size: int, branch: int) -> tuple:
    """Measured factors [B, K_m] as a TreeConfig's rank_factors ([B][K] tuples): the first K ranks, and for ranks
    past the measured K_m the last measured factor times the fallback's 0.5 per extra rank (still non-increasing)."""
    stored = np.asarray(stored, np.float64)
    if stored.shape[0] != block_size:
        raise UsageError(f"rank_factors has {stored.shape[0]} depths; the draft's block has {block_size}")
    extra = max(branch - stored.shape[1], 0)
    tail = stored[:, -1:] * RANK_FACTOR_FALLBACK ** np.arange(1, extra + 1, dtype=np.float64)[None, :]
    full = np.concatenate([stored, tail], axis=1)[:, :branch]
    return tuple(tuple(float(c) for c in row) for row in full)


__all__ = [
    "CALIBRATION_FILE",
    "GRID",
    "factors_for",
    "fit_temperatures",
    "load_calibration",
    "load_rank_factors",
    "save_calibration",
]
