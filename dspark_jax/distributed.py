"""Several cooperating processes (JAX's multi-controller runtime) and the device mesh a CLI runs on.

`Parallel` holds the CLI's --mesh / --coordinator / --num-processes / --process-id / --distributed values; `start()`
calls `jax.distributed.initialize` (before anything touches a JAX backend), builds the mesh over the devices of all
processes and silences stdout on every process but 0 (interfaces.md §4).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

from dspark_jax.errors import UsageError, first_line
from dspark_jax.sharding import MESH_AXES, parse_mesh

_STARTED: dict = {}  # what initialize was called with, so a second start() in the same process is checked, not rerun


@dataclasses.dataclass(frozen=True)
class Parallel:
    """How a CLI spreads over devices and processes.

    mesh: 'data=D,model=M,expert=E' over all devices of all processes (None: one device, no mesh).
    coordinator / num_processes / process_id: one of N processes (jax.distributed.initialize's arguments).
    distributed: 'auto' lets JAX detect a TPU pod slice / SLURM / Open MPI launch; None: single process unless
    the three flags above are given.
    """

    mesh: str | None = None
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed: str | None = None

    def validate(self) -> None:
        """One-line UsageErrors for flag combinations, before anything is initialised."""
        if self.mesh is not None:
            parse_mesh(self.mesh)
        explicit = (self.coordinator, self.num_processes, self.process_id)
        if self.distributed not in (None, "auto"):
            raise UsageError(f"--distributed must be 'auto', got {self.distributed!r}")
        if self.distributed == "auto" and any(v is not None for v in explicit):
            raise UsageError(
                "--distributed auto detects the launch itself; drop --coordinator/--num-processes/--process-id"
            )
        if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
            raise UsageError(
                "--coordinator, --num-processes and --process-id go together; got "
                f"coordinator={self.coordinator!r}, num_processes={self.num_processes!r}, "
                f"process_id={self.process_id!r}"
            )
        if self.coordinator is not None:
            host, _, port = self.coordinator.rpartition(":")
            if not host or not port.isdigit():
                raise UsageError(f"--coordinator must be HOST:PORT, got {self.coordinator!r}")
            if self.num_processes < 1:
                raise UsageError(f"--num-processes must be a positive integer, got {self.num_processes}")
            if not 0 <= self.process_id < self.num_processes:
                raise UsageError(f"--process-id must be in [0, {self.num_processes}), got {self.process_id}")

    @property
    def multi_process(self) -> bool:
        return self.distributed == "auto" or (self.num_processes or 1) > 1

    def start(self):
        """Initialise the runtime (if several processes), silence non-zero processes, return the Mesh or None."""
        self.validate()
        initialize(self)
        import jax

        if self.multi_process:
            _route_stdout(main=jax.process_index() == 0)
        if self.mesh is None:
            if jax.process_count() > 1:
                raise UsageError(
                    f"{jax.process_count()} processes need --mesh over their {jax.device_count()} devices, e.g. "
                    f"--mesh data=1,model={jax.device_count()}"
                )
            return None
        return mesh_over_all_devices(self.mesh)


def initialize(parallel: Parallel) -> None:
    """jax.distributed.initialize with the CLI's values; nothing for a single process. CPU processes talk over gloo."""
    if not parallel.multi_process:
        return
    import jax

    key = (parallel.coordinator, parallel.num_processes, parallel.process_id, parallel.distributed)
    if _STARTED:
        if _STARTED["key"] != key:
            raise UsageError(f"this process already joined a distributed run as {_STARTED['key']}; got {key}")
        return
    # CPU collectives across processes (jax 0.10.2 defaults to gloo already; set it so a changed default cannot
    # silently leave cross-process CPU computations without a transport).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        if parallel.distributed == "auto":
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(
                coordinator_address=parallel.coordinator,
                num_processes=parallel.num_processes,
                process_id=parallel.process_id,
            )
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"jax.distributed.initialize failed for {key}: {first_line(e)}") from None
    _STARTED["key"] = key


def _route_stdout(main: bool) -> None:
    """Only process 0 prints (interfaces.md §4), and its stdout holds only what Python prints (--json stays one
    object): native libraries (gloo logs its connections on file descriptor 1) write to stderr instead, and on
    the other processes to /dev/null. Errors keep going to every process's stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    target = os.dup(2) if main else os.open(os.devnull, os.O_WRONLY)
    os.dup2(target, 1)
    os.close(target)
    if main:
        sys.stdout = os.fdopen(saved, "w", buffering=1, encoding=sys.stdout.encoding or "utf-8")
    else:
        os.close(saved)
        sys.stdout = open(os.devnull, "w")


def mesh_over_all_devices(text: str):
    """A Mesh ('data', 'model', 'expert') whose size is exactly the number of devices of all processes."""
    import jax

    from dspark_jax.sharding import make_mesh

    sizes = parse_mesh(text)
    need, have = math.prod(sizes.values()), jax.device_count()
    shown = ",".join(f"{a}={sizes[a]}" for a in MESH_AXES)
    if need > have:
        raise UsageError(
            f"--mesh {shown} needs {need} devices, only {have} present ({jax.process_count()} process(es))"
        )
    if need != have:
        raise UsageError(
            f"--mesh {shown} covers {need} of the {have} devices; the product of its sizes must equal the device "
            "count (use every device, or hide some with CUDA_VISIBLE_DEVICES / TPU_VISIBLE_CHIPS)"
        )
    return make_mesh(sizes, jax.devices())


def is_main_process() -> bool:
    """True on process 0 (and in a single-process run)."""
    import jax

    return jax.process_index() == 0


__all__ = ["Parallel", "initialize", "is_main_process", "mesh_over_all_devices"]
