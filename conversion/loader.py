"""Checkpoint folder -> param state: safetensors through the key maps (engine.py) or orbax (dspark_jax.checkpoints),
and the safetensors -> orbax conversion behind `python -m conversion.convert`.

`dspark_jax.loading` builds its handles on top of this module; nothing here knows about decoding or handles.
"""

from __future__ import annotations

import os

import jax
from flax import nnx

from conversion.engine import DestinationClaim, claim_destination, convert_state
from conversion.keymaps import keymap_for
from conversion.keymaps.deepseek_v4 import DEEPSEEK_V4_DRAFT_SKIP, DEEPSEEK_V4_SKIP, DeepseekV4Source
from conversion.keymaps.gemma4 import GEMMA4_SKIP
from conversion.keymaps.qwen3_moe import StackedExperts
from conversion.reader import open_checkpoint
from dspark_jax import checkpoints
from dspark_jax.configs import (
    DTYPES,
    DeepseekV4Config,
    DraftConfig,
    Gemma4Config,
    Qwen3Config,
    Qwen3MoeConfig,
    read_config_json,
)
from dspark_jax.errors import DSparkError, UsageError
from dspark_jax.hub import resolve
from dspark_jax.models import DeepseekV4, Draft, Gemma4, Qwen3, Qwen3Moe
from dspark_jax.sharding import ShardingRules, state_shardings


def checkpoint_kind(config: dict, source: str) -> str:
    """'qwen3', 'dspark' or 'dflash' (or 'dspark_gemma4' / 'dflash_gemma4') from a config.json dict."""
    arch = (config.get("architectures") or [""])[0]
    if config.get("architectures") == ["Gemma4DSparkModel"]:  # Gemma4 flavour (spec §4.5, §5.1)
        heads = config.get("markov_rank") or config.get("enable_confidence_head")
        return "dspark_gemma4" if heads else "dflash_gemma4"
    if Gemma4Config.is_hf_dict(config):  # Gemma4ForCausalLM or the text stack of Gemma4ForConditionalGeneration
        return "gemma4"
    if DeepseekV4Config.is_hf_dict(config):  # either config dialect (V4 §1.2); a -DSpark folder loads its target
        return "deepseek_v4"
    if arch in ("Qwen3DSparkModel",) or "block_size" in config:
        return "dspark" if config.get("markov_rank") or config.get("enable_confidence_head") else "dflash"
    if config.get("model_type") == "qwen3_moe" or arch == "Qwen3MoeForCausalLM":
        return "qwen3_moe"
    if config.get("model_type") == "qwen3" or arch == "Qwen3ForCausalLM":
        return "qwen3"
    raise UsageError(
        f"{source}: unsupported architecture {arch or config.get('model_type')!r}; accepted: "
        "Qwen3ForCausalLM, Qwen3MoeForCausalLM, Qwen3DSparkModel, Gemma4DSparkModel, Gemma4ForCausalLM, "
        "Gemma4ForConditionalGeneration, DeepseekV4ForCausalLM"
    )


def refuse_legacy_mtp(folder: str, source: str) -> None:
    """A V4 checkpoint whose `mtp.0` has `e_proj` holds the legacy MTP block, not a DSpark draft (V4 §4.2)."""
    with open_checkpoint(folder) as reader:
        if "mtp.0.e_proj.weight" in reader or "model.mtp.0.e_proj.weight" in reader:
            raise UsageError(
                f"{source!r} holds the legacy MTP block (mtp.0.e_proj), not a DSpark draft; pass a DeepSeek-V4 "
                "-DSpark checkpoint (mtp.0.main_proj, mtp.0..2 stages)"
            )


def v4_draft_keys(folder: str) -> set[str]:
    """The `mtp.*` keys of a V4 safetensors folder, `model.` prefix removed (what the draft loader probes: which
    stages exist, whether the optional confidence head is there, V4 §4.1-4.2)."""
    with open_checkpoint(folder) as reader:
        return {k.removeprefix("model.") for k in reader.keys() if k.removeprefix("model.").startswith("mtp.")}


def check_dtype(dtype: str) -> str:
    """`dtype` itself when it is a dtype params can be stored in; a one-line UsageError otherwise."""
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    return dtype


