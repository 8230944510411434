"""Mesh axes (data, model, expert), logical-axis rules, and the helpers that turn param metadata into shardings."""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dspark_jax.errors import UsageError

MESH_AXES = ("data", "model", "expert")


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis name -> mesh axis (or None = replicated). Params declare logical names once, at creation."""

    batch: str | None = "data"
    vocab: str | None = "model"
    embed: str | None = None
    q_heads: str | None = "model"
    kv_heads: str | None = "model"
    head_dim: str | None = None
    ffw: str | None = "model"
    taps: str | None = None
    rank: str | None = None
    experts: str | None = "expert"

    def mesh_axis(self, logical: str | None) -> str | None:
        if logical is None:
            return None
        if not hasattr(self, logical):
            raise UsageError(
                f"unknown logical axis {logical!r}; accepted: {[f.name for f in dataclasses.fields(self)]}"
            )
        return getattr(self, logical)


def logical_to_spec(axes: tuple[str | None, ...], rules: ShardingRules = ShardingRules()) -> PartitionSpec:
    """PartitionSpec for logical `axes`; two array dims on one mesh axis is a bug in the declaration."""
    physical = [rules.mesh_axis(a) for a in axes]
    used = [p for p in physical if p is not None]
    assert len(used) == len(set(used)), f"logical axes {axes} map two dims onto one mesh axis: {physical}"
    return PartitionSpec(*physical)


def parse_mesh(text: str) -> dict[str, int]:
    """`data=2,model=2` -> {'data': 2, 'model': 2, 'expert': 1}, with one-line errors."""
    sizes = {a: 1 for a in MESH_AXES}
    seen = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in MESH_AXES:
            raise UsageError(f"mesh axis must be one of {MESH_AXES}, got {name!r}")
        if name in seen:
            raise UsageError(f"mesh axis {name} is given twice in {text!r}; give each axis once")
        seen.add(name)
        if not value.isdigit() or int(value) < 1:
            raise UsageError(f"mesh axis {name} needs a positive integer size, got {value!r}")
        sizes[name] = int(value)
    return sizes


def make_mesh(sizes: dict[str, int] | str, devices=None) -> Mesh:
    """A Mesh over ('data', 'model', 'expert') using the first prod(sizes) devices."""
    if isinstance(sizes, str):
        sizes = parse_mesh(sizes)
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    devices = list(devices if devices is not None else jax.devices())
    need = math.prod(shape)
    if need > len(devices):
        raise UsageError(f"mesh {dict(zip(MESH_AXES, shape))} needs {need} devices, only {len(devices)} available")
    return Mesh(np.array(devices[:need]).reshape(shape), MESH_AXES)


def sharding_for(
    name: str,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...] | None,
    mesh: Mesh,
    rules: ShardingRules = ShardingRules(),
) -> NamedSharding:
    """NamedSharding of one param; a mesh axis that does not divide its dimension is a one-line UsageError."""
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    assert len(axes) == len(shape), f"{name}: {len(axes)} logical axes for shape {shape}"
    spec = logical_to_spec(axes, rules)
    for dim, (size, axis) in enumerate(zip(shape, spec)):
        if axis is not None and size % mesh.shape[axis]:
            raise UsageError(
                f"mesh axis {axis}={mesh.shape[axis]} does not divide {name} dim {dim} "
                f"({axes[dim]}={size}); choose a mesh size that divides it"
            )
    return NamedSharding(mesh, spec)


def state_shardings(abstract_state, mesh: Mesh, rules: ShardingRules = ShardingRules()):
    """A pytree of NamedSharding matching an (abstract) nnx.State, from each Variable's `logical_axes`."""
    from flax import nnx

    def one(path, var):
        meta = var.get_metadata()
        value = var.get_value()
        return var.replace(sharding_for("/".join(map(str, path)), value.shape, meta.get("logical_axes"), mesh, rules))

    flat = [(path, one(path, var)) for path, var in abstract_state.flat_state()]
    return nnx.State.from_flat_path(flat)
