"""Public loading API: targets and drafts from safetensors folders, orbax folders or hub ids, as ready-to-run handles.

Thin on purpose: hub ids resolve in dspark_jax.hub, params are read by conversion.loader, calibration.json by
dspark_jax.checkpoints; this module binds them into `Target` / `DraftHandle`. `resolve`, `checkpoint_kind`,
`convert_checkpoint` and `HUB_PATTERNS` are re-exported for existing callers.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conversion.engine import check_bound_copy
from conversion.loader import (
    abstract_model,
    check_dtype,
    checkpoint_kind,
    convert_checkpoint,
    load_params,
    refuse_legacy_mtp,
    v4_draft_keys,
)
from dspark_jax.checkpoints import is_orbax_checkpoint, load_calibration
from dspark_jax.configs import (
    DeepseekV4Config,
    DeepseekV4DraftConfig,
    DraftConfig,
    Gemma4Config,
    Qwen3Config,
    Qwen3MoeConfig,
    read_config_json,
)
from dspark_jax.decoding.calibration import load_rank_factors
from dspark_jax.errors import DSparkError, UsageError
from dspark_jax.hub import HUB_PATTERNS, resolve
from dspark_jax.layers.attention import Attention
from dspark_jax.layers.mlp import MLP
from dspark_jax.models import DeepseekV4, DeepseekV4Draft, Draft, Gemma4, Qwen3, Qwen3Moe
from dspark_jax.sharding import make_mesh
from dspark_jax.tokenizer import Tokenizer, stop_token_ids


@functools.partial(jax.jit, static_argnames=("graphdef", "tap_layer_ids"))
def _forward(graphdef, state, tokens, tap_layer_ids):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, taps, _ = model(tokens, positions, tap_layer_ids=tap_layer_ids)
    return model.logits(hidden), None if taps is None else taps.astype(jnp.float32)


def _decode_copy(graphdef: nnx.GraphDef, state: nnx.State, mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) for the decode loop. On CPU without a mesh: a copy whose Qwen3-style MLP and attention
    kernels, LM head (and a DSpark draft's fc and LM head) are out-major, the layout in which XLA:CPU multiplies a
    verify pass's few rows at the weights' streaming bandwidth (layers/linear.py: 2-3x faster at 8 rows), and in
    bf16 where that is exact (`compact`: a bf16 checkpoint run in f32); it holds those kernels a second time.
    Elsewhere (and for other layers: Gemma4's, the MoE experts) the model as loaded."""
    if mesh is not None or jax.default_backend() != "cpu":
        return graphdef, state
    return out_major_parts(graphdef, state)


def out_major_parts(graphdef: nnx.GraphDef, state: nnx.State) -> tuple[nnx.GraphDef, nnx.State]:
    """A copy of the model whose Qwen3-style MLP and attention kernels, LM head (and a DSpark draft's fc and LM head)
    are out-major (compact where exact); the model itself when it has none of those modules."""
    model = nnx.merge(graphdef, state, copy=True)  # new Variables: the loaded state keeps its kernels
    changed = False
    for _, m in nnx.iter_modules(model):
        if type(m) in (MLP, Attention, Draft, Qwen3):  # exactly these: subclasses read kernels in their own methods
            m.to_out_major()
            changed = True
    return nnx.split(model) if changed else (graphdef, state)


def _share_target_tables(draft_state: nnx.State, target: Target) -> None:
    """Point a draft decode copy's frozen embedding and out-major LM head at the target decode copy's arrays, in
    place. They hold the same numbers (the draft's are bound to the target's, spec §5.3, and `compact` is exact), but
    each decode copy made its own head: a second vocab x hidden table (0.78 GB in bf16 at Qwen3-4B) that every
    round streamed beside the target's. A target whose copy keeps an in-major head keeps the draft's own head."""
    graphdef, state = target.decode_parts()
    draft_state["embed_tokens"].value = state["embed_tokens"][...]
    if target.config.tie_word_embeddings:  # the embedding is the head, out-major as declared
        draft_state["lm_head"].value = state["embed_tokens"][...]
    elif getattr(nnx.merge(graphdef, state), "out_major", False):
        draft_state["lm_head"].value = state["lm_head"][...]


