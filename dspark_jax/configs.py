"""Frozen, hashable configs (target, draft, decoding) built from HF `config.json` dicts, validated on creation."""

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


def _number(source: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{source}: {name} must be a number, got {value!r}")
    return float(value)


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
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "max_position_embeddings",
        ):
            _positive(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise UsageError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by num_key_value_heads "
                f"({self.num_key_value_heads})"
            )
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
            scaling = dict(self.rope_scaling)
            kind = scaling.get("rope_type")
            # layers/rope.py implements only linear scaling; yarn / dynamic would load and run with wrong positions.
            if kind != "linear":
                raise UsageError(
                    f"rope scaling type must be 'linear' (yarn and dynamic are not implemented), got {kind!r}"
                )
            factor = scaling.get("factor")
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise UsageError(f"linear rope scaling needs a factor > 0, got {factor!r}")

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
        tied = d.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise UsageError(f"{source}: tie_word_embeddings must be true or false, got {tied!r}")
        kwargs = dict(
            vocab_size=_require(d, "vocab_size", source),
            hidden_size=hidden,
            num_hidden_layers=_require(d, "num_hidden_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads", heads),
            head_dim=head_dim,
            intermediate_size=_require(d, "intermediate_size", source),
            rope_theta=_number(source, "rope_theta", theta),
            rope_scaling=scaling,
            rms_norm_eps=_number(source, "rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=tied,
            max_position_embeddings=d.get("max_position_embeddings", 40960),
        )
        # Features of the HF Qwen3 family this port does not implement: refuse them rather than run them wrongly.
        if d.get("attention_bias"):
            raise UsageError(f"{source}: attention_bias=true is not supported for Qwen3 (accepted: false)")
        if d.get("hidden_act", "silu") != "silu":
            raise UsageError(f"{source}: hidden_act must be 'silu', got {d.get('hidden_act')!r}")
        layer_types = d.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types) or (d.get("use_sliding_window") and not layer_types):
            raise UsageError(
                f"{source}: sliding-window attention is not supported (accepted: use_sliding_window "
                f"false, every layer_types entry 'full_attention'), got layer_types={layer_types}"
            )
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


GEMMA4_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "silu")  # models/gemma4.py ACTIVATIONS
GEMMA4_ROPE_TYPES = ("default", "proportional")


