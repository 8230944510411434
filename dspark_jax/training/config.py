"""TrainConfig: the frozen, validated settings of one training run; `python -m dspark_jax.train` has one flag per
field (spec §9.5 defaults)."""

from __future__ import annotations

import dataclasses
import math

from dspark_jax.errors import UsageError

MODES = ("draft", "target")


def _int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")


def _float(name: str, value, low: float, high: float, *, open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low) and value <= high
    if not ok:
        raise UsageError(f"{name} must be a number in {'(' if open_low else '['}{low}, {high}], got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Field `x_y` is flag `--x-y`.

    mode 'draft' trains a DSpark / DFlash draft against the frozen `target` (a fresh draft from `draft_config`, a
    JSON of DSpark fields merged over the target's config, or an existing `draft` folder); mode 'target' trains
    the `target` itself on next-token CE (or a fresh random target from `target_config`, an HF Qwen3 or DeepSeek-V4
    config.json, whose tokenizer comes from `tokenizer`). `loss_weights` (CE, L1, confidence) defaults to
    0.1/0.9/1.0 for DSpark and 1/0/0 for DFlash; `num_anchors` 0 = the draft config's value; `max_steps` 0 =
    `epochs` full epochs; `stop_at_step` 0 = run to the end (else checkpoint and stop there, resumable with `resume`);
    `dtype` is the compute dtype (master weights are always f32; None = float32 on CPU, bfloat16 elsewhere).
    """

    mode: str
    target: str | None
    data: str
    output_dir: str
    target_config: str | None = None
    draft: str | None = None
    draft_config: str | None = None
    tokenizer: str | None = None
    seq_len: int = 4096
    min_supervised: int = 14
    batch_size: int = 1
    grad_accum: int = 1
    epochs: int = 10
    max_steps: int = 0
    stop_at_step: int = 0
    lr: float = 6e-4
    warmup_fraction: float = 0.04
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    num_anchors: int = 0
    loss_weights: tuple[float, float, float] | None = None
    loss_decay_gamma: float = 4.0
    seed: int = 42
    dtype: str | None = None
    mesh: str = "data=1"
    checkpoint_every: int = 3000
    log_every: int = 1
    feature_cache: str | None = None
    export_dtype: str = "bfloat16"
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode == "target" and (self.target is None) == (self.target_config is None):
            raise UsageError(
                "mode target needs exactly one of target (a model to continue) and target_config "
                "(an HF Qwen3 or DeepSeek-V4 config.json for a fresh one)"
            )
        if self.target_config is not None and (self.mode != "target" or self.tokenizer is None):
            raise UsageError("target_config is for mode target and needs tokenizer (the fresh target's tokenizer.json)")
        for name in ("data", "output_dir") if self.target is None else ("target", "data", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UsageError(f"{name} must be a non-empty path, got {getattr(self, name)!r}")
        if self.mode == "draft" and (self.draft is None) == (self.draft_config is None):
            raise UsageError(
                "mode draft needs exactly one of draft (a draft folder to continue) and draft_config "
                "(a JSON of DSpark fields for a fresh draft)"
            )
        if self.mode == "target":
            for name in ("draft", "draft_config", "feature_cache"):
                if getattr(self, name) is not None:
                    raise UsageError(f"{name} applies to mode draft only, got {getattr(self, name)!r} with mode target")
        for name, low in (
            ("seq_len", 2),
            ("min_supervised", 0),
            ("batch_size", 1),
            ("grad_accum", 1),
            ("epochs", 1),
            ("max_steps", 0),
            ("stop_at_step", 0),
            ("num_anchors", 0),
            ("seed", 0),
            ("checkpoint_every", 1),
            ("log_every", 1),
        ):
            _int(name, getattr(self, name), low)
        _float("lr", self.lr, 0.0, 1.0, open_low=True)
        _float("warmup_fraction", self.warmup_fraction, 0.0, 1.0)
        _float("weight_decay", self.weight_decay, 0.0, 1.0)
        _float("adam_b1", self.adam_b1, 0.0, 1.0)
        _float("adam_b2", self.adam_b2, 0.0, 1.0)
        _float("adam_eps", self.adam_eps, 0.0, 1.0, open_low=True)
        _float("grad_clip", self.grad_clip, 0.0, math.inf, open_low=True)
        _float("loss_decay_gamma", self.loss_decay_gamma, 0.0, math.inf, open_low=True)
        if self.loss_weights is not None:
            if len(self.loss_weights) != 3:
                raise UsageError(f"loss_weights must be three numbers CE,L1,confidence, got {self.loss_weights!r}")
            for w in self.loss_weights:
                _float("loss_weights entry", w, 0.0, math.inf)
        if self.dtype not in (None, "float32", "bfloat16"):
            raise UsageError(f"dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.export_dtype not in ("float32", "bfloat16"):
            raise UsageError(f"export_dtype must be float32 or bfloat16, got {self.export_dtype!r}")
        if self.max_steps and self.stop_at_step > self.max_steps:
            raise UsageError(f"stop_at_step ({self.stop_at_step}) must not exceed max_steps ({self.max_steps})")

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def to_json_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["loss_weights"] = list(self.loss_weights) if self.loss_weights is not None else None
        return d
