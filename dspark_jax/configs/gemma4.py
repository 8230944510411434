"""Gemma4DraftGeometry: what a Gemma4-flavour draft adds to the inherited Qwen3-style geometry (spec §4.3, §4.5)."""

from __future__ import annotations

import dataclasses
import json

from dspark_jax.configs._common import _number, _require
from dspark_jax.configs.qwen3 import Qwen3Config
from dspark_jax.errors import UsageError

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
