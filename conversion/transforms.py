"""Named numpy transforms from a PyTorch tensor layout to our param layout; each also states the source shape."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    """`source_shape(target_shape)` is the PyTorch shape we expect; `apply(array, target_shape)` converts it."""

    source_shape: Callable[[tuple[int, ...]], tuple[int, ...]]
    apply: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]


def _heads_in_shape(t):  # target [hidden, heads, head_dim] <- torch Linear [heads * head_dim, hidden]
    return (t[1] * t[2], t[0])


def _heads_out_shape(t):  # target [heads, head_dim, hidden] <- torch Linear [hidden, heads * head_dim]
    return (t[2], t[0] * t[1])


TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(lambda t: tuple(t), lambda a, t: a),
    # torch Linear weight [out, in] -> x @ W kernel [in, out]
    "transpose": Transform(lambda t: (t[1], t[0]), lambda a, t: a.T),
    "heads_in": Transform(_heads_in_shape, lambda a, t: a.T.reshape(t)),
    "heads_out": Transform(_heads_out_shape, lambda a, t: a.T.reshape(t)),
}