@dataclasses.dataclass(frozen=True)
class Gemma4DraftGeometry:
    """What a Gemma4-flavour draft adds to the inherited geometry in `DraftConfig.model` (spec §4.3, §4.5).

    In that `model`, head_dim / num_key_value_heads are the target's *global* (full-attention) values and rope_theta
    is the full-attention base; the rest of the full-attention RoPE lives here.
    """

    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    attention_k_eq_v: bool = False
    rope_type: str = "proportional"
    partial_rotary_factor: float = 1.0
    rope_factor: float = 1.0

    def __post_init__(self):
        if self.hidden_activation not in GEMMA4_ACTIVATIONS:
            raise UsageError(f"hidden_activation must be one of {GEMMA4_ACTIVATIONS}, got {self.hidden_activation!r}")
        cap = self.final_logit_softcapping
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
            raise UsageError(f"final_logit_softcapping must be null or a number > 0, got {cap!r}")
        if not isinstance(self.attention_k_eq_v, bool):
            raise UsageError(f"attention_k_eq_v must be true or false, got {self.attention_k_eq_v!r}")
        if self.rope_type not in GEMMA4_ROPE_TYPES:
            raise UsageError(f"full-attention rope_type must be one of {GEMMA4_ROPE_TYPES}, got {self.rope_type!r}")
        if not (0 < self.partial_rotary_factor <= 1):
            raise UsageError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor!r}")
        if not (self.rope_factor > 0):
            raise UsageError(f"rope factor must be > 0, got {self.rope_factor!r}")

    @staticmethod
    def from_hf_dict(
        d: dict, source: str = "config.json", **model_overrides
    ) -> "tuple[Qwen3Config, Gemma4DraftGeometry]":
        """(inherited geometry, Gemma4 extras) from a Gemma4DSparkModel `config.json` (target text config + §5.1).

        The global head dim / KV heads come from `global_head_dim` / `num_global_key_value_heads` (hub layout) or
        from the full-attention entries of `per_layer_config` (how transformers >= 5.2x writes them); the KV-head
        override applies only with `attention_k_eq_v`, as in transformers.
        """
        for key, accepted in (("enable_moe_block", False), ("attention_bias", False)):
            if d.get(key, accepted) != accepted:
                raise UsageError(
                    f"{source}: {key}={d[key]!r} is not supported for a Gemma4 draft "
                    f"(accepted: {str(accepted).lower()})"
                )
        if d.get("hidden_size_per_layer_input"):
            raise UsageError(
                f"{source}: per-layer input embeddings are not supported (spec §4.5): "
                f"hidden_size_per_layer_input must be 0 or null, got {d['hidden_size_per_layer_input']!r}"
            )
        k_eq_v = _require(d, "attention_k_eq_v", source)
        if not isinstance(k_eq_v, bool):
            raise UsageError(f"{source}: attention_k_eq_v must be true or false, got {k_eq_v!r}")
        heads = _require(d, "num_attention_heads", source)
        kv_heads = _require(d, "num_key_value_heads", source)
        head_dim, global_kv = d.get("global_head_dim"), d.get("num_global_key_value_heads")
        per_layer = d.get("per_layer_config") or {}
        if not isinstance(per_layer, dict):
            raise UsageError(f"{source}: per_layer_config must be an object, got {type(per_layer).__name__}")
        # transformers writes one identical override per full-attention layer of the target.
        overrides = {json.dumps(v, sort_keys=True) for v in per_layer.values()}
        if len(overrides) > 1:
            raise UsageError(
                f"{source}: per_layer_config entries differ ({sorted(overrides)}); a Gemma4 draft "
                "needs one global head_dim / num_key_value_heads"
            )
        if overrides:
            entry = json.loads(overrides.pop())
            for key, top, value in (
                ("head_dim", "global_head_dim", head_dim),
                ("num_key_value_heads", "num_global_key_value_heads", global_kv),
            ):
                if key in entry and value is not None and entry[key] != value:
                    raise UsageError(f"{source}: {top}={value} disagrees with per_layer_config {key}={entry[key]}")
            head_dim = entry.get("head_dim", head_dim)
            global_kv = entry.get("num_key_value_heads", global_kv)
        if head_dim is None:
            raise UsageError(
                f"{source}: missing field 'global_head_dim' (nor a per_layer_config head_dim): the "
                "draft's head dim is the target's global head dim (spec §4.5)"
            )
        rope_all = _require(d, "rope_parameters", source)
        rope = rope_all.get("full_attention") if isinstance(rope_all, dict) else None
        if not isinstance(rope, dict):
            raise UsageError(
                f"{source}: rope_parameters must hold a 'full_attention' object (spec §4.3), got {rope_all!r}"
            )
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        proportional = rope_type == "proportional"
        cap = d.get("final_logit_softcapping")
        geometry = Gemma4DraftGeometry(
            hidden_activation=_require(d, "hidden_activation", source),
            final_logit_softcapping=None if cap is None else _number(source, "final_logit_softcapping", cap),
            attention_k_eq_v=k_eq_v,
            rope_type=rope_type,
            # transformers defaults both to 1.0 for 'proportional' and ignores them for 'default'.
            partial_rotary_factor=_number(source, "partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
            if proportional
            else 1.0,
            rope_factor=_number(source, "factor", rope.get("factor", 1.0)) if proportional else 1.0,
        )
        tied = d.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise UsageError(f"{source}: tie_word_embeddings must be true or false, got {tied!r}")
        kwargs = dict(
            vocab_size=_require(d, "vocab_size", source),
            hidden_size=_require(d, "hidden_size", source),
            num_hidden_layers=_require(d, "num_hidden_layers", source),
            num_attention_heads=heads,
            num_key_value_heads=global_kv if (k_eq_v and global_kv is not None) else kv_heads,
            head_dim=head_dim,
            intermediate_size=_require(d, "intermediate_size", source),
            rope_theta=_number(
                source, "rope_theta", _require(rope, "rope_theta", source + " rope_parameters.full_attention")
            ),
            rms_norm_eps=_number(source, "rms_norm_eps", _require(d, "rms_norm_eps", source)),
            tie_word_embeddings=tied,
            max_position_embeddings=d.get("max_position_embeddings", 40960),
        )
        kwargs.update(model_overrides)
        return Qwen3Config(**kwargs), geometry

    def to_hf_fields(self, model: Qwen3Config) -> dict:
        """Gemma4 text-config fields for export (hub layout: global head dim / KV heads as top-level fields)."""
        rope = {"rope_type": self.rope_type, "rope_theta": model.rope_theta}
        if self.rope_type == "proportional":
            rope.update(partial_rotary_factor=self.partial_rotary_factor, factor=self.rope_factor)
        return {
            "model_type": "gemma4_text",
            "vocab_size": model.vocab_size,
            "hidden_size": model.hidden_size,
            "num_hidden_layers": model.num_hidden_layers,
            "num_attention_heads": model.num_attention_heads,
            "num_key_value_heads": model.num_key_value_heads,
            "num_global_key_value_heads": model.num_key_value_heads if self.attention_k_eq_v else None,
            "head_dim": model.head_dim,
            "global_head_dim": model.head_dim,
            "intermediate_size": model.intermediate_size,
            "hidden_activation": self.hidden_activation,
            "rope_parameters": {"full_attention": rope},
            "rms_norm_eps": model.rms_norm_eps,
            "final_logit_softcapping": self.final_logit_softcapping,
            "attention_k_eq_v": self.attention_k_eq_v,
            "attention_bias": False,
            "enable_moe_block": False,
            "hidden_size_per_layer_input": 0,
            "tie_word_embeddings": model.tie_word_embeddings,
            "max_position_embeddings": model.max_position_embeddings,
            "torch_dtype": model.param_dtype,
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
    gemma4: Gemma4DraftGeometry | None = None  # set for a Gemma4DSparkModel draft (spec §4.5); None = Qwen3 flavour

    def __post_init__(self):
        _positive("block_size", self.block_size)
        _positive("num_target_layers", self.num_target_layers)
        if not self.target_layer_ids:
            raise UsageError("target_layer_ids must name at least one target layer, got []")
        for lid in self.target_layer_ids:
            if not isinstance(lid, int) or not (-1 <= lid < self.num_target_layers - 1):
                raise UsageError(
                    f"target_layer_ids entry {lid!r} is out of range: accepted -1..{self.num_target_layers - 2} "
                    f"(the last target layer {self.num_target_layers - 1} is never used, spec §4.1)"
                )
        if (
            not isinstance(self.mask_token_id, int)
            or isinstance(self.mask_token_id, bool)
            or not (0 <= self.mask_token_id < self.model.vocab_size)
        ):
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

    @property
    def flavour(self) -> str:
        return "qwen3" if self.gemma4 is None else "gemma4"

    def with_dtype(self, dtype: str) -> "DraftConfig":
        return dataclasses.replace(self, model=self.model.with_dtype(dtype))

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", **model_overrides) -> "DraftConfig":
        """Build from a DeepSpec draft `config.json` (target config + DSpark fields, spec §5.1)."""
        gemma4 = None
        if d.get("architectures") == ["Gemma4DSparkModel"]:
            model, gemma4 = Gemma4DraftGeometry.from_hf_dict(d, source, **model_overrides)
        else:
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
            markov_head_type=_require(d, "markov_head_type", source) if rank else "vanilla",
            enable_confidence_head=bool(d.get("enable_confidence_head", False)),
            confidence_head_with_markov=bool(d.get("confidence_head_with_markov", False))
            if d.get("enable_confidence_head")
            else False,
            num_anchors=int(d.get("num_anchors", 512)),
            gemma4=gemma4,
        )

    def to_hf_dict(self) -> dict:
        d = self.model.to_hf_dict() if self.gemma4 is None else self.gemma4.to_hf_fields(self.model)
        d.update(
            {
                "architectures": ["Qwen3DSparkModel" if self.gemma4 is None else "Gemma4DSparkModel"],
                "num_target_layers": self.num_target_layers,
                "block_size": self.block_size,
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": list(self.target_layer_ids),
                "num_anchors": self.num_anchors,
                "markov_rank": self.markov_rank,
                "enable_confidence_head": self.enable_confidence_head,
                "tie_word_embeddings": False,
                "layer_types": ["full_attention"] * self.model.num_hidden_layers,
            }
        )
        if self.markov_rank:
            d["markov_head_type"] = self.markov_head_type
        if self.enable_confidence_head:
            d["confidence_head_with_markov"] = self.confidence_head_with_markov
        return d

    def check_target(self, target: Qwen3Config) -> None:
        """Raise a one-line UsageError when this draft cannot run against `target` (spec §3.2)."""
        pairs = [
            ("hidden_size", self.model.hidden_size, target.hidden_size),
            ("vocab_size", self.model.vocab_size, target.vocab_size),
            ("num_target_layers", self.num_target_layers, target.num_hidden_layers),
            # The draft inherits the target's attention geometry (spec §3.2); a mismatch means another target.
            ("num_attention_heads", self.model.num_attention_heads, target.num_attention_heads),
            ("num_key_value_heads", self.model.num_key_value_heads, target.num_key_value_heads),
            ("head_dim", self.model.head_dim, target.head_dim),
        ]
        for name, mine, theirs in pairs:
            if mine != theirs:
                raise UsageError(
                    f"draft {name} is {mine} but the target's is {theirs}: this draft belongs to another target"
                )


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
