"""Qwen3MoeConfig: a Qwen3 stack whose FFNs are routed experts (softmax top-k), to and from the HF `config.json`."""

from __future__ import annotations

import dataclasses

from dspark_jax.configs._common import _require
from dspark_jax.configs.qwen3 import Qwen3Config
from dspark_jax.errors import UsageError

# The dispatch variants of layers/moe.py (configs may not import layers; a test keeps the two lists equal).
MOE_IMPLS = ("auto", "blocked", "ragged", "gather", "dense")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qwen3MoeConfig(Qwen3Config):
    """Qwen3MoeForCausalLM geometry: the Qwen3 fields plus the expert ones.

    A layer i is MoE when i is not in `mlp_only_layers` and (i + 1) % decoder_sparse_step == 0; other layers are
    dense MLPs of width `intermediate_size`. Experts have width `moe_intermediate_size`; each token takes the
    `num_experts_per_tok` best softmax scores, renormalised to sum 1 when `norm_topk_prob`. `moe_impl` picks the
    dispatch variant (layers/moe.py), a runtime choice that is not part of the checkpoint.
    """

    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    moe_impl: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        if self.num_experts_per_tok > self.num_experts:
            raise UsageError(
                f"num_experts_per_tok must be <= num_experts ({self.num_experts}), got {self.num_experts_per_tok}"
            )
        if not isinstance(self.norm_topk_prob, bool):
            raise UsageError(f"norm_topk_prob must be true or false, got {self.norm_topk_prob!r}")
        bad = [i for i in self.mlp_only_layers if isinstance(i, bool) or not isinstance(i, int)]
        bad += [i for i in self.mlp_only_layers if isinstance(i, int) and not 0 <= i < self.num_hidden_layers]
        if bad or len(set(self.mlp_only_layers)) != len(self.mlp_only_layers):
            raise UsageError(
                f"mlp_only_layers must list distinct layer indices in [0, {self.num_hidden_layers}), "
                f"got {list(self.mlp_only_layers)}"
            )
        if self.moe_impl not in MOE_IMPLS:
            raise UsageError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe_impl!r}")

    def is_moe_layer(self, i: int) -> bool:
        return i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0

    def dense(self) -> Qwen3Config:
        """The same geometry as a dense Qwen3Config (what a draft for this target inherits: its layers are dense)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Qwen3Config)}
        return Qwen3Config(**fields)

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json", **overrides) -> "Qwen3MoeConfig":
        """Build from a transformers Qwen3-MoE `config.json` dict (`num_experts`, or `num_local_experts` as
        transformers 5 writes it)."""
        experts = d.get("num_experts", d.get("num_local_experts"))
        if "num_experts" in d and "num_local_experts" in d and d["num_experts"] != d["num_local_experts"]:
            raise UsageError(
                f"{source}: num_experts ({d['num_experts']}) and num_local_experts ({d['num_local_experts']}) differ"
            )
        if experts is None:
            raise UsageError(f"{source}: missing field 'num_experts'")
        only = d.get("mlp_only_layers") or []
        if not isinstance(only, list):
            raise UsageError(f"{source}: mlp_only_layers must be a list of layer indices, got {only!r}")
        norm = d.get("norm_topk_prob", False)
        if not isinstance(norm, bool):
            raise UsageError(f"{source}: norm_topk_prob must be true or false, got {norm!r}")
        moe = dict(
            num_experts=experts,
            num_experts_per_tok=_require(d, "num_experts_per_tok", source),
            moe_intermediate_size=_require(d, "moe_intermediate_size", source),
            norm_topk_prob=norm,
            decoder_sparse_step=d.get("decoder_sparse_step", 1),
            mlp_only_layers=tuple(only),
        )
        return super().from_hf_dict(d, source, **{**moe, **overrides})

    def to_hf_dict(self) -> dict:
        """The transformers `Qwen3MoeConfig` fields for export."""
        d = super().to_hf_dict()
        d.update(
            architectures=["Qwen3MoeForCausalLM"],
            model_type="qwen3_moe",
            num_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size,
            norm_topk_prob=self.norm_topk_prob,
            decoder_sparse_step=self.decoder_sparse_step,
            mlp_only_layers=list(self.mlp_only_layers),
        )
        return d
