"""Sequential temperature scaling of the confidence head (spec §10): per-slot temperatures fitted so that the
prefix products s_j = prod_{i<=j} sigmoid(z_i / t_i) match how often slots 0..j were all accepted.

Fitted on full-block rounds (`generate(..., verify="full")`'s `confidence_logits` and `acceptance_lengths`) and
stored beside the draft as `calibration.json`, which `load_draft` reads and the scheduler uses. That file's reading
and writing live in dspark_jax.checkpoints (re-exported here).
"""

from __future__ import annotations

import numpy as np

from dspark_jax.checkpoints import CALIBRATION_FILE, load_calibration, save_calibration
from dspark_jax.metrics import ece, prefix_predictions

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


__all__ = ["CALIBRATION_FILE", "GRID", "fit_temperatures", "load_calibration", "save_calibration"]
