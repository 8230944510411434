"""Files of a checkpoint folder: orbax save/restore of an nnx.State (plus its config.json), written atomically and
restored into target shardings, and a draft's `calibration.json` (per-slot confidence temperatures, spec §10)."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import shutil
import sys
import tempfile

import jax
import numpy as np
from flax import nnx

from dspark_jax.errors import DSparkError, UsageError, first_line

PARAMS_DIR = "params"
FORMAT = "orbax-nnx-state"
CALIBRATION_FILE = "calibration.json"


def is_orbax_checkpoint(path: str) -> bool:
    return os.path.isdir(os.path.join(path, PARAMS_DIR)) and os.path.isfile(os.path.join(path, "config.json"))


@contextlib.contextmanager
def atomic_file(path: str):
    """Yield a temp path beside `path` (`<path>.partial-<pid>`); it becomes `path` only if the block succeeds and
    is removed otherwise, so readers never see a half-written file."""
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_dir(dst: str):
    """A context manager yielding a fresh temp folder beside `dst`, renamed to `dst` only if the block succeeds."""
    return _AtomicDir(dst)


class _AtomicDir:
    def __init__(self, dst: str):
        self.dst = os.path.abspath(dst)

    def __enter__(self) -> str:
        parent = os.path.dirname(self.dst)
        os.makedirs(parent, exist_ok=True)
        if jax.process_count() > 1:  # every process writes its shards into one folder: a name they all know
            self.tmp = self.dst + ".tmp-shared"
            if jax.process_index() == 0:
                shutil.rmtree(self.tmp, ignore_errors=True)
                os.makedirs(self.tmp)
            _sync_processes("atomic_dir: folder made")
            return self.tmp
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.dst) + ".tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # a folder like any other, not mkdtemp's private 0700
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        lead = jax.process_index() == 0
        if exc_type is not None:
            if lead:
                shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        _sync_processes("atomic_dir: written")
        if lead:
            if os.path.exists(self.dst):
                shutil.rmtree(self.dst)
            os.replace(self.tmp, self.dst)
        _sync_processes("atomic_dir: renamed")  # no process goes on before the folder is in place
        return False


def _sync_processes(name: str) -> None:
    """A barrier across the processes of a multi-process run (nothing for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def save_state(dst: str, state: nnx.State, config: dict, extra_files: tuple[str, ...] = ()) -> None:
    """Write `state` (orbax) and `config` (JSON) to `dst`; nothing appears at `dst` unless all of it was written.

    `extra_files` (tokenizer, generation config) are copied alongside.
    """
    import orbax.checkpoint as ocp

    with atomic_dir(dst) as tmp:
        if jax.process_index() == 0:  # one writer of the small files; every process writes its own shards below
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump({**config, "dspark_jax_format": FORMAT}, f, indent=2)
            for path in extra_files:
                shutil.copy2(path, tmp)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, PARAMS_DIR), state.to_pure_dict())
            ckptr.wait_until_finished()


def restore_state(src: str, abstract_state: nnx.State, shardings=None, host: tuple = ()) -> nnx.State:
    """Restore a state saved by `save_state` into the structure (and, if given, shardings) of `abstract_state`.

    `host`: tree paths (tuples of keys) restored as numpy arrays in host memory instead of on the device: a draft's
    frozen copies of its target's arrays, read only to be compared with them and then dropped.
    """
    import orbax.checkpoint as ocp

    pure = abstract_state.to_pure_dict()
    if shardings is not None:
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), pure, shardings.to_pure_dict()
        )
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), pure)
    for path in host:  # orbax restores a leaf as the type of its target: a numpy array stays on the host
        node = functools.reduce(lambda d, key: d[key], path[:-1], target)
        node[path[-1]] = np.empty(node[path[-1]].shape, node[path[-1]].dtype)
    path = os.path.abspath(os.path.join(src, PARAMS_DIR))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            _check_stored_shapes(_stored_metadata(ckptr, path, src), target, src)
            restored = ckptr.restore(path, target)
    except DSparkError:
        raise
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise DSparkError(f"orbax checkpoint {src!r} does not match the model: {first_line(e)}") from None
    except Exception as e:  # orbax wraps a failed read of the stored bytes (a damaged or truncated file) in Exception
        _drop_abandoned_reads()
        raise DSparkError(f"orbax checkpoint {src!r} cannot be read: {first_line(e.__cause__ or e)}") from None
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored)
    return state


def _drop_abandoned_reads() -> None:
    """Collect the reads orbax left unfinished when one failed, without the traceback Python would print for each
    of them (at exit, pages of them after the one-line error)."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: None
    try:
        gc.collect()
    finally:
        sys.unraisablehook = hook


def _stored_metadata(ckptr, path: str, src: str):
    """The tree of the stored arrays' metadata; orbax only logs a warning when it cannot read it (damaged files)."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        metadata = ckptr.metadata(path)
    finally:
        log.setLevel(level)
    tree = getattr(metadata, "item_metadata", metadata)
    if tree is None:
        raise DSparkError(f"orbax checkpoint {src!r} cannot be read: the metadata of its arrays is missing or damaged")
    return tree


def _check_stored_shapes(metadata, target, src: str) -> None:
    """The stored arrays' names and shapes (orbax metadata) against the model's, before anything is read: every
    difference in one error, and no read left in flight (orbax's abandoned reads print pages of warnings at exit).
    Dtypes may differ: the restore casts."""

    def shapes(tree):
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): tuple(x.shape) for p, x in leaves}

    stored, wanted = shapes(metadata), shapes(target)
    problems = [f"missing {k}" for k in sorted(wanted.keys() - stored.keys())]
    problems += [f"unexpected {k}" for k in sorted(stored.keys() - wanted.keys())]
    problems += [
        f"{k} stored {list(stored[k])}, model {list(wanted[k])}"
        for k in sorted(wanted.keys() & stored.keys())
        if stored[k] != wanted[k]
    ]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise DSparkError(f"orbax checkpoint {src!r} does not match the model ({len(problems)} problem(s)): {shown}")


def save_calibration(folder: str, temperatures, block_size: int, info: dict | None = None) -> str:
    """Write `calibration.json` into `folder` atomically; returns its path."""
    temps = [float(t) for t in temperatures]
    if len(temps) != block_size or not all(t > 0 for t in temps):
        raise UsageError(f"calibration needs {block_size} positive temperatures, got {temps}")
    path = os.path.join(folder, CALIBRATION_FILE)
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump({"temperatures": temps, **(info or {})}, f, indent=1)
        f.write("\n")
    return path


def load_calibration(folder: str, block_size: int) -> np.ndarray | None:
    """The folder's per-slot temperatures f32[B], or None when it has no calibration.json."""
    path = os.path.join(folder, CALIBRATION_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            temps = json.load(f)["temperatures"]
        temps = np.asarray(temps, np.float32)
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(
            f"{path} is not a calibration file: expected {{'temperatures': [{block_size} numbers]}}"
        ) from None
    if temps.shape != (block_size,) or not np.all(temps > 0):
        raise UsageError(f"{path} holds temperatures {temps.tolist()}; expected {block_size} positive numbers")
    return temps
