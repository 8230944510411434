"""Generic safetensors -> nnx.State engine driven by a key map.

Every source key, shape and dtype is checked against the abstract model before any data is read, every problem is
reported in one error, then one tensor at a time is streamed straight into its sharding.
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import nnx

from conversion.transforms import TRANSFORMS
from dspark_jax.errors import DSparkError
from dspark_jax.sharding import ShardingRules, sharding_for

FLOAT_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype("bfloat16")}


def _tree_path(template: str, groups: tuple[str, ...]) -> tuple:
    path = template.format(*groups).split(".")
    return tuple(int(p) if p.isdigit() else p for p in path)


def _show(path: tuple) -> str:
    return ".".join(map(str, path))


def plan(
    reader, keymap, abstract_state: nnx.State, *, source: str, skip: tuple[str, ...] = (), bound: tuple[tuple, ...] = ()
) -> dict:
    """Match every source key to a tree path and check shapes/dtypes; one DSparkError lists every problem.

    Returns {tree path: (source key, transform name)}. Paths in `bound` are supplied by the caller (frozen copies
    bound to the target); when the checkpoint also holds them they are planned too, so the caller can compare.
    """
    targets = {path: var for path, var in abstract_state.flat_state()}
    compiled = [(re.compile(pattern + r"\Z"), template, fn) for pattern, template, fn in keymap]
    found: dict[tuple, tuple[str, str]] = {}
    unknown, duplicate, bad = [], [], []
    for key in reader.keys():
        if any(re.fullmatch(s, key) for s in skip):
            continue
        match = next(((m, tpl, fn) for rx, tpl, fn in compiled if (m := rx.match(key))), None)
        path = _tree_path(match[1], match[0].groups()) if match else None
        if path not in targets:
            unknown.append(key)
            continue
        if path in found:
            duplicate.append(f"{key} and {found[path][0]} both map to {_show(path)}")
            continue
        found[path] = (key, match[2])
        spec = reader.spec(key)
        want = TRANSFORMS[match[2]].source_shape(tuple(targets[path].get_value().shape))
        if tuple(spec.shape) != tuple(want):
            bad.append(f"{key} has shape {list(spec.shape)}, expected {list(want)}")
        elif np.dtype(spec.dtype) not in FLOAT_DTYPES:
            bad.append(f"{key} has dtype {np.dtype(spec.dtype).name}, expected a float (float32/bfloat16/float16)")
    missing = [_show(p) for p in targets if p not in found and p not in bound]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unknown key(s): {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    if missing:
        problems.append(
            f"{len(missing)} missing param(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
    problems += [f"duplicate: {d}" for d in duplicate] + bad
    if problems:
        raise DSparkError(f"checkpoint {source!r} does not match the model: " + "; ".join(problems))
    return found


def convert_state(
    reader,
    keymap,
    abstract_state: nnx.State,
    *,
    source: str,
    mesh=None,
    rules: ShardingRules = ShardingRules(),
    skip: tuple[str, ...] = (),
    bound: dict | None = None,
    progress: bool = True,
) -> nnx.State:
    """Fill `abstract_state` (from nnx.eval_shape + split) with the checkpoint's tensors.

    Each tensor is read, transformed, cast to the param dtype and placed into its NamedSharding on `mesh` (or the
    default device) before the next is read. `bound` maps tree paths to arrays supplied by the caller; a checkpoint
    copy of such a path must equal it exactly (spec §5.3).
    """
    from tqdm import tqdm

    bound = bound or {}
    found = plan(reader, keymap, abstract_state, source=source, skip=skip, bound=tuple(bound))
    flat = {path: var for path, var in abstract_state.flat_state()}
    filled = {}
    total = sum(reader.spec(key).nbytes for key, _ in found.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress or None, leave=False) as bar:
        for path, (key, fn) in found.items():
            var = flat[path]
            shape, dtype = tuple(var.get_value().shape), var.get_value().dtype
            array = TRANSFORMS[fn].apply(reader.read(key), shape).astype(dtype)
            if path in bound:
                if not np.array_equal(np.asarray(bound[path]).astype(dtype), array):
                    raise DSparkError(
                        f"checkpoint {source!r}: {key} differs from the target's copy; the draft was "
                        "trained against another target"
                    )
                bar.update(reader.spec(key).nbytes)
                continue
            filled[path] = var.replace(_place(array, _show(path), var, mesh, rules))
            bar.update(reader.spec(key).nbytes)
            del array
    for path, value in bound.items():
        filled[path] = flat[path].replace(value)
    return nnx.State.from_flat_path([(p, filled[p]) for p in flat])


def _place(array: np.ndarray, name: str, var, mesh, rules) -> jax.Array:
    if mesh is None:
        return jax.device_put(array)
    sharding = sharding_for(name, array.shape, var.get_metadata().get("logical_axes"), mesh, rules)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


__all__ = ["plan", "convert_state", "FLOAT_DTYPES"]
