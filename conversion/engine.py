"""Generic safetensors -> nnx.State engine driven by a key map.

Every source key, shape and dtype is checked against the abstract model before any data is read, every problem is
reported in one error, then one tensor at a time is streamed straight into its sharding.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import warnings

import jax
import numpy as np
from flax import nnx

from conversion import quant
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
    # Quantised weights (V4 §3.2) consume their sibling scale; the pair is checked here, dequantised on read.
    scales = quant.scale_siblings(reader)
    consumed = set(scales.values())
    for key in reader.keys():
        if key in consumed or any(re.fullmatch(s, key) for s in skip):
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
        if quant.is_quantized(spec.dtype):
            bad += _check_quantized(reader, key, spec, scales.get(key), tuple(want))
        elif tuple(spec.shape) != tuple(want):
            bad.append(f"{key} has shape {list(spec.shape)}, expected {list(want)}")
        elif _is_int(targets[path].get_value().dtype) and _is_int(spec.dtype):
            pass  # integer ids (V4 tid2eid) for an integer param: cast checked on read
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


def _is_int(dtype) -> bool:
    return np.issubdtype(np.dtype(dtype), np.integer)


def _check_quantized(reader, key: str, spec, scale_key: str | None, want: tuple[int, ...]) -> list[str]:
    """Problems of one quantised source tensor: its dequantised shape, its scale (presence, shape, dtype)."""
    if np.dtype(spec.dtype) in quant.PACKED_FP4 and want and want[-1] % 2:
        return [f"{key} is packed FP4 but its target has an odd last dimension {list(want)}; two values share a byte"]
    shape = quant.logical_shape(spec.shape, spec.dtype)
    if shape != want:
        stored = list(spec.shape)
        return [f"{key} has shape {list(shape)} after dequantisation (stored {stored}), expected {list(want)}"]
    scale = reader.spec(scale_key) if scale_key is not None else None
    problem = quant.check_pair(key, spec.shape, spec.dtype, scale_key, scale and scale.shape, scale and scale.dtype)
    return [problem] if problem else []


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
    default device) before the next is read. A source (reader view) with `sliceable(key)` true and
    `read_slice(key, index, dtype) -> array[index]` for an identity-mapped key is asked for each local shard instead,
    so a stacked tensor (V4 experts) is never whole in host memory. On a mesh, a source with `read_rows` is read
    row-sliced for every other param (quantised ones by their FP8 row tiles / FP4 rows, conversion.quant). An
    integer tensor fills an integer param (V4 tid2eid), refused when a value does not fit. `bound` maps tree paths
    to arrays supplied by the caller; a checkpoint copy of such a path must equal it exactly (spec §5.3).
    """
    from tqdm import tqdm

    bound = bound or {}
    found = plan(reader, keymap, abstract_state, source=source, skip=skip, bound=tuple(bound))
    scales = quant.scale_siblings(reader)
    flat = {path: var for path, var in abstract_state.flat_state()}
    filled = {}
    total = sum(reader.spec(key).nbytes for key, _ in found.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress or None, leave=False) as bar:
        for path, (key, fn) in found.items():
            var = flat[path]
            shape, dtype = tuple(var.get_value().shape), var.get_value().dtype
            if fn == "identity" and path not in bound and getattr(reader, "sliceable", lambda k: False)(key):
                # The source builds each shard itself (e.g. stacked experts, one expert at a time): no full copy.
                filled[path] = var.replace(_place_slices(reader, key, _show(path), var, mesh, rules))
                bar.update(reader.spec(key).nbytes)
                continue
            if mesh is not None and path not in bound and _row_sliceable(reader, key, fn, shape):
                # Each local shard reads only its own rows of the source (several processes: each its own shards);
                # a quantised one its rows' scale tiles, dequantised to the param dtype.
                filled[path] = var.replace(_place_rows(reader, key, scales.get(key), fn, _show(path), var, mesh, rules))
                bar.update(reader.spec(key).nbytes)
                continue
            # Dequantised straight to the param dtype (f32 products, one rounding); float tensors cast as before.
            source_array = quant.read_dequantized(reader, key, scales.get(key), dtype)
            array = TRANSFORMS[fn].apply(source_array, shape).astype(dtype, copy=False)
            if _is_int(dtype) and _is_int(source_array.dtype) and not np.array_equal(array, source_array):
                raise DSparkError(
                    f"checkpoint {source!r}: {key} holds values {source_array.min()}..{source_array.max()} that do not "
                    f"fit the param dtype {np.dtype(dtype).name}"
                )
            del source_array
            if path in bound:
                check_bound_copy(source, key, bound[path], array)
                bar.update(reader.spec(key).nbytes)
                continue
            filled[path] = var.replace(_place(array, _show(path), var, mesh, rules))
            bar.update(reader.spec(key).nbytes)
            del array
    for path, value in bound.items():
        filled[path] = flat[path].replace(value)
    return nnx.State.from_flat_path([(p, filled[p]) for p in flat])


def check_bound_copy(source: str, name: str, bound, stored: np.ndarray) -> None:
    """A checkpoint's own copy `stored` of an array the caller binds (a draft's frozen embedding / LM head, spec §5.3)
    must equal it exactly, in the copy's dtype; otherwise one-line DSparkError naming `name`."""
    if not np.array_equal(np.asarray(bound).astype(stored.dtype), stored):
        raise DSparkError(
            f"checkpoint {source!r}: {name} differs from the target's copy; the draft was trained against another "
            "target"
        )


class DestinationClaim:
    """A shared flock on the folder that will hold `dst` while one conversion writes it (see `claim_destination`)."""

    def __init__(self, fd: int | None):
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self):
        self.release()


