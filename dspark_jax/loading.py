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

from conversion.loader import check_dtype, checkpoint_kind, convert_checkpoint, load_params
from dspark_jax.checkpoints import load_calibration
from dspark_jax.configs import DraftConfig, Qwen3Config, read_config_json
from dspark_jax.errors import DSparkError, UsageError
from dspark_jax.hub import HUB_PATTERNS, resolve
from dspark_jax.models import Draft, Qwen3
from dspark_jax.tokenizer import Tokenizer, stop_token_ids


@functools.partial(jax.jit, static_argnames=("graphdef", "tap_layer_ids"))
def _forward(graphdef, state, tokens, tap_layer_ids):
    model = nnx.merge(graphdef, state)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    hidden, taps, _ = model(tokens, positions, tap_layer_ids=tap_layer_ids)
    return model.logits(hidden), None if taps is None else taps.astype(jnp.float32)


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

    def module(self) -> Qwen3:
        return nnx.merge(self.graphdef, self.state)

    def forward(self, tokens, tap_layer_ids: tuple[int, ...] = ()):
        """Full causal forward of tokens i32[batch, seq] -> (f32[batch, seq, vocab], f32[batch, seq, taps*hidden])."""
        return _forward(self.graphdef, self.state, jnp.asarray(tokens, jnp.int32), tuple(tap_layer_ids))


@dataclasses.dataclass
class DraftHandle:
    """A loaded DSpark / DFlash draft bound to its target. `calibration`: per-slot confidence temperatures f32[B]
    from the folder's calibration.json (spec §10), or None (uncalibrated)."""

    config: DraftConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    path: str
    calibration: np.ndarray | None = None

    def module(self) -> Draft:
        return nnx.merge(self.graphdef, self.state)

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
    """Load a Qwen3 target from a safetensors folder, an orbax folder (from conversion.convert) or a hub id."""
    folder = resolve(path_or_id)
    raw = read_config_json(folder)
    kind = checkpoint_kind(raw, os.path.join(folder, "config.json"))
    if kind != "qwen3":
        raise UsageError(f"{path_or_id!r} is a {kind} draft, not a target; pass it as the draft")
    config = Qwen3Config.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(check_dtype(dtype))
    graphdef, state = load_params(folder, kind, Qwen3, config, mesh, path_or_id)
    return Target(config, graphdef, state, folder, Tokenizer.maybe_load(folder), stop_token_ids(folder, raw), mesh)


def load_draft(path_or_id: str, target: Target) -> DraftHandle:
    """Load a DSpark / DFlash draft for `target`; its frozen embedding / LM-head copies are bound to the target's
    arrays (and must equal them when the checkpoint also stores them).
    """
    folder = resolve(path_or_id)
    raw = read_config_json(folder)
    kind = checkpoint_kind(raw, os.path.join(folder, "config.json"))
    if kind == "qwen3":
        raise UsageError(f"{path_or_id!r} is a target model, not a DSpark/DFlash draft")
    if kind.endswith("_gemma4"):
        raise UsageError(
            f"{path_or_id!r} is a Gemma4 draft and this port has no Gemma4 target to bind it to; use load_gemma4_draft"
        )
    config = DraftConfig.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(target.config.param_dtype)
    if target.config.dtype != target.config.param_dtype:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=target.config.dtype))
    config.check_target(target.config)
    t = target.state
    lm_head = t["embed_tokens"][...].T if target.config.tie_word_embeddings else t["lm_head"][...]
    bound = {("embed_tokens",): t["embed_tokens"][...], ("lm_head",): lm_head}
    graphdef, state = load_params(folder, kind, Draft, config, target.mesh, path_or_id, bound=bound)
    calibration = load_calibration(folder, config.block_size) if config.enable_confidence_head else None
    return DraftHandle(config, graphdef, state, folder, calibration)


def load_gemma4_draft(path_or_id: str, dtype: str = "bfloat16", mesh: jax.sharding.Mesh | None = None) -> DraftHandle:
    """Load a Gemma4DSparkModel draft on its own (spec §4.5): there is no JAX Gemma4 target to bind, so the frozen
    embedding / LM-head copies come from the checkpoint, which must hold them (spec §5.3 allows either source).
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
    "load_gemma4_draft",
    "convert_checkpoint",
    "checkpoint_kind",
    "resolve",
    "HUB_PATTERNS",
    "DSparkError",
]
