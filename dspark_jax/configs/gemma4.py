"""Gemma4 configs: the target's text stack (Gemma4Config) and what a Gemma4-flavour draft adds to the inherited
Qwen3-style geometry (Gemma4DraftGeometry, spec §4.3, §4.5)."""

from __future__ import annotations

import dataclasses
import json

from dspark_jax.configs._common import DTYPES, _number, _positive, _require
from dspark_jax.configs.qwen3 import Qwen3Config
from dspark_jax.errors import UsageError

GEMMA4_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_new", "gelu", "silu")  # models/gemma4.py ACTIVATIONS
GEMMA4_ROPE_TYPES = ("default", "proportional")
GEMMA4_LAYER_TYPES = ("sliding_attention", "full_attention")


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


# Gemma4 text-config features the released 12B does not use and this port does not implement: (field, accepted).
_UNSUPPORTED_TARGET_FIELDS = (
    ("enable_moe_block", (False, None)),
    ("hidden_size_per_layer_input", (0, None)),
    ("num_kv_shared_layers", (0, None)),
    ("attention_bias", (False, None)),
    ("use_bidirectional_attention", (None, "vision")),  # "vision" changes masks of image tokens only
)


def _rope_tuple(rope_all: dict, layer_type: str, source: str) -> tuple[float, str, float, float]:
    """(theta, rope_type, partial_rotary_factor, factor) of one layer type (models/gemma4.py Gemma4Attention.rope)."""
    rope = rope_all.get(layer_type)
    if not isinstance(rope, dict):
        raise UsageError(f"{source}: rope_parameters must hold a {layer_type!r} object, got {rope_all!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in GEMMA4_ROPE_TYPES:
        raise UsageError(f"{source}: {layer_type} rope_type must be one of {GEMMA4_ROPE_TYPES}, got {rope_type!r}")
    theta = _number(source, "rope_theta", _require(rope, "rope_theta", f"{source} rope_parameters.{layer_type}"))
    if rope_type == "default":  # transformers ignores both fields for this type
        return theta, rope_type, 1.0, 1.0
    partial = _number(source, "partial_rotary_factor", rope.get("partial_rotary_factor", 1.0))
    return theta, rope_type, partial, _number(source, "factor", rope.get("factor", 1.0))


@dataclasses.dataclass(frozen=True)
class Gemma4Config:
    """The text stack of a Gemma4 target (Gemma4ForCausalLM, or the language model of Gemma4ForConditionalGeneration).

    Layers alternate per `layer_types` between sliding-window attention (`head_dim`, `num_key_value_heads`,
    `sliding_rope`, a window of `sliding_window` positions including the query's own) and full attention
    (`global_head_dim`, `num_global_key_value_heads`, `full_rope`; no value projection when `attention_k_eq_v`).
    Ropes are (theta, rope_type, partial_rotary_factor, factor). `dtype` / `param_dtype` as in Qwen3Config.
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    global_head_dim: int
    num_global_key_value_heads: int
    intermediate_size: int
    layer_types: tuple[str, ...]
    sliding_window: int
    sliding_rope: tuple = (10_000.0, "default", 1.0, 1.0)
    full_rope: tuple = (1_000_000.0, "proportional", 0.25, 1.0)
    hidden_activation: str = "gelu_pytorch_tanh"
    final_logit_softcapping: float | None = None
    attention_k_eq_v: bool = False
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131_072
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
            "global_head_dim",
            "num_global_key_value_heads",
            "intermediate_size",
            "sliding_window",
            "max_position_embeddings",
        ):
            _positive(name, getattr(self, name))
        for heads, dim, kind in (
            (self.num_key_value_heads, self.head_dim, "sliding"),
            (self.num_global_key_value_heads, self.global_head_dim, "full-attention"),
        ):
            if self.num_attention_heads % heads:
                raise UsageError(
                    f"num_attention_heads ({self.num_attention_heads}) must be divisible by the {kind} layers' "
                    f"KV heads ({heads})"
                )
            if dim % 2:
                raise UsageError(f"{kind} head_dim must be even for rotary embeddings, got {dim}")
        if len(self.layer_types) != self.num_hidden_layers or any(
            t not in GEMMA4_LAYER_TYPES for t in self.layer_types
        ):
            raise UsageError(
                f"layer_types must list {self.num_hidden_layers} entries from {GEMMA4_LAYER_TYPES}, "
                f"got {list(self.layer_types)}"
            )
        for name in ("sliding_rope", "full_rope"):
            theta, rope_type, partial, factor = getattr(self, name)
            if rope_type not in GEMMA4_ROPE_TYPES or not theta > 0 or not 0 < partial <= 1 or not factor > 0:
                raise UsageError(
                    f"{name} must be (theta > 0, one of {GEMMA4_ROPE_TYPES}, partial_rotary_factor in (0, 1], "
                    f"factor > 0), got {getattr(self, name)!r}"
                )
        # The draft-side checks (activation, soft-cap) are the same fields: reuse them.
        Gemma4DraftGeometry(self.hidden_activation, self.final_logit_softcapping, self.attention_k_eq_v)
        if not (0 < self.rms_norm_eps < 1):
            raise UsageError(f"rms_norm_eps must be in (0, 1), got {self.rms_norm_eps}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UsageError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    @property
    def sliding_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "sliding_attention")

    @property
    def full_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    @property
    def draft_geometry(self) -> tuple[int, int]:
        """(head_dim, kv_heads) a Gemma4 draft inherits: the full-attention layers' (spec §4.5)."""
        return self.global_head_dim, self.num_global_key_value_heads

    def with_dtype(self, dtype: str) -> "Gemma4Config":
        return dataclasses.replace(self, dtype=dtype, param_dtype=dtype)

    @staticmethod
    def is_hf_dict(d: dict) -> bool:
        """True for a Gemma4ForCausalLM / Gemma4ForConditionalGeneration `config.json` (not a Gemma4 draft)."""
        arch = (d.get("architectures") or [""])[0]
        return arch in ("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration") or (
            not arch and d.get("model_type") in ("gemma4", "gemma4_text") and "block_size" not in d
        )

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", **overrides) -> "Gemma4Config":
        """Build from a transformers Gemma4 `config.json`: a text config, or a multimodal one whose `text_config`
        holds the language model (vision / audio towers are ignored).

        Per-layer geometry comes from `per_layer_config` (how transformers >= 5.2x writes it) or from the hub
        layout's `global_head_dim` / `num_global_key_value_heads` (the KV override only with attention_k_eq_v, as in
        transformers). Fields of features this port does not implement are refused by name.
        """
        text = d
        if "text_config" in d:
            text = d["text_config"]
            if not isinstance(text, dict):
                raise UsageError(f"{source}: text_config must be an object, got {type(text).__name__}")
            source = f"{source} text_config"
        for key, accepted in _UNSUPPORTED_TARGET_FIELDS:
            if text.get(key, accepted[0]) not in accepted:
                raise UsageError(
                    f"{source}: {key}={text[key]!r} is not supported for a Gemma4 target "
                    f"(accepted: {' or '.join(json.dumps(a) for a in accepted)})"
                )
        n = _require(text, "num_hidden_layers", source)
        layer_types = _require(text, "layer_types", source)
        if not isinstance(layer_types, list) or not isinstance(n, int) or len(layer_types) != n:
            raise UsageError(
                f"{source}: layer_types must be a list of num_hidden_layers={n} entries, got {layer_types}"
            )
        k_eq_v = text.get("attention_k_eq_v", False)
        if not isinstance(k_eq_v, bool):
            raise UsageError(f"{source}: attention_k_eq_v must be true or false, got {k_eq_v!r}")
        head_dim = _require(text, "head_dim", source)
        kv_heads = _require(text, "num_key_value_heads", source)
        per_layer = text.get("per_layer_config")
        if per_layer is None:
            global_head_dim = text.get("global_head_dim")
            if global_head_dim is None and "full_attention" in layer_types:
                raise UsageError(f"{source}: missing field 'global_head_dim' (nor a per_layer_config)")
            global_kv = text.get("num_global_key_value_heads") if k_eq_v else None
            geometry = {
                "sliding_attention": {(head_dim, kv_heads)},
                "full_attention": {(global_head_dim or head_dim, global_kv or kv_heads)},
            }
        else:
            if not isinstance(per_layer, dict):
                raise UsageError(f"{source}: per_layer_config must be an object, got {type(per_layer).__name__}")
            by_layer = {}
            for key, entry in per_layer.items():
                if (
                    not str(key).isdigit()
                    or not isinstance(entry, dict)
                    or set(entry) - {"head_dim", "num_key_value_heads"}
                ):
                    raise UsageError(
                        f"{source}: per_layer_config entry {key!r}: {entry!r} is not supported "
                        "(accepted: layer index -> head_dim / num_key_value_heads)"
                    )
                by_layer[int(key)] = entry
            geometry = {t: set() for t in GEMMA4_LAYER_TYPES}
            for i, t in enumerate(layer_types):
                entry = by_layer.get(i, {})
                geometry.setdefault(t, set()).add(
                    (entry.get("head_dim", head_dim), entry.get("num_key_value_heads", kv_heads))
                )
        for t, shapes in geometry.items():
            if len(shapes) > 1:  # one stacked KV cache per layer type needs one geometry per type
                raise UsageError(
                    f"{source}: {t} layers differ in (head_dim, num_key_value_heads): {sorted(shapes)}; "
                    "accepted: one geometry per layer type"
                )
        (sliding_geometry,) = geometry["sliding_attention"] or {(head_dim, kv_heads)}
        (full_geometry,) = geometry["full_attention"] or {(head_dim, kv_heads)}
        if sliding_geometry != (head_dim, kv_heads):
            raise UsageError(
                f"{source}: per_layer_config overrides sliding layers to {sliding_geometry}; accepted: the "
                f"top-level head_dim / num_key_value_heads {(head_dim, kv_heads)}"
            )
        rope_all = _require(text, "rope_parameters", source)
        if not isinstance(rope_all, dict):
            raise UsageError(f"{source}: rope_parameters must be an object per layer type, got {rope_all!r}")
        present = set(layer_types)
        cap = text.get("final_logit_softcapping")
        tied = d.get("tie_word_embeddings", text.get("tie_word_embeddings", True))  # transformers' Gemma4 default
        if not isinstance(tied, bool):
            raise UsageError(f"{source}: tie_word_embeddings must be true or false, got {tied!r}")
        kwargs = dict(
            vocab_size=_require(text, "vocab_size", source),
            hidden_size=_require(text, "hidden_size", source),
            num_hidden_layers=n,
            num_attention_heads=_require(text, "num_attention_heads", source),
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            global_head_dim=full_geometry[0],
            num_global_key_value_heads=full_geometry[1],
            intermediate_size=_require(text, "intermediate_size", source),
            layer_types=tuple(layer_types),
            sliding_window=_require(text, "sliding_window", source)
            if "sliding_attention" in present
            else text.get("sliding_window") or 1,
            sliding_rope=_rope_tuple(rope_all, "sliding_attention", source)
            if "sliding_attention" in present
            else cls.sliding_rope,
            full_rope=_rope_tuple(rope_all, "full_attention", source) if "full_attention" in present else cls.full_rope,
            hidden_activation=_require(text, "hidden_activation", source),
            final_logit_softcapping=None if cap is None else _number(source, "final_logit_softcapping", cap),
            attention_k_eq_v=k_eq_v,
            rms_norm_eps=_number(source, "rms_norm_eps", _require(text, "rms_norm_eps", source)),
            tie_word_embeddings=tied,
            max_position_embeddings=text.get("max_position_embeddings", 131_072),
        )
        kwargs.update(overrides)
        return cls(**kwargs)