@dataclasses.dataclass
class Target:
    """A loaded target: config, the split model (graphdef + state), tokenizer and stop ids."""

    config: Qwen3Config
    graphdef: nnx.GraphDef
    state: nnx.State
    path: str
    tokenizer: Tokenizer | None = None
    stop_token_ids: tuple[int, ...] = ()
    mesh: jax.sharding.Mesh | None = None
    _decode: tuple | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def module(self) -> Qwen3:
        return nnx.merge(self.graphdef, self.state)

    def decode_parts(self) -> tuple[nnx.GraphDef, nnx.State]:
        """(graphdef, state) the decode loop runs: the CPU decode copy (`_decode_copy`), made once."""
        if self._decode is None:
            self._decode = _decode_copy(self.graphdef, self.state, self.mesh)
        return self._decode

    def forward(self, tokens, tap_layer_ids: tuple[int, ...] = ()):
        """Full causal forward of tokens i32[batch, seq] -> (f32[batch, seq, vocab], f32[batch, seq, taps*hidden])."""
        return _forward(self.graphdef, self.state, jnp.asarray(tokens, jnp.int32), tuple(tap_layer_ids))


@dataclasses.dataclass
class DraftHandle:
    """A loaded DSpark / DFlash draft bound to its target. `calibration`: per-slot confidence temperatures f32[B]
    from the folder's calibration.json (spec §10), or None (uncalibrated); `rank_factors`: the tree builder's
    measured per-rank factors f32[B, K] from the same file (trees §3), or None (the 0.5^r fallback)."""

    config: DraftConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    path: str
    calibration: np.ndarray | None = None
    rank_factors: np.ndarray | None = None
    mesh: jax.sharding.Mesh | None = None
    target: Target | None = dataclasses.field(default=None, repr=False, compare=False)  # the target it is bound to
    _decode: tuple | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def module(self) -> Draft:
        return nnx.merge(self.graphdef, self.state)

    def decode_parts(self) -> tuple[nnx.GraphDef, nnx.State]:
        """(graphdef, state) the decode loop runs: the CPU decode copy (`_decode_copy`), made once, holding the
        target decode copy's embedding and LM head (`_share_target_tables`)."""
        if self._decode is None:
            graphdef, state = _decode_copy(self.graphdef, self.state, self.mesh)
            if state is not self.state and self.target is not None:
                _share_target_tables(state, self.target)
            self._decode = graphdef, state
        return self._decode

    def propose(
        self,
        taps,
        anchor,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        key=None,
        cache=None,
        anchor_position=None,
    ):
        """Research API: one block from context features (see decoding.propose.propose_from_features).

        Returns (Proposal, cache): tokens i32[batch, slots], base_logits / logits f32[batch, slots, vocab],
        confidence_logits f32[batch, slots], hidden [batch, slots, hidden]; pass the cache back to continue.
        """
        from dspark_jax.decoding.propose import propose_from_features

        return propose_from_features(
            self,
            taps,
            anchor,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            key=key,
            cache=cache,
            anchor_position=anchor_position,
        )


def load_target(path_or_id: str, dtype: str = "bfloat16", mesh: jax.sharding.Mesh | None = None) -> Target:
    """Load a Qwen3, Qwen3-MoE or Gemma4 target from a safetensors folder, an orbax folder (from conversion.convert)
    or a hub id. `mesh`: a jax Mesh over ('data', 'model', 'expert') or its CLI form, e.g. "model=2"."""
    if isinstance(mesh, str):
        mesh = make_mesh(mesh)
    folder = resolve(path_or_id)
    raw = read_config_json(folder)
    kind = checkpoint_kind(raw, os.path.join(folder, "config.json"))
    if kind == "gemma4":  # Gemma4ForCausalLM, or the language model of Gemma4ForConditionalGeneration
        config = Gemma4Config.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(check_dtype(dtype))
        graphdef, state = load_params(folder, kind, Gemma4, config, mesh, path_or_id)
        eos_config = raw if "eos_token_id" in raw else raw.get("text_config") or raw  # multimodal: in text_config
        stops = stop_token_ids(folder, eos_config)
        return Target(config, graphdef, state, folder, Tokenizer.maybe_load(folder), stops, mesh)
    if kind == "qwen3_moe":  # the MoE layers dispatch over `mesh` in shard_map, so the model holds it (static)
        config = Qwen3MoeConfig.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(check_dtype(dtype))
        graphdef, state = load_params(folder, kind, functools.partial(Qwen3Moe, mesh=mesh), config, mesh, path_or_id)
        return Target(config, graphdef, state, folder, Tokenizer.maybe_load(folder), stop_token_ids(folder, raw), mesh)
    if kind == "deepseek_v4":  # either config dialect (V4 §1.2); the MoE dispatches over `mesh` like Qwen3-MoE
        config = DeepseekV4Config.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(check_dtype(dtype))
        graphdef, state = load_params(folder, kind, functools.partial(DeepseekV4, mesh=mesh), config, mesh, path_or_id)
        return Target(config, graphdef, state, folder, Tokenizer.maybe_load(folder), stop_token_ids(folder, raw), mesh)
    if kind != "qwen3":
        raise UsageError(f"{path_or_id!r} is a {kind} draft, not a target; pass it as the draft")
    config = Qwen3Config.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(check_dtype(dtype))
    graphdef, state = load_params(folder, kind, Qwen3, config, mesh, path_or_id)
    return Target(config, graphdef, state, folder, Tokenizer.maybe_load(folder), stop_token_ids(folder, raw), mesh)


