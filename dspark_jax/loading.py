"""Load targets and drafts from safetensors folders, orbax folders or hub ids into ready-to-run handles."""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax import checkpoints
from dspark_jax.configs import DraftConfig, Qwen3Config, read_config_json
from dspark_jax.errors import DSparkError, UsageError
from dspark_jax.models import Draft, Qwen3
from dspark_jax.sharding import ShardingRules, state_shardings
from dspark_jax.tokenizer import Tokenizer, stop_token_ids

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.md"]


def resolve(path_or_id: str) -> str:
    """A local folder for `path_or_id`: the folder itself, or the hub snapshot from the local cache / network.

    With HF_HUB_OFFLINE=1 only the cache is consulted and a miss fails at once.
    """
    if not isinstance(path_or_id, str) or not path_or_id:
        raise UsageError(f"checkpoint must be a folder or a Hugging Face repo id, got {path_or_id!r}")
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
        raise UsageError(f"checkpoint {path_or_id!r} is neither a local folder nor in the Hugging Face cache "
                         "(offline)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"checkpoint {path_or_id!r}: hub download failed ({first})") from None


def checkpoint_kind(config: dict, source: str) -> str:
    """'qwen3', 'dspark' or 'dflash' from a config.json dict."""
    arch = (config.get("architectures") or [""])[0]
    if arch in ("Qwen3DSparkModel",) or "block_size" in config:
        return "dspark" if config.get("markov_rank") or config.get("enable_confidence_head") else "dflash"
    if config.get("model_type") == "qwen3" or arch == "Qwen3ForCausalLM":
        return "qwen3"
    raise UsageError(f"{source}: unsupported architecture {arch or config.get('model_type')!r}; accepted: "
                     "Qwen3ForCausalLM, Qwen3DSparkModel")


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
    """A loaded DSpark / DFlash draft bound to its target."""

    config: DraftConfig
    graphdef: nnx.GraphDef
    state: nnx.State
    path: str

    def module(self) -> Draft:
        return nnx.merge(self.graphdef, self.state)

    def propose(self, taps, anchor, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, key=None,
                cache=None, anchor_position=None):
        """Research API: one block from context features (see decoding.propose.propose_block)."""
        from dspark_jax.decoding.propose import propose_from_features

        return propose_from_features(self, taps, anchor, temperature=temperature, top_p=top_p, top_k=top_k,
                                     key=key, cache=cache, anchor_position=anchor_position)


def _abstract(model_cls, config):
    return nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(0))))


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
        skip = (r"layers\.\d+\.layer_scalar",)  # Gemma4 buffers of value 1.0 (spec §5.2); ignored for Qwen3
        state = convert_state(reader, KEYMAPS[kind], abstract, source=source, mesh=mesh, bound=bound,
                              skip=skip if kind != "qwen3" else ())
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
    config = DraftConfig.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(
        target.config.param_dtype)
    if target.config.dtype != target.config.param_dtype:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, dtype=target.config.dtype))
    config.check_target(target.config)
    t = target.state
    lm_head = t["embed_tokens"][...].T if target.config.tie_word_embeddings else t["lm_head"][...]
    bound = {("embed_tokens",): t["embed_tokens"][...], ("lm_head",): lm_head}
    graphdef, state = _load_params(folder, kind, Draft, config, target.mesh, path_or_id, bound=bound)
    return DraftHandle(config, graphdef, state, folder)


def convert_checkpoint(src: str, dst: str, *, kind: str = "auto", dtype: str = "bfloat16", mesh=None) -> None:
    """Safetensors (folder or hub id) -> orbax folder at `dst` with config.json; atomic (nothing left on failure)."""
    folder = resolve(src)
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
    extras = tuple(os.path.join(folder, f) for f in ("tokenizer.json", "tokenizer_config.json",
                                                        "generation_config.json")
                   if os.path.isfile(os.path.join(folder, f)))
    checkpoints.save_state(dst, state, {**raw, "torch_dtype": dtype}, extras)


def _check_dtype(dtype: str) -> str:
    if dtype not in ("bfloat16", "float32"):
        raise UsageError(f"dtype must be bfloat16 or float32, got {dtype!r}")
    return dtype


__all__ = ["Target", "DraftHandle", "load_target", "load_draft", "convert_checkpoint", "resolve", "DSparkError"]
