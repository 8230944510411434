"""Per-request decoding configs: SamplingConfig (how tokens are drawn) and VerifyPolicy (how many drafts are
verified, spec §6.5 / §11)."""

from __future__ import annotations

import dataclasses
import math

from dspark_jax.errors import UsageError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn (same for target and draft, so speculative sampling stays lossless)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if (
            not isinstance(self.temperature, (int, float))
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise UsageError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not (0 < self.top_p <= 1):
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise UsageError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        # spec §6.4: temperatures below 1e-5 are argmax decoding.
        return self.temperature < 1e-5


@dataclasses.dataclass(frozen=True)
class VerifyPolicy:
    """How many of a block's drafts go to verification (spec §6.5): `full`, `threshold:X` or `scheduler` (the
    cost-aware prefix scheduler of spec §11)."""

    kind: str = "full"
    threshold: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "VerifyPolicy":
        if text == "full":
            return cls()
        if isinstance(text, str) and text.startswith("threshold:"):
            raw = text.split(":", 1)[1]
            try:
                x = float(raw)
            except ValueError:
                x = None
            if x is None or not (0 <= x <= 1):
                raise UsageError(f"verify threshold must be a number in [0, 1], got {raw!r}")
            return cls("threshold", x)
        if text == "scheduler":
            return cls("scheduler")
        raise UsageError(f"verify must be 'full', 'threshold:X' with X in [0, 1] or 'scheduler', got {text!r}")
