"""DraftConfig: a DSpark / DFlash draft over its target's geometry (spec §3, §5.1), to and from `config.json`."""

from __future__ import annotations

import dataclasses

from dspark_jax.configs._common import _positive, _require
from dspark_jax.configs.gemma4 import Gemma4Config, Gemma4DraftGeometry
from dspark_jax.configs.qwen3 import Qwen3Config
from dspark_jax.errors import UsageError

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """A DSpark / DFlash draft (spec §3, §5.1): its own layer stack over the target's geometry.

    `model` holds the inherited geometry with `num_hidden_layers` = draft layers; `tied_head`: the LM head is the
    target's embedding table (see the field).
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
    # The target ties its LM head to its embedding, and the draft's frozen head copy (spec §5.3) is that table as it
    # stands, [vocab, hidden], not a transposed copy (0.78 GB in bf16 at Qwen3-4B). Set by loading.load_draft from
    # the target; not a config.json field.
    tied_head: bool = False

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

    def check_target(self, target: Qwen3Config | Gemma4Config) -> None:
        """Raise a one-line UsageError when this draft cannot run against `target` (spec §3.2)."""
        gemma4_target = isinstance(target, Gemma4Config)
        if gemma4_target != (self.gemma4 is not None):
            raise UsageError(
                f"this is a {self.flavour}-flavour draft but the target is a {'Gemma4' if gemma4_target else 'Qwen3'} "
                "model: this draft belongs to another target family"
            )
        # A Gemma4 draft inherits the full-attention layers' head dim / KV heads (spec §4.5).
        head_dim, kv_heads = target.draft_geometry if gemma4_target else (target.head_dim, target.num_key_value_heads)
        pairs = [
            ("hidden_size", self.model.hidden_size, target.hidden_size),
            ("vocab_size", self.model.vocab_size, target.vocab_size),
            ("num_target_layers", self.num_target_layers, target.num_hidden_layers),
            # The draft inherits the target's attention geometry (spec §3.2); a mismatch means another target.
            ("num_attention_heads", self.model.num_attention_heads, target.num_attention_heads),
            ("num_key_value_heads", self.model.num_key_value_heads, kv_heads),
            ("head_dim", self.model.head_dim, head_dim),
        ]
        for name, mine, theirs in pairs:
            if mine != theirs:
                raise UsageError(
                    f"draft {name} is {mine} but the target's is {theirs}: this draft belongs to another target"
                )