def claim_destination(dst: str) -> DestinationClaim:
    """Deal with `dst.tmp-*` folders left beside `dst` by a conversion that was killed midway, then claim the folder.

    Such a folder is the orbax write of a run that never reached its final rename (dspark_jax.checkpoints.atomic_dir),
    possibly hundreds of GB. The save is one orbax write of the whole state, not an append of finished tensors, so
    nothing in it can be resumed: it is removed, with a warning naming it and its size. Running conversions hold a
    shared flock on the parent folder; when another one holds it, the folders may be its live output and are left
    alone (with a warning saying so). Needs flock (Linux, macOS); elsewhere nothing is removed.
    """
    parent = os.path.dirname(os.path.abspath(dst))
    stale = sorted(glob.glob(glob.escape(os.path.abspath(dst)) + ".tmp-*"))
    try:
        import fcntl

        fd = os.open(parent, os.O_RDONLY)
    except (ImportError, OSError):  # no flock here, or no parent yet (then nothing stale either)
        return DestinationClaim(None)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        alone = True
    except OSError:
        alone = False
    for path in stale:
        name = os.path.basename(path)
        if not alone:
            warnings.warn(
                f"left {name} in {parent} alone: another conversion is writing in that folder and it may be its "
                "output; remove it yourself once no conversion runs there",
                stacklevel=2,
            )
            continue
        size = _folder_bytes(path)
        shutil.rmtree(path, ignore_errors=True)
        warnings.warn(
            f"removed {name} ({size / 1e9:.2f} GB) in {parent}: the partial output of an interrupted conversion "
            "to the same --dst (it cannot be resumed; this run starts over)",
            stacklevel=2,
        )
    fcntl.flock(fd, fcntl.LOCK_SH)  # from here on, later runs see this one as live
    return DestinationClaim(fd)


def _folder_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _place_slices(reader, key: str, name: str, var, mesh, rules) -> jax.Array:
    """Place `key` from a source that offers `read_slice(key, index, dtype)`: only the slices the local devices hold
    are built (on several processes, each one reads only its own shards), each straight in the param dtype."""
    value = var.get_value()
    shape, dtype = tuple(value.shape), value.dtype
    if mesh is None:
        return jax.device_put(reader.read_slice(key, tuple(slice(0, n) for n in shape), dtype))
    sharding = sharding_for(name, shape, var.get_metadata().get("logical_axes"), mesh, rules)
    build = _once(shape, lambda index: reader.read_slice(key, index, dtype))
    return jax.make_array_from_callback(shape, sharding, build)


def _once(shape: tuple[int, ...], build):
    """`build(index)` memoised on the index's (start, stop) ranges: devices that hold the same slice (replicated
    over another mesh axis) share one read and one host buffer."""
    built: dict[tuple, np.ndarray] = {}

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        ranges = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        if ranges not in built:
            built[ranges] = build(tuple(slice(a, b) for a, b in ranges))
        return built[ranges]

    return callback


# transform -> the target dim whose index range selects rows of the PyTorch-layout source (rows per index step):
# identity keeps dim 0; transpose's dim 1 is the source's out rows; heads_in's heads (dim 1) are head_dim rows each.
_ROW_DIM = {"identity": 0, "transpose": 1, "heads_in": 1}


def _row_sliceable(reader, key: str, fn: str, shape: tuple[int, ...]) -> bool:
    spec = reader.spec(key)
    return (
        fn in _ROW_DIM
        and hasattr(reader, "read_rows")
        and len(shape) > _ROW_DIM[fn]
        and (quant.is_quantized(spec.dtype) or np.dtype(spec.dtype) in FLOAT_DTYPES)
    )


def _place_rows(reader, key: str, scale_key: str | None, fn: str, name: str, var, mesh, rules) -> jax.Array:
    """Place one param on `mesh` reading, for each local shard, only the source rows that shard holds (a quantised
    source: the FP8 tiles / FP4 rows holding them, dequantised straight to the param dtype)."""
    value = var.get_value()
    shape, dtype = tuple(value.shape), value.dtype
    dim = _ROW_DIM[fn]
    step = shape[2] if fn == "heads_in" else 1  # rows of one head

    def shard(index: tuple[slice, ...]) -> np.ndarray:
        start, stop, _ = index[dim].indices(shape[dim])
        if fn == "heads_in" and index[2].indices(shape[2])[:2] != (0, shape[2]):
            start, stop = 0, shape[dim]  # head_dim split too: rows are not contiguous, read the heads whole
        part = shape[:dim] + (stop - start,) + shape[dim + 1 :]
        rows = quant.read_dequantized_rows(reader, key, scale_key, start * step, stop * step, dtype)
        block = TRANSFORMS[fn].apply(rows, part).astype(dtype, copy=False)
        rest = tuple(
            slice(index[d].indices(shape[d])[0] - start, index[d].indices(shape[d])[1] - start)
            if d == dim
            else index[d]
            for d in range(len(shape))
        )
        return np.ascontiguousarray(block[rest])

    sharding = sharding_for(name, shape, var.get_metadata().get("logical_axes"), mesh, rules)
    return jax.make_array_from_callback(shape, sharding, _once(shape, shard))


def _place(array: np.ndarray, name: str, var, mesh, rules) -> jax.Array:
    if mesh is None:
        return jax.device_put(array)
    sharding = sharding_for(name, array.shape, var.get_metadata().get("logical_axes"), mesh, rules)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


__all__ = ["plan", "convert_state", "check_bound_copy", "claim_destination", "FLOAT_DTYPES"]