def abstract_model(model_cls, config) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of `model_cls(config)`, with no array allocated."""
    # rngs=None: no random init to trace (layers.params.declare); the values are replaced by the checkpoint's.
    return nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=None)))


def load_params(
    folder: str, kind: str, model_cls, config, mesh, source: str, bound: dict | None = None, host: tuple = ()
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state) of `model_cls(config)` filled from an orbax folder or a safetensors folder.

    `kind` (from `checkpoint_kind`) picks the key map; `bound` maps tree paths to arrays the caller supplies (a
    draft's frozen copies of its target's embedding / LM head, spec §5.3). With a `mesh` every param lands in its
    sharding from `ShardingRules`; without, on the default device. `host`: tree paths an orbax folder restores as
    numpy arrays (copies the caller only compares; `checkpoints.restore_state`).
    """
    graphdef, abstract = abstract_model(model_cls, config)
    shardings = state_shardings(abstract, mesh, ShardingRules()) if mesh is not None else None
    if checkpoints.is_orbax_checkpoint(folder):
        return graphdef, checkpoints.restore_state(folder, abstract, shardings, host)
    with open_checkpoint(folder) as reader:
        if kind == "qwen3_moe":  # the hub stores one tensor per expert: present them stacked (and checked)
            reader = StackedExperts(reader, config.num_experts, source)
        if kind in ("deepseek_v4", "deepseek_v4_draft"):  # experts stacked, read per shard; tid2eid ints (V4 §3.4)
            reader = DeepseekV4Source(reader)
        # Gemma4 buffers of value 1.0 (spec §5.2): ignored by Qwen3 drafts, loaded as LayerScalar by Gemma4 ones.
        skip = (r"layers\.\d+\.layer_scalar",)
        state = convert_state(
            reader,
            keymap_for(kind, config),
            abstract,
            source=source,
            mesh=mesh,
            bound=bound,
            skip={
                "dspark": skip,
                "dflash": skip,
                "gemma4": GEMMA4_SKIP,
                "deepseek_v4": DEEPSEEK_V4_SKIP,
                "deepseek_v4_draft": DEEPSEEK_V4_DRAFT_SKIP,
            }.get(kind, ()),
        )
    return graphdef, state


# Copied beside the params when the source has them; calibration.json: a draft's confidence temperatures and the tree
# builder's rank factors (spec §10).
EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", checkpoints.CALIBRATION_FILE)
WRITTEN = ("config.json", checkpoints.PARAMS_DIR, *EXTRA_FILES)  # everything a conversion puts in its folder


def convert_checkpoint(src: str, dst: str, *, kind: str = "auto", dtype: str = "bfloat16", mesh=None) -> None:
    """Safetensors (folder or hub id) -> orbax folder at `dst` with config.json; atomic (nothing left on failure)."""
    folder = resolve(src)
    _check_destination(dst, folder)
    # Removes DST.tmp-* left by a killed run, saying so (of several processes, the one that writes the folder).
    claim = claim_destination(dst) if jax.process_index() == 0 else DestinationClaim(None)
    try:
        _convert_into(folder, src, dst, kind, dtype, mesh)
    finally:
        claim.release()


def _convert_into(folder: str, src: str, dst: str, kind: str, dtype: str, mesh) -> None:
    raw = read_config_json(folder)
    detected = checkpoint_kind(raw, os.path.join(folder, "config.json"))
    if kind not in ("auto", detected):
        raise UsageError(f"--kind {kind} does not match the checkpoint at {src!r}, which is {detected}")
    dtype = check_dtype(dtype)
    if detected == "qwen3":
        config = Qwen3Config.from_hf_dict(raw).with_dtype(dtype)
        graphdef, state = load_params(folder, detected, Qwen3, config, mesh, src)
    elif detected == "qwen3_moe":
        config = Qwen3MoeConfig.from_hf_dict(raw).with_dtype(dtype)
        graphdef, state = load_params(folder, detected, Qwen3Moe, config, mesh, src)
    elif detected == "deepseek_v4":
        config = DeepseekV4Config.from_hf_dict(raw).with_dtype(dtype)
        graphdef, state = load_params(folder, detected, DeepseekV4, config, mesh, src)
    elif detected == "gemma4":
        config = Gemma4Config.from_hf_dict(raw).with_dtype(dtype)
        graphdef, state = load_params(folder, detected, Gemma4, config, mesh, src)
    else:
        config = DraftConfig.from_hf_dict(raw).with_dtype(dtype)
        graphdef, state = load_params(folder, detected, Draft, config, mesh, src)
    extras = tuple(os.path.join(folder, f) for f in EXTRA_FILES if os.path.isfile(os.path.join(folder, f)))
    try:
        checkpoints.save_state(dst, state, {**raw, "torch_dtype": dtype}, extras)
    except OSError as e:  # unwritable or invalid destination: one line, like every other bad input
        raise DSparkError(f"cannot write {dst!r}: {e.strerror or e}") from None


def _check_destination(dst: str, src_folder: str) -> None:
    """Refuse a --dst whose replacement would destroy something that is not a previous conversion."""
    if not isinstance(dst, str) or not dst:
        raise UsageError(f"dst must be a folder path, got {dst!r}")
    real = os.path.realpath(dst)
    src = os.path.realpath(src_folder)
    if real == src or src.startswith(real + os.sep):
        raise UsageError(f"dst {dst!r} would overwrite the source checkpoint {src_folder!r}; pick another folder")
    if os.path.islink(dst):  # the atomic rename would replace the link, not the folder it names
        raise UsageError(f"dst {dst!r} is a symbolic link; give the folder itself ({real!r}) or a new one")
    if os.path.exists(dst) and not (
        os.path.isdir(dst) and (not os.listdir(dst) or checkpoints.is_orbax_checkpoint(dst))
    ):
        raise UsageError(f"dst {dst!r} exists and is not a dspark_jax checkpoint; remove it or pick a new folder")
    foreign = sorted(set(os.listdir(dst)) - set(WRITTEN)) if os.path.isdir(dst) else []
    if foreign:  # a previous conversion is replaced whole: anything else in it would be lost
        names = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UsageError(f"dst {dst!r} holds files no conversion writes ({names}); move them or pick a new folder")


__all__ = ["abstract_model", "check_dtype", "checkpoint_kind", "convert_checkpoint", "load_params"]
