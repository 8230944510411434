"""DeepseekV4Config: geometry and numerics of a DeepSeek-V4 target (V4 §1.2), from either `config.json` dialect.

Two dialects carry the same facts (V4 §1.2): the *native* one the checkpoints ship (`compress_ratios`,
`num_hash_layers`, `qk_rope_head_dim`, `rope_theta` / `compress_rope_theta` / `rope_scaling`) and the *folded* one
transformers' `save_pretrained` writes (`layer_types`, `mlp_layer_types`, `compress_rates`, `partial_rotary_factor`,
`rope_parameters{main, compress}`). Both become the same frozen config; so does the official `inference/config.json`
(`dim`, `n_layers`, ... renamed by OFFICIAL_NAMES).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dspark_jax.configs._common import DTYPES, _number, _positive, _require
from dspark_jax.errors import UsageError

# compress ratio m -> transformers layer type (V4 §2.2); c = 2 overlapping windows for m = 4 (CSA), else 1.
LAYER_TYPES = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
V4_SCORE_FUNCS = ("sqrtsoftplus", "softmax")
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow")


@dataclasses.dataclass(frozen=True)
class DeepseekV4Config:
    """A DeepSeek-V4 target (V4 §1.2, §2). Field names follow the native `config.json`.

    `compress_ratios` has one entry per target layer (0 SWA, 4 CSA, 128 HCA); layers below `num_hash_layers` route
    by `tid2eid`. `rope_scaling` is the YaRN of ratio>0 layers as sorted (key, value) pairs (None = no YaRN).
    `dtype` is the compute dtype, `param_dtype` the storage dtype (mHC, sinks, ape and router bias stay f32).
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    compress_ratios: tuple[int, ...]
    num_hash_layers: int
    index_n_heads: int
    index_head_dim: int
    index_topk: int
    n_routed_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.0
    swiglu_limit: float | None = None
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 1048576
    tie_word_embeddings: bool = False
    num_key_value_heads: int = 1
    moe_impl: str = "auto"
    dtype: str = "bfloat16"
    param_dtype: str = "bfloat16"

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "head_dim",
            "qk_rope_head_dim",
            "q_lora_rank",
            "o_groups",
            "o_lora_rank",
            "sliding_window",
            "index_n_heads",
            "index_head_dim",
            "index_topk",
            "n_routed_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "hc_mult",
            "hc_sinkhorn_iters",
            "max_position_embeddings",
        ):
            _positive(name, getattr(self, name))
        if self.num_key_value_heads != 1:
            raise UsageError(
                f"num_key_value_heads must be 1 (one shared K=V vector, V4 §2.5), got {self.num_key_value_heads}"
            )
        if len(self.compress_ratios) != self.num_hidden_layers:
            raise UsageError(
                f"compress_ratios needs one entry per layer ({self.num_hidden_layers}), got {len(self.compress_ratios)}"
            )
        bad = [r for r in self.compress_ratios if r not in LAYER_TYPES]
        if bad:
            raise UsageError(f"compress_ratios entries must be one of {sorted(LAYER_TYPES)}, got {bad[0]!r}")
        if not isinstance(self.num_hash_layers, int) or not 0 <= self.num_hash_layers <= self.num_hidden_layers:
            raise UsageError(f"num_hash_layers must be in [0, {self.num_hidden_layers}], got {self.num_hash_layers!r}")
        rd = self.qk_rope_head_dim
        if rd % 2 or rd > self.head_dim or rd > self.index_head_dim:
            raise UsageError(
                f"qk_rope_head_dim must be even and at most head_dim ({self.head_dim}) and index_head_dim "
                f"({self.index_head_dim}), got {rd}"
            )
        if self.num_attention_heads % self.o_groups:
            raise UsageError(
                f"o_groups must divide num_attention_heads ({self.num_attention_heads}), got {self.o_groups}"
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            raise UsageError(
                f"num_experts_per_tok must be <= n_routed_experts ({self.n_routed_experts}), got "
                f"{self.num_experts_per_tok}"
            )
        if self.scoring_func not in V4_SCORE_FUNCS:
            raise UsageError(f"scoring_func must be one of {V4_SCORE_FUNCS}, got {self.scoring_func!r}")
        for name in ("rope_theta", "compress_rope_theta"):
            if not (getattr(self, name) > 0):
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not (0 < self.rms_norm_eps < 1) or not (0 < self.hc_eps < 1):
            raise UsageError(f"rms_norm_eps and hc_eps must be in (0, 1), got {self.rms_norm_eps}, {self.hc_eps}")
        if self.swiglu_limit is not None and not (self.swiglu_limit > 0):
            raise UsageError(f"swiglu_limit must be > 0 or null, got {self.swiglu_limit!r}")
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            missing = [k for k in ("factor", "original_max_position_embeddings") if k not in scaling]
            if missing:
                raise UsageError(f"yarn rope_scaling needs {missing[0]!r}, got {scaling}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UsageError(f"{name} must be one of {DTYPES}, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------ derived
    @property
    def layer_types(self) -> tuple[str, ...]:
        """transformers' names of the attention types, one per layer."""
        return tuple(LAYER_TYPES[r] for r in self.compress_ratios)

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads  # one KV head serves every query head

    def is_hash_layer(self, layer: int) -> bool:
        return layer < self.num_hash_layers

    def with_dtype(self, dtype: str) -> "DeepseekV4Config":
        """The same config computing (and storing) in `dtype`."""
        return dataclasses.replace(self, dtype=dtype, param_dtype=dtype)

    # ------------------------------------------------------------------ config.json
    @staticmethod
    def is_hf_dict(d: dict) -> bool:
        """Whether a `config.json` dict describes a DeepSeek-V4 target (either dialect)."""
        return d.get("model_type") == "deepseek_v4" or (d.get("architectures") or [""])[0] == "DeepseekV4ForCausalLM"

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", **overrides) -> "DeepseekV4Config":
        """Build from a native (`compress_ratios`, ...) or folded (`layer_types`, ...) DeepSeek-V4 `config.json`."""
        if "dim" in d and "n_layers" in d and "hidden_size" not in d:
            d = _from_official(d)
        layers = _require(d, "num_hidden_layers", source)
        _positive(f"{source}: num_hidden_layers", layers)
        head_dim = _require(d, "head_dim", source)
        if "layer_types" in d:
            ratios, hash_layers, rope_dim, theta, ctheta, scaling = _folded_fields(d, source, layers, head_dim)
        elif "compress_ratios" in d:
            ratios, hash_layers, rope_dim, theta, ctheta, scaling = _native_fields(d, source, layers)
        else:
            raise UsageError(
                f"{source}: missing field 'compress_ratios' (native config) or 'layer_types' (save_pretrained config)"
            )
        if d.get("attention_bias"):
            raise UsageError(f"{source}: attention_bias=true is not supported for DeepSeek-V4 (accepted: false)")
        if d.get("hidden_act", "silu") != "silu":
            raise UsageError(f"{source}: hidden_act must be 'silu', got {d.get('hidden_act')!r}")
        tied = d.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise UsageError(f"{source}: tie_word_embeddings must be true or false, got {tied!r}")
        limit = d.get("swiglu_limit")
        kwargs = dict(
            vocab_size=_require(d, "vocab_size", source),
            hidden_size=_require(d, "hidden_size", source),
            num_hidden_layers=layers,
            num_attention_heads=_require(d, "num_attention_heads", source),
            num_key_value_heads=d.get("num_key_value_heads", 1),
            head_dim=head_dim,
            qk_rope_head_dim=rope_dim,
            q_lora_rank=_require(d, "q_lora_rank", source),
            o_groups=_require(d, "o_groups", source),
            o_lora_rank=_require(d, "o_lora_rank", source),
            sliding_window=_require(d, "sliding_window", source),
            compress_ratios=ratios,
            num_hash_layers=hash_layers,
            index_n_heads=_require(d, "index_n_heads", source),
            index_head_dim=_require(d, "index_head_dim", source),
            index_topk=_require(d, "index_topk", source),
            n_routed_experts=_require(d, "n_routed_experts", source),
            num_experts_per_tok=_require(d, "num_experts_per_tok", source),
            moe_intermediate_size=_require(d, "moe_intermediate_size", source),
            rope_theta=theta,
            compress_rope_theta=ctheta,
            rope_scaling=scaling,
            scoring_func=d.get("scoring_func", "sqrtsoftplus"),
            routed_scaling_factor=_number(source, "routed_scaling_factor", d.get("routed_scaling_factor", 1.0)),
            swiglu_limit=None if limit is None else _number(source, "swiglu_limit", limit),
            hc_mult=d.get("hc_mult", 4),
            hc_sinkhorn_iters=d.get("hc_sinkhorn_iters", 20),
            hc_eps=_number(source, "hc_eps", d.get("hc_eps", 1e-6)),
            rms_norm_eps=_number(source, "rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=d.get("max_position_embeddings", 1048576),
            tie_word_embeddings=tied,
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict:
        """The native dialect (what the checkpoints ship; transformers folds it on load)."""
        d = {
            "architectures": ["DeepseekV4ForCausalLM"],
            "model_type": "deepseek_v4",
            "torch_dtype": self.param_dtype,
            "compress_ratios": list(self.compress_ratios),
            "rope_scaling": None if self.rope_scaling is None else {"type": "yarn", **dict(self.rope_scaling)},
        }
        for f in dataclasses.fields(self):
            if f.name not in ("compress_ratios", "rope_scaling", "moe_impl", "dtype", "param_dtype"):
                d[f.name] = getattr(self, f.name)
        return d


# The official `inference/config.json` spells the native fields differently (V4 §1.2); RoPE scaling is flat.
OFFICIAL_NAMES = {
    "dim": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "moe_inter_dim": "moe_intermediate_size",
    "n_activated_experts": "num_experts_per_tok",
    "n_hash_layers": "num_hash_layers",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "rope_head_dim": "qk_rope_head_dim",
    "window_size": "sliding_window",
    "norm_eps": "rms_norm_eps",
}


def _from_official(d: dict) -> dict:
    """The official inference dialect renamed to the native one (YaRN from rope_factor / original_seq_len)."""
    out = {OFFICIAL_NAMES.get(k, k): v for k, v in d.items()}
    if "rope_factor" in d:
        out["rope_scaling"] = {
            "type": "yarn",
            "factor": d["rope_factor"],
            "original_max_position_embeddings": d.get("original_seq_len"),
            "beta_fast": d.get("beta_fast", 32),
            "beta_slow": d.get("beta_slow", 1),
        }
    return out


def _native_fields(d: dict, source: str, layers: int):
    ratios = _require(d, "compress_ratios", source)
    if not isinstance(ratios, list) or len(ratios) < layers:
        raise UsageError(f"{source}: compress_ratios must be a list of at least {layers} ints, got {ratios!r}")
    # The trailing entries belong to the MTP / DSpark stages (V4 §1.2 (a)); the target takes the first `layers`.
    ratios = tuple(ratios[:layers])
    hash_layers = _require(d, "num_hash_layers", source)
    rope_dim = _require(d, "qk_rope_head_dim", source)
    theta = _number(source, "rope_theta", _require(d, "rope_theta", source))
    ctheta = _number(source, "compress_rope_theta", _require(d, "compress_rope_theta", source))
    return ratios, hash_layers, rope_dim, theta, ctheta, _yarn(d.get("rope_scaling"), source, "rope_scaling")


def _folded_fields(d: dict, source: str, layers: int, head_dim: Any):
    types = d["layer_types"]
    rates = d.get("compress_rates") or {
        "compressed_sparse_attention": 4,
        "heavily_compressed_attention": 128,
    }
    if not isinstance(types, list) or len(types) < layers:
        raise UsageError(f"{source}: layer_types must be a list of at least {layers} names, got {types!r}")
    by_name = {"sliding_attention": 0, **{k: v for k, v in rates.items() if isinstance(rates, dict)}}
    unknown = [t for t in types[:layers] if t not in by_name]
    if unknown:
        raise UsageError(f"{source}: layer_types entry {unknown[0]!r} is not one of {sorted(by_name)}")
    ratios = tuple(by_name[t] for t in types[:layers])
    mlp = _require(d, "mlp_layer_types", source)
    if not isinstance(mlp, list) or any(t not in ("hash_moe", "moe") for t in mlp):
        raise UsageError(f"{source}: mlp_layer_types entries must be 'hash_moe' or 'moe', got {mlp!r}")
    hash_layers = sum(1 for t in mlp[:layers] if t == "hash_moe")
    if mlp[:hash_layers] != ["hash_moe"] * hash_layers:
        raise UsageError(f"{source}: mlp_layer_types must list every 'hash_moe' layer before the 'moe' ones, got {mlp}")
    rope = _require(d, "rope_parameters", source)
    main, compress = (rope.get(k) if isinstance(rope, dict) else None for k in ("main", "compress"))
    if not isinstance(main, dict) or not isinstance(compress, dict):
        raise UsageError(f"{source}: rope_parameters must hold 'main' and 'compress' objects, got {rope!r}")
    main_type = main.get("rope_type", main.get("type", "default"))
    if main_type != "default":
        raise UsageError(f"{source}: rope_parameters.main.rope_type must be 'default' (V4 §2.4), got {main_type!r}")
    factor = main.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    if factor is None:
        rope_dim = _require(d, "qk_rope_head_dim", source)
    else:
        rope_dim = round(_number(source, "partial_rotary_factor", factor) * head_dim)
    theta = _number(source, "rope_parameters.main.rope_theta", _require(main, "rope_theta", source + " rope.main"))
    ctheta = _number(
        source, "rope_parameters.compress.rope_theta", _require(compress, "rope_theta", source + " rope.compress")
    )
    kind = compress.get("rope_type", compress.get("type", "default"))
    if kind == "default":
        return ratios, hash_layers, rope_dim, theta, ctheta, None
    return ratios, hash_layers, rope_dim, theta, ctheta, _yarn(compress, source, "rope_parameters.compress")


def _yarn(scaling: Any, source: str, field: str) -> tuple[tuple[str, Any], ...] | None:
    """The YaRN parameters of ratio>0 layers as sorted pairs; None when absent."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise UsageError(f"{source}: {field} must be an object or null, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "yarn":
        raise UsageError(f"{source}: {field} type must be 'yarn' (V4 §2.4), got {kind!r}")
    # V4 never scales cos/sin (transformers forces attention_factor 1.0); a config asking for more is not V4.
    for key in ("attention_factor", "mscale", "mscale_all_dim"):
        value = scaling.get(key)
        if value not in (None, 1, 1.0) and not (key == "mscale_all_dim" and value == 0):
            raise UsageError(f"{source}: {field}.{key} must be 1.0 or absent (V4 §2.4), got {value!r}")
    if scaling.get("truncate", True) is not True:
        raise UsageError(f"{source}: {field}.truncate must be true or absent, got {scaling['truncate']!r}")
    out = {}
    for key in YARN_KEYS:
        if key in scaling and scaling[key] is not None:
            out[key] = _number(source, f"{field}.{key}", scaling[key])
    out.setdefault("beta_fast", 32.0)
    out.setdefault("beta_slow", 1.0)
    if "factor" not in out or "original_max_position_embeddings" not in out:
        raise UsageError(f"{source}: {field} needs 'factor' and 'original_max_position_embeddings', got {scaling}")
    return tuple(sorted(out.items()))
