"""Export a param tree back to a PyTorch-layout safetensors folder by inverting a key map: DSpark / DFlash drafts to
the DeepSpec layout (spec §5.2), Qwen3 targets to the HF `Qwen3ForCausalLM` layout.

For every tree path the unique key-map entry whose template matches it gives the source key (the entry's regex
with its groups filled in) and the transform to invert.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
from flax import nnx

from conversion.keymaps import KEYMAPS, keymap_for
from conversion.reader import save_safetensors
from conversion.transforms import TRANSFORMS
from dspark_jax.checkpoints import atomic_dir
from dspark_jax.configs import DraftConfig, Qwen3Config
from dspark_jax.errors import DSparkError

# Inverse of each named transform: (our array, source shape) -> array in the PyTorch layout. Each forward transform
# is "transpose then reshape", so its inverse is "reshape to the transposed source shape, then transpose".
INVERSES = {
    "identity": lambda a, src: a.reshape(src),
    "transpose": lambda a, src: a.reshape(src[::-1]).T,
    "heads_in": lambda a, src: a.reshape(src[::-1]).T,
    "heads_out": lambda a, src: a.reshape(src[::-1]).T,
}
_GROUP = re.compile(r"\((?:[^()\\]|\\.)*\)")  # one capturing group of a key-map regex (no nesting in our tables)
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _template_regex(template: str) -> re.Pattern:
    """'layers.{0}.mlp.up_proj' -> regex over dotted tree paths capturing the {i} fields."""
    parts = re.split(r"(\{\d+\})", template)
    return re.compile("".join(r"([^.]+)" if re.fullmatch(r"\{\d+\}", p) else re.escape(p) for p in parts) + r"\Z")


def _source_key(pattern: str, groups: tuple[str, ...]) -> str:
    """Fill a key-map regex's groups with `groups` and drop its escapes.

    r'layers\\.(\\d+)\\.x' with ('3',) -> 'layers.3.x'.
    """
    values = iter(groups)
    key = _GROUP.sub(lambda m: next(values), pattern)
    return re.sub(r"\\(.)", r"\1", key)


def inverse_keymap(keymap, paths: list[tuple]) -> dict[tuple, tuple[str, str]]:
    """{tree path: (source key, transform name)} for every path; one DSparkError lists unmatched / ambiguous paths
    and keys that would not map back onto their own path."""
    compiled = [(_template_regex(tpl), pattern, tpl, fn) for pattern, tpl, fn in keymap]
    out, problems = {}, []
    for path in paths:
        dotted = ".".join(map(str, path))
        hits = [(rx.match(dotted), pattern, fn) for rx, pattern, _, fn in compiled]
        hits = [(m, pattern, fn) for m, pattern, fn in hits if m]
        if len(hits) != 1:
            problems.append(f"{dotted} matches {len(hits)} key-map entries")
            continue
        m, pattern, fn = hits[0]
        if fn not in INVERSES:
            problems.append(f"{dotted}: transform {fn!r} has no inverse")
            continue
        key = _source_key(pattern, m.groups())
        if not re.fullmatch(pattern, key):
            problems.append(f"{dotted}: rebuilt key {key!r} does not match its own pattern")
            continue
        out[path] = (key, fn)
    keys = [k for k, _ in out.values()]
    problems += [f"duplicate source key {k}" for k in sorted({k for k in keys if keys.count(k) > 1})]
    if problems:
        raise DSparkError("cannot export: " + "; ".join(problems))
    return out


def export_tensors(state: nnx.State, keymap, dtype: str | None = None, skip: tuple[tuple, ...] = ()) -> dict:
    """The checkpoint tensors of a full model state (params and frozen copies) but the param paths in `skip`:
    {source key: numpy array}; floating arrays cast to `dtype` when given, integer tables (V4's tid2eid) kept."""
    flat = [(path, np.asarray(var.get_value())) for path, var in state.flat_state() if path not in skip]
    plan = inverse_keymap(keymap, [p for p, _ in flat])
    tensors = {}
    for path, array in flat:
        key, fn = plan[path]
        src = tuple(TRANSFORMS[fn].source_shape(tuple(array.shape)))
        out = np.ascontiguousarray(INVERSES[fn](array, src))
        cast = dtype is not None and np.issubdtype(out.dtype, np.floating)
        tensors[key] = out.astype(EXPORT_DTYPES[dtype]) if cast else out
    return tensors


def write_folder(dst: str, tensors: dict, config: dict, extra_files: tuple[str, ...]) -> None:
    """model.safetensors + config.json + `extra_files` (copied) as the folder `dst`, written atomically."""
    with atomic_dir(dst) as tmp:
        save_safetensors(os.path.join(tmp, "model.safetensors"), tensors, {"format": "pt"})
        for path in extra_files:
            shutil.copy2(path, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)


def export_draft(dst: str, config: DraftConfig, state: nnx.State, dtype: str = "bfloat16") -> None:
    """A draft state (incl. its frozen embedding / LM-head copies) -> DeepSpec folder: config.json (the target's
    fields plus the DSpark ones, spec §5.1) and model.safetensors. Written atomically."""
    kind = "dspark" if config.use_markov or config.enable_confidence_head else "dflash"
    if getattr(config, "gemma4", None) is not None:  # Gemma4 flavour: sandwich norms and layer_scalar (spec §5.2)
        kind += "_gemma4"
    d = config.to_hf_dict()
    d.update(torch_dtype=dtype, dtype=dtype)
    write_folder(dst, export_tensors(state, keymap_for(kind, config), dtype), d, ())


def export_target(
    dst: str, config: Qwen3Config, state: nnx.State, dtype: str = "bfloat16", extra_files: tuple[str, ...] = ()
) -> None:
    """A Qwen3 state -> HF folder loadable by transformers.Qwen3ForCausalLM (and dj.load_target); `extra_files`
    (tokenizer, generation config) are copied alongside. Written atomically."""
    d = config.to_hf_dict()
    d.update(torch_dtype=dtype, dtype=dtype)
    write_folder(dst, export_tensors(state, KEYMAPS["qwen3"], dtype), d, extra_files)


__all__ = ["export_draft", "export_target", "export_tensors", "inverse_keymap", "INVERSES"]
