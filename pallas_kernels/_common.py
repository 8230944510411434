"""Helpers shared by the Pallas kernels: platform probe, block-size rounding, interpret-mode arguments."""

from __future__ import annotations

from collections.abc import Sequence

import jax

# Platform names as this package uses them; `jax.default_backend()` may also say "cuda" or "rocm".
GPU = "gpu"
TPU = "tpu"
CPU = "cpu"
_ALIASES = {"cuda": GPU, "rocm": GPU, "gpu": GPU, "tpu": TPU, "cpu": CPU}


def platform(name: str | None = None) -> str:
    """Normalise a platform name ("cuda"/"rocm" -> "gpu"); `None` means the backend jax runs on by default."""
    raw = jax.default_backend() if name is None else name
    try:
        return _ALIASES[raw.lower()]
    except KeyError:
        raise ValueError(f"unknown platform {raw!r}; expected one of {sorted(_ALIASES)}") from None


def has_accelerator() -> bool:
    """True when the default backend can run compiled (non-interpret) Pallas kernels."""
    return platform() in (GPU, TPU)


def next_power_of_2(x: int) -> int:
    """Smallest power of two >= x (1 for x <= 1)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def round_up(x: int, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= x."""
    return -(-int(x) // multiple) * multiple


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def is_power_of_2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def lookup_by_size(table: Sequence[tuple[int, ...]], size: int) -> tuple[int, ...] | None:
    """Row of `table` (rows `(min_size, *values)`, ascending min_size) with the largest min_size <= size.

    Returns the row's values (without min_size), or None when no row applies.
    """
    chosen = None
    for row in table:
        if row[0] <= size:
            chosen = tuple(row[1:])
    return chosen


def gpu_block(block: int, extent: int, *, minimum: int = 32) -> int:
    """A Triton-legal tile over an axis of length `extent`: a power of two, no larger than the axis needs.

    Triton requires power-of-two tensor sizes; a tile larger than next_power_of_2(extent) would only load
    masked-off lanes, so it is capped there.
    """
    block = next_power_of_2(max(int(block), 1))
    return max(min(block, next_power_of_2(extent)), minimum)


def tpu_block(block: int, extent: int, *, lane: int = 128) -> int:
    """A Mosaic-legal tile over the minor axis: a multiple of the 128-lane vreg width, capped at the axis."""
    block = round_up(max(int(block), lane), lane)
    return min(block, round_up(extent, lane))


def interpret_arg(interpret):
    """Value for `pl.pallas_call(interpret=...)`.

    `True` selects the generic HLO interpreter, which runs every kernel variant on any backend (CPU tests) and
    ignores memory spaces; a backend-specific params object (e.g. `pltpu.InterpretParams()`) is passed through
    for a more faithful simulation; `False`/`None` compile for the lowering platform (which must then be a
    GPU for Triton kernels or a TPU for Mosaic ones -- cross-lowering from a CPU host also works).
    """
    if interpret is None or interpret is False:
        return False
    return interpret
