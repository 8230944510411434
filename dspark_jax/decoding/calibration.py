"""Sequential temperature scaling of the confidence head (spec §10): per-slot temperatures fitted so that the
prefix products s_j = prod_{i<=j} sigmoid(z_i / t_i) match how often slots 0..j were all accepted.

Fitted on full-block rounds (`generate(..., verify="full")`'s `confidence_logits` and `acceptance_lengths`) and
stored beside the draft as `calibration.json`, which `load_draft` reads and the scheduler uses.
"""

from __future__ import annotations

import json
import os

import numpy as np

from dspark_jax.checkpoints import atomic_file
from dspark_jax.errors import UsageError
from dspark_jax.metrics import ece, prefix_predictions

CALIBRATION_FILE = "calibration.json"
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


def save_calibration(folder: str, temperatures, block_size: int, info: dict | None = None) -> str:
    """Write `calibration.json` into `folder` atomically; returns its path."""
    temps = [float(t) for t in temperatures]
    if len(temps) != block_size or not all(t > 0 for t in temps):
        raise UsageError(f"calibration needs {block_size} positive temperatures, got {temps}")
    path = os.path.join(folder, CALIBRATION_FILE)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump({"temperatures": temps, **(info or {})}, f, indent=1)
        f.write("\n")
    return path


def load_calibration(folder: str, block_size: int) -> np.ndarray | None:
    """The folder's per-slot temperatures f32[B], or None when it has no calibration.json."""
    path = os.path.join(folder, CALIBRATION_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            temps = json.load(f)["temperatures"]
        temps = np.asarray(temps, np.float32)
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"{path} is not a calibration file: expected {{'temperatures': [{block_size} numbers]}}"
        ) from None
    if temps.shape != (block_size,) or not np.all(temps > 0):
        raise UsageError(f"{path} holds temperatures {temps.tolist()}; expected {block_size} positive numbers")
    return temps
