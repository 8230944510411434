"""Load targets and drafts from safetensors folders, orbax folders or hub ids into ready-to-run handles."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax import checkpoints
from dspark_jax.configs import DraftConfig, Qwen3Config, read_config_json
from dspark_jax.decoding.calibration import load_calibration
from dspark_jax.errors import DSparkError, UsageError
from dspark_jax.models import Draft, Qwen3
from dspark_jax.sharding import ShardingRules, state_shardings
from dspark_jax.tokenizer import Tokenizer, stop_token_ids

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "chat_template.jinja", "*.md"]


def resolve(path_or_id: str) -> str:
    """A local folder for `path_or_id`: the folder itself, or the hub snapshot from the local cache / network.

    With HF_HUB_OFFLINE=1 only the cache is consulted and a miss fails at once.
    """
    if not isinstance(path_or_id, str) or not path_or_id:
        raise UsageError(f"checkpoint must be a folder or a Hugging Face repo id, got {path_or_id!r}")
    if path_or_id.startswith("~"):  # `--target=~/x` reaches us unexpanded by the shell
        path_or_id = os.path.expanduser(path_or_id)
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise UsageError(f"checkpoint {path_or_id!r} is a file; pass the folder holding config.json and safetensors")
    parts = path_or_id.split("/")
    looks_like_id = len(parts) == 2 and all(parts) and not path_or_id.startswith((".", "~"))
    if not looks_like_id:
        raise UsageError(f"checkpoint folder {path_or_id!r} does not exist")
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return huggingface_hub.snapshot_download(path_or_id, allow_patterns=HUB_PATTERNS)
    except LocalEntryNotFoundError:
        raise UsageError(
            f"checkpoint {path_or_id!r} is neither a local folder nor in the Hugging Face cache (offline)"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"checkpoint {path_or_id!r}: hub download failed ({first})") from None


def checkpoint_kind(config: dict, source: str) -> str:
    """'qwen3', 'dspark' or 'dflash' (or 'dspark_gemma4' / 'dflash_gemma4') from a config.json dict."""
    arch = (config.get("architectures") or [""])[0]
    if config.get("architectures") == ["Gemma4DSparkModel"]:  # Gemma4 flavour (spec §4.5, §5.1)
        heads = config.get("markov_rank") or config.get("enable_confidence_head")
        return "dspark_gemma4" if heads else "dflash_gemma4"
    if arch in ("Qwen3DSparkModel",) or "block_size" in config:
        return "dspark" if config.get("markov_rank") or config.get("enable_confidence_head") else "dflash"
    if config.get("model_type") == "qwen3" or arch == "Qwen3ForCausalLM":
        return "qwen3"
    raise UsageError(
        f"{source}: unsupported architecture {arch or config.get('model_type')!r}; accepted: "
        "Qwen3ForCausalLM, Qwen3DSparkModel, Gemma4DSparkModel"
    )


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


def _abstract(model_cls, config):
    # rngs=None: no random init to trace (layers.params.declare); the values are replaced by the checkpoint's.
    return nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=None)))


def _load_params(folder: str, kind: str, model_cls, config, mesh, source: str, bound: dict | None = None):
    """(graphdef, state) from an orbax folder or a safetensors folder."""
    from conversion.convert import convert_state
    from conversion.keymaps import KEYMAPS
    from conversion.reader import open_checkpoint

    graphdef, abstract = _abstract(model_cls, config)
    shardings = state_shardings(abstract, mesh, ShardingRules()) if mesh is not None else None
    if checkpoints.is_orbax_checkpoint(folder):
        return graphdef, checkpoints.restore_state(folder, abstract, shardings)
    with open_checkpoint(folder) as reader:
        # Gemma4 buffers of value 1.0 (spec §5.2): ignored by Qwen3 drafts, loaded as LayerScalar by Gemma4 ones.
        skip = (r"layers\.\d+\.layer_scalar",)
        state = convert_state(
            reader,
            KEYMAPS[kind],
            abstract,
            source=source,
            mesh=mesh,
            bound=bound,
            skip=skip if kind in ("dspark", "dflash") else (),
        )
    return graphdef, state


def load_target(path_or_id: str, dtype: str = "bfloat16", mesh: jax.sharding.Mesh | None = None) -> Target:
    """Load a Qwen3 target from a safetensors folder, an orbax folder (from conversion.convert) or a hub id."""
    folder = resolve(path_or_id)
    raw = read_config_json(folder)
    kind = checkpoint_kind(raw, os.path.join(folder, "config.json"))
    if kind != "qwen3":
        raise UsageError(f"{path_or_id!r} is a {kind} draft, not a target; pass it as the draft")
    config = Qwen3Config.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(_check_dtype(dtype))
    graphdef, state = _load_params(folder, kind, Qwen3, config, mesh, path_or_id)
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
    graphdef, state = _load_params(folder, kind, Draft, config, target.mesh, path_or_id, bound=bound)
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
    config = DraftConfig.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(_check_dtype(dtype))
    graphdef, state = _load_params(folder, kind, Draft, config, mesh, path_or_id)
    return DraftHandle(config, graphdef, state, folder)


def convert_checkpoint(src: str, dst: str, *, kind: str = "auto", dtype: str = "bfloat16", mesh=None) -> None:
    """Safetensors (folder or hub id) -> orbax folder at `dst` with config.json; atomic (nothing left on failure)."""
    folder = resolve(src)
    _check_destination(dst, folder)
    raw = read_config_json(folder)
    detected = checkpoint_kind(raw, os.path.join(folder, "config.json"))
    if kind not in ("auto", detected):
        raise UsageError(f"--kind {kind} does not match the checkpoint at {src!r}, which is {detected}")
    dtype = _check_dtype(dtype)
    if detected == "qwen3":
        config = Qwen3Config.from_hf_dict(raw).with_dtype(dtype)
        graphdef, state = _load_params(folder, detected, Qwen3, config, mesh, src)
    else:
        config = DraftConfig.from_hf_dict(raw).with_dtype(dtype)
        graphdef, state = _load_params(folder, detected, Draft, config, mesh, src)
    extras = tuple(
        os.path.join(folder, f)
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
        if os.path.isfile(os.path.join(folder, f))
    )
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
    if os.path.exists(dst) and not (
        os.path.isdir(dst) and (not os.listdir(dst) or checkpoints.is_orbax_checkpoint(dst))
    ):
        raise UsageError(f"dst {dst!r} exists and is not a dspark_jax checkpoint; remove it or pick a new folder")


def _check_dtype(dtype: str) -> str:
    if dtype not in ("bfloat16", "float32"):
        raise UsageError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    return dtype


__all__ = [
    "Target",
    "DraftHandle",
    "load_target",
    "load_draft",
    "load_gemma4_draft",
    "convert_checkpoint",
    "resolve",
    "DSparkError",
]
