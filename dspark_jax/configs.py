"""Frozen, hashable configs (target, draft, decoding) built from HF `config.json` dicts and validated on construction."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from dspark_jax.errors import UsageError

DTYPES = ("float32", "bfloat16")
MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _require(d: dict, key: str, source: str) -> Any:
    if key not in d:
        raise UsageError(f"{source}: missing field {key!r}")
    return d[key]


def read_config_json(folder: str) -> dict:
    """The `config.json` of an HF-style folder as a dict, with a one-line error when absent or corrupt."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint folder {folder!r} has no config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(d, dict):
        raise UsageError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d


@dataclasses.dataclass(frozen=True)
class Qwen3Config:
    """Geometry and numerics of a Qwen3 decoder stack (target, or the draft's inherited geometry).

    `dtype` is the compute dtype and `param_dtype` the storage dtype; `dtype="float32"` runs everything in f32.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 1_000_000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # HF rope_parameters minus theta/type "default"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 40960
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            _positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise UsageError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise UsageError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rope_theta > 0):
            raise UsageError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not (0 < self.rms_norm_eps < 1):
            raise UsageError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UsageError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            kind = dict(self.rope_scaling).get("rope_type")
            if kind not in ("linear", "dynamic", "yarn"):
                raise UsageError(f"rope_scaling type must be linear or yarn, got {kind!r}")

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def with_dtype(self, dtype: str) -> "Qwen3Config":
        """The same config computing (and storing) in `dtype`."""
        return dataclasses.replace(self, dtype=dtype, param_dtype=dtype)

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", **overrides) -> "Qwen3Config":
        """Build from a transformers Qwen3 `config.json` dict (rope stored as `rope_parameters` or legacy fields)."""
        rope = dict(d.get("rope_parameters") or {})
        legacy = d.get("rope_scaling")
        if isinstance(legacy, dict):
            rope = {**legacy, **rope}
        theta = rope.pop("rope_theta", d.get("rope_theta", 1_000_000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type not in (None, "default"):
            rope["rope_type"] = rope_type
            rope.pop("type", None)
            scaling = tuple(sorted((k, v) for k, v in rope.items() if not isinstance(v, (list, dict))))
        hidden = _require(d, "hidden_size", source)
        heads = _require(d, "num_attention_heads", source)
        head_dim = d.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) else 0)
        kwargs = dict(
            vocab_size=_require(d, "vocab_size", source),
            hidden_size=hidden,
            num_hidden_layers=_require(d, "num_hidden_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads", heads),
            head_dim=head_dim,
            intermediate_size=_require(d, "intermediate_size", source),
            rope_theta=float(theta),
            rope_scaling=scaling,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=int(d.get("max_position_embeddings", 40960)),
        )
        if d.get("attention_bias"):
            raise UsageError(f"{source}: attention_bias=true is not supported for Qwen3 (accepted: false)")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """The transformers `Qwen3Config` fields (transformers 5 layout) for export."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling:
            rope.update(dict(self.rope_scaling))
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "silu",
            "rope_parameters": rope,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_cache": True,
            "torch_dtype": self.param_dtype,
        }


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """A DSpark / DFlash draft (spec §3, §5.1): its own layer stack over the target's geometry.

    `model` holds the inherited geometry with `num_hidden_layers` = draft layers.
    """

    model: Qwen3Config
    block_size: int
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    markov_rank: int = 0
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    num_anchors: int = 512

    def __post_init__(self):
        _positive("block_size", self.block_size)
        _positive("num_target_layers", self.num_target_layers)
        if not self.target_layer_ids:
            raise UsageError("target_layer_ids must name at least one target layer, got []")
        for lid in self.target_layer_ids:
            if not isinstance(lid, int) or not (-1 <= lid < self.num_target_layers - 1):
                raise UsageError(
                    f"target_layer_ids entry {lid!r} is out of range: accepted -1..{self.num_target_layers - 2} "
                    f"(the last target layer {self.num_target_layers - 1} is never used, spec §4.1)")
        if not (0 <= self.mask_token_id < self.model.vocab_size):
            raise UsageError(f"mask_token_id must be in [0, {self.model.vocab_size}), got {self.mask_token_id}")
        if self.markov_rank < 0:
            raise UsageError(f"markov_rank must be >= 0, got {self.markov_rank}")
        if self.markov_rank and self.markov_head_type not in MARKOV_HEAD_TYPES:
            raise UsageError(f"markov_head_type must be one of {MARKOV_HEAD_TYPES}, got {self.markov_head_type!r}")
        if self.confidence_head_with_markov and not self.markov_rank:
            raise UsageError("confidence_head_with_markov=true needs markov_rank > 0, got markov_rank=0")

    @property
    def num_taps(self) -> int:
        return len(self.target_layer_ids)

    @property
    def use_markov(self) -> bool:
        return self.markov_rank > 0

    def with_dtype(self, dtype: str) -> "DraftConfig":
        return dataclasses.replace(self, model=self.model.with_dtype(dtype))

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", **model_overrides) -> "DraftConfig":
        """Build from a DeepSpec draft `config.json` (target config + DSpark fields, spec §5.1)."""
        model = Qwen3Config.from_hf_dict(d, source, **model_overrides)
        rank = int(d.get("markov_rank", 0) or 0)
        ids = _require(d, "target_layer_ids", source)
        if not isinstance(ids, list):
            raise UsageError(f"{source}: target_layer_ids must be a list of ints, got {ids!r}")
        return cls(
            model=model,
            block_size=_require(d, "block_size", source),
            num_target_layers=_require(d, "num_target_layers", source),
            target_layer_ids=tuple(ids),
            mask_token_id=_require(d, "mask_token_id", source),
            markov_rank=rank,
            markov_head_type=d.get("markov_head_type", "vanilla") if rank else "vanilla",
            enable_confidence_head=bool(d.get("enable_confidence_head", False)),
            confidence_head_with_markov=bool(d.get("confidence_head_with_markov", False))
            if d.get("enable_confidence_head") else False,
            num_anchors=int(d.get("num_anchors", 512)),
        )

    def to_hf_dict(self) -> dict:
        d = self.model.to_hf_dict()
        d.update({
            "architectures": ["Qwen3DSparkModel"],
            "num_target_layers": self.num_target_layers,
            "block_size": self.block_size,
            "mask_token_id": self.mask_token_id,
            "target_layer_ids": list(self.target_layer_ids),
            "num_anchors": self.num_anchors,
            "markov_rank": self.markov_rank,
            "enable_confidence_head": self.enable_confidence_head,
            "tie_word_embeddings": False,
            "layer_types": ["full_attention"] * self.model.num_hidden_layers,
        })
        if self.markov_rank:
            d["markov_head_type"] = self.markov_head_type
        if self.enable_confidence_head:
            d["confidence_head_with_markov"] = self.confidence_head_with_markov
        return d

    def check_target(self, target: Qwen3Config) -> None:
        """Raise a one-line UsageError when this draft cannot run against `target` (spec §3.2)."""
        pairs = [("hidden_size", self.model.hidden_size, target.hidden_size),
                 ("vocab_size", self.model.vocab_size, target.vocab_size),
                 ("num_target_layers", self.num_target_layers, target.num_hidden_layers)]
        for name, mine, theirs in pairs:
            if mine != theirs:
                raise UsageError(f"draft {name} is {mine} but the target's is {theirs}: this draft belongs to "
                                 "another target")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn (same for target and draft, so speculative sampling stays lossless)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
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
    """How many of a block's drafts go to verification (spec §6.5): `full` or `threshold:X`."""

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
            raise UsageError("verify 'scheduler' needs the prefix scheduler, which is not built yet; "
                             "accepted: full, threshold:X")
        raise UsageError(f"verify must be 'full' or 'threshold:X' with X in [0, 1], got {text!r}")
