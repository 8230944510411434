"""Qwen3Config: geometry and numerics of a Qwen3 decoder stack, to and from the HF `config.json` layout."""

from __future__ import annotations

import dataclasses
from typing import Any

from dspark_jax.configs._common import DTYPES, _number, _positive, _require
from dspark_jax.errors import UsageError


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
