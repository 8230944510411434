"""Files of a checkpoint folder: orbax save/restore of an nnx.State (plus its config.json), written atomically and
restored into target shardings, and a draft's `calibration.json` (per-slot confidence temperatures, spec §10)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile

import jax
import numpy as np
from flax import nnx

from dspark_jax.errors import DSparkError, UsageError

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
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.dst) + ".tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.dst):
            shutil.rmtree(self.dst)
        os.replace(self.tmp, self.dst)
        return False


def save_state(dst: str, state: nnx.State, config: dict, extra_files: tuple[str, ...] = ()) -> None:
    """Write `state` (orbax) and `config` (JSON) to `dst`; nothing appears at `dst` unless all of it was written.

    `extra_files` (tokenizer, generation config) are copied alongside.
    """
    import orbax.checkpoint as ocp

    with atomic_dir(dst) as tmp:
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
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.abspath(os.path.join(src, PARAMS_DIR)), target)
    except (ValueError, KeyError, FileNotFoundError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DSparkError(f"orbax checkpoint {src!r} does not match the model: {msg}") from None
    state = jax.tree.map(lambda x: x, abstract_state)
    nnx.replace_by_pure_dict(state, restored)
    return state


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
