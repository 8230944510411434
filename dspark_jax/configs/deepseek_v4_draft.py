"""DeepseekV4DraftConfig: the DSpark draft stored under `mtp.0..S-1` of a DeepSeek-V4 -DSpark checkpoint (V4 §4).

The draft has no geometry of its own: every stage is a V4 block of the target's shapes (ratio 0, top-k routing with
bias), so `model` is the target's DeepseekV4Config. The `dspark_*` fields come from the same `config.json` as the
target (V4 §4.1). Every open question of V4 §5 that changes numbers is a field here, defaulting to the listed
default (a port decision), so a later fact flips a switch rather than the code.
"""

from __future__ import annotations

import dataclasses

from dspark_jax.configs._common import _number, _positive, _require
from dspark_jax.configs.deepseek_v4 import DeepseekV4Config
from dspark_jax.errors import UsageError

TAP_POINTS = ("output", "input")  # Q1
STAGE_ROPES = ("main", "compress")  # Q4
CONFIDENCE_INPUTS = ("pre_norm", "post_norm")  # Q5


@dataclasses.dataclass(frozen=True)
class DeepseekV4DraftConfig:
    """A V4 DSpark draft (V4 §4): `len(dspark_layer_ids)` stages (Q7) over the target geometry `model`.

    Port switches (V4 §5; defaults are the listed ones):
      tap_point (Q1): 'output' = g_t from the outputs of blocks `dspark_layer_ids`; 'input' = from their inputs
        (the outputs of blocks id - 1, -1 being the embedding).
      block_causal (Q2): False = every block slot sees all B block rows; True = slot j sees rows <= j.
      context_window (Q3): context rows every slot sees: the last `context_window` committed positions below the
        anchor (None = the target's sliding_window W); 0 = every committed position.
      stage_rope (Q4): 'main' = base rope_theta, no YaRN (the ratio-0 rule); 'compress' = compress_rope_theta + YaRN.
      confidence_input (Q5): 'pre_norm' = hc_head output h~_j; 'post_norm' = after mtp.S-1.norm.
      router_eps (Q10): added to the sum of the k routing weights (transformers 1e-20, official code 0).
    Q6 (STS temperatures 1 until calibrated) lives in the handle's calibration; Q9 (QAT fake-quant) is not
    implemented, i.e. off.
    """

    model: DeepseekV4Config
    block_size: int
    mask_token_id: int
    dspark_layer_ids: tuple[int, ...]
    markov_rank: int
    enable_confidence_head: bool = True
    tap_point: str = "output"
    block_causal: bool = False
    context_window: int | None = None
    stage_rope: str = "main"
    confidence_input: str = "pre_norm"
    router_eps: float = 1e-20

    def __post_init__(self):
        _positive("dspark_block_size", self.block_size)
        _positive("dspark_markov_rank", self.markov_rank)
        vocab, layers = self.model.vocab_size, self.model.num_hidden_layers
        if not self.dspark_layer_ids:
            raise UsageError("dspark_target_layer_ids must name at least one target layer, got []")
        for lid in self.dspark_layer_ids:
            if not isinstance(lid, int) or isinstance(lid, bool) or not (0 <= lid < layers):
                raise UsageError(f"dspark_target_layer_ids entry {lid!r} is out of range: accepted 0..{layers - 1}")
        mask = self.mask_token_id
        if not isinstance(mask, int) or isinstance(mask, bool) or not 0 <= mask < vocab:
            raise UsageError(f"dspark_noise_token_id must be in [0, {vocab}), got {mask!r}")
        for name, value, accepted in (
            ("tap_point", self.tap_point, TAP_POINTS),
            ("stage_rope", self.stage_rope, STAGE_ROPES),
            ("confidence_input", self.confidence_input, CONFIDENCE_INPUTS),
        ):
            if value not in accepted:
                raise UsageError(f"{name} must be one of {accepted}, got {value!r}")
        if self.context_window is not None and (
            not isinstance(self.context_window, int) or isinstance(self.context_window, bool) or self.context_window < 0
        ):
            raise UsageError(f"context_window must be a non-negative integer or null, got {self.context_window!r}")
        if not (0 <= self.router_eps < 1):
            raise UsageError(f"router_eps must be in [0, 1), got {self.router_eps!r}")

    # --------------------------------------------------------------------------- what the decode loop reads
    @property
    def num_stages(self) -> int:
        return len(self.dspark_layer_ids)

    @property
    def target_layer_ids(self) -> tuple[int, ...]:
        """The target taps the loop captures (DeepseekV4's tap ids: block outputs, -1 = the embedding)."""
        if self.tap_point == "output":
            return tuple(self.dspark_layer_ids)
        return tuple(lid - 1 for lid in self.dspark_layer_ids)

    @property
    def num_taps(self) -> int:
        return self.num_stages

    @property
    def num_target_layers(self) -> int:
        return self.model.num_hidden_layers

    @property
    def window(self) -> int:
        """Context rows a slot sees (0 = all committed positions)."""
        return self.model.sliding_window if self.context_window is None else self.context_window

    use_markov = True
    markov_head_type = "vanilla"
    confidence_head_with_markov = True
    gemma4 = None
    flavour = "deepseek_v4"

    def with_dtype(self, dtype: str) -> "DeepseekV4DraftConfig":
        return dataclasses.replace(self, model=self.model.with_dtype(dtype))

    def check_target(self, target) -> None:
        """Raise a one-line UsageError when `target` is not the V4 model this draft was built over."""
        if not isinstance(target, DeepseekV4Config):
            raise UsageError(
                f"this is a DeepSeek-V4 draft but the target is a {type(target).__name__}: the draft belongs to a "
                "DeepSeek-V4 target"
            )
        mine = dataclasses.replace(self.model, dtype=target.dtype, param_dtype=target.param_dtype)
        mine = dataclasses.replace(mine, moe_impl=target.moe_impl)
        for f in dataclasses.fields(mine):
            if getattr(mine, f.name) != getattr(target, f.name):
                raise UsageError(
                    f"draft {f.name} is {getattr(mine, f.name)!r} but the target's is {getattr(target, f.name)!r}: "
                    "this draft belongs to another target"
                )

    # ------------------------------------------------------------------------------------------ config.json
    @staticmethod
    def has_draft_fields(d: dict) -> bool:
        """Whether a V4 `config.json` describes a -DSpark checkpoint (V4 §4.1)."""
        return "dspark_target_layer_ids" in d

    @classmethod
    def from_hf_dict(
        cls, d: dict, source: str = "config.json", *, model: DeepseekV4Config | None = None, **switches
    ) -> "DeepseekV4DraftConfig":
        """From a V4 -DSpark `config.json` (V4 §4.1); `switches` set the V4 §5 port decisions."""
        model = model if model is not None else DeepseekV4Config.from_hf_dict(d, source)
        ids = _require(d, "dspark_target_layer_ids", source)
        if not isinstance(ids, list):
            raise UsageError(f"{source}: dspark_target_layer_ids must be a list of ints, got {ids!r}")
        ratios = d.get("compress_ratios")
        if isinstance(ratios, list) and len(ratios) >= model.num_hidden_layers + len(ids):
            stage = ratios[model.num_hidden_layers : model.num_hidden_layers + len(ids)]
            if any(r != 0 for r in stage):  # V4 §4.1: the stages are SWA-only
                raise UsageError(f"{source}: compress_ratios of the draft stages must be 0, got {stage}")
        eps = switches.pop("router_eps", 1e-20)
        return cls(
            model=model,
            block_size=_require(d, "dspark_block_size", source),
            mask_token_id=_require(d, "dspark_noise_token_id", source),
            dspark_layer_ids=tuple(ids),
            markov_rank=_require(d, "dspark_markov_rank", source),
            router_eps=_number(source, "router_eps", eps),
            **switches,
        )

    def to_hf_fields(self) -> dict:
        """The `dspark_*` fields of the shared `config.json`."""
        return {
            "dspark_block_size": self.block_size,
            "dspark_noise_token_id": self.mask_token_id,
            "dspark_target_layer_ids": list(self.dspark_layer_ids),
            "dspark_markov_rank": self.markov_rank,
        }