def _check_is_target(target) -> None:
    if not isinstance(target, Target):
        raise UsageError(f"load_draft needs target=, the model dj.load_target returned; got {type(target).__name__}")


def load_draft(path_or_id: str, target: Target, v4_options: dict | None = None) -> DraftHandle:
    """Load a DSpark / DFlash draft for `target`; its frozen embedding / LM-head copies are bound to the target's
    arrays (and must equal them when the checkpoint also stores them).

    A DeepSeek-V4 -DSpark folder gives its own draft (mtp.*, V4 §4); `v4_options` then sets the V4 §5 port
    switches of DeepseekV4DraftConfig (tap_point, block_causal, context_window, stage_rope, confidence_input,
    router_eps), each defaulting to the listed default.
    """
    folder = resolve(path_or_id)
    raw = read_config_json(folder)
    kind = checkpoint_kind(raw, os.path.join(folder, "config.json"))
    if kind == "deepseek_v4":  # a -DSpark folder: the draft is mtp.* of the target's own files (V4 §4.2)
        refuse_legacy_mtp(folder, path_or_id)
        _check_is_target(target)
        return _load_v4_draft(folder, raw, path_or_id, target, v4_options or {})
    if kind in ("qwen3", "qwen3_moe", "gemma4"):
        raise UsageError(f"{path_or_id!r} is a target model, not a DSpark/DFlash draft")
    if kind.endswith("_gemma4") and not isinstance(getattr(target, "config", None), Gemma4Config):
        raise UsageError(
            f"{path_or_id!r} is a Gemma4 draft; its target must be a Gemma4 model from load_target, got "
            f"{type(getattr(target, 'config', target)).__name__} (load_gemma4_draft loads the draft alone)"
        )
    _check_is_target(target)
    config = DraftConfig.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(target.config.param_dtype)
    if target.config.dtype != target.config.param_dtype:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=target.config.dtype))
    config.check_target(target.config)
    t = target.state
    # A tied target's embedding is bound as the draft's head too, as it stands: no transposed copy (0.78 GB in bf16
    # at Qwen3-4B).
    tied = target.config.tie_word_embeddings
    bound = {("embed_tokens",): t["embed_tokens"][...], ("lm_head",): t["embed_tokens" if tied else "lm_head"][...]}
    bound_config = dataclasses.replace(config, tied_head=tied)
    if is_orbax_checkpoint(folder):  # conversion.convert had no target to bind: the folder holds its own copies
        # restored to the host, compared, dropped: they never take device memory beside the target's
        _, state = load_params(folder, kind, Draft, config, target.mesh, path_or_id, host=tuple(bound))
        graphdef, state = _bind_restored_copies(state, bound_config, bound, path_or_id)
    else:
        graphdef, state = load_params(folder, kind, Draft, bound_config, target.mesh, path_or_id, bound=bound)
    config = bound_config
    calibration = load_calibration(folder, config.block_size) if config.enable_confidence_head else None
    factors = load_rank_factors(folder, config.block_size)
    return DraftHandle(config, graphdef, state, folder, calibration, factors, target.mesh, target)


def _bind_restored_copies(state: nnx.State, config: DraftConfig, bound: dict, source: str):
    """(graphdef, state) of a Draft of `config` from the restored `state` of an orbax draft (in-major head), whose
    frozen copies must equal the target's arrays in `bound` (spec §5.3, as `load_params` checks a safetensors
    draft's); the target's arrays replace them."""
    graphdef, abstract = abstract_model(Draft, config)
    restored = dict(state.flat_state())
    for path, value in bound.items():
        own = np.asarray(restored[path].get_value())  # the in-major head: its transpose is the tied embedding
        check_bound_copy(source, ".".join(path), value, own.T if path == ("lm_head",) and config.tied_head else own)
    filled = [(p, v.replace(bound[p] if p in bound else restored[p].get_value())) for p, v in abstract.flat_state()]
    return graphdef, nnx.State.from_flat_path(filled)


def has_own_draft(path_or_id: str) -> bool:
    """Whether a target checkpoint carries its own draft: a DeepSeek-V4 -DSpark safetensors folder (V4 §4)."""
    folder = resolve(path_or_id)
    raw = read_config_json(folder)
    return (
        checkpoint_kind(raw, os.path.join(folder, "config.json")) == "deepseek_v4"
        and DeepseekV4DraftConfig.has_draft_fields(raw)
        and not is_orbax_checkpoint(folder)
    )


def _port_switches(options: dict) -> dict:
    """`load_draft`'s v4_options, checked by name (values are checked by DeepseekV4DraftConfig)."""
    accepted = ("tap_point", "block_causal", "context_window", "stage_rope", "confidence_input", "router_eps")
    bad = [k for k in options if k not in accepted]
    if bad:
        raise UsageError(f"v4_options has unknown switch {bad[0]!r}; accepted: {', '.join(accepted)}")
    return dict(options)


def _load_v4_draft(folder: str, raw: dict, source: str, target: Target, options: dict) -> DraftHandle:
    """The DSpark draft stored under mtp.0..S-1 of a V4 -DSpark folder (V4 §4), bound to `target`'s embedding and
    head; FP8 / FP4 tensors dequantise like the target's, params land on the target's mesh."""
    if is_orbax_checkpoint(folder):
        raise UsageError(
            f"{source!r} is a converted DeepSeek-V4 target (orbax) without its draft; load the draft from the "
            "-DSpark safetensors folder"
        )
    if not DeepseekV4DraftConfig.has_draft_fields(raw):
        raise UsageError(
            f"{source!r} is a DeepSeek-V4 checkpoint without a DSpark draft (no dspark_target_layer_ids in "
            "config.json); pass a -DSpark checkpoint"
        )
    if not isinstance(getattr(target, "config", None), DeepseekV4Config):
        raise UsageError(
            f"{source!r} holds a DeepSeek-V4 draft; its target must be a DeepSeek-V4 model from load_target, got "
            f"{type(getattr(target, 'config', target)).__name__}"
        )
    keys = v4_draft_keys(folder)
    config = DeepseekV4DraftConfig.from_hf_dict(
        raw,
        os.path.join(folder, "config.json"),
        model=target.config,  # the stages are target-shaped blocks (V4 §4.1)
        enable_confidence_head=any(k.endswith(".confidence_head.proj.weight") for k in keys),  # iff its key exists
        **_port_switches(options),
    )
    absent = [s for s in range(config.num_stages) if not any(k.startswith(f"mtp.{s}.") for k in keys)]
    if absent:  # Q7: len(dspark_target_layer_ids) stages, each present
        raise UsageError(
            f"{source!r}: dspark_target_layer_ids names {config.num_stages} draft stages but mtp.{absent[0]} is "
            f"missing (found stages {sorted({int(k.split('.')[1]) for k in keys})})"
        )
    t = target.state
    head = t["embed"][...].T if target.config.tie_word_embeddings else t["head"][...]
    bound = {("embed",): t["embed"][...], ("head",): head}
    model_cls = functools.partial(DeepseekV4Draft, mesh=target.mesh)
    graphdef, state = load_params(folder, "deepseek_v4_draft", model_cls, config, target.mesh, source, bound=bound)
    calibration = load_calibration(folder, config.block_size) if config.enable_confidence_head else None
    return DraftHandle(config, graphdef, state, folder, calibration)


def load_gemma4_draft(path_or_id: str, dtype: str = "bfloat16", mesh: jax.sharding.Mesh | None = None) -> DraftHandle:
    """Load a Gemma4DSparkModel draft on its own (spec §4.5), without a target to bind: the frozen embedding /
    LM-head copies come from the checkpoint, which must hold them (spec §5.3 allows either source). To decode, load
    it with `load_draft(path, target)` against a Gemma4 target instead.
    """
    folder = resolve(path_or_id)
    raw = read_config_json(folder)
    kind = checkpoint_kind(raw, os.path.join(folder, "config.json"))
    if not kind.endswith("_gemma4"):
        raise UsageError(f"{path_or_id!r} is a {kind} checkpoint, not a Gemma4DSparkModel draft")
    config = DraftConfig.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(check_dtype(dtype))
    graphdef, state = load_params(folder, kind, Draft, config, mesh, path_or_id)
    return DraftHandle(config, graphdef, state, folder)


__all__ = [
    "Target",
    "DraftHandle",
    "load_target",
    "load_draft",
    "has_own_draft",
    "load_gemma4_draft",
    "convert_checkpoint",
    "checkpoint_kind",
    "resolve",
    "HUB_PATTERNS",
    "DSparkError",
]
