"""Shared CLI plumbing: an argparse parser whose errors are one `error: ...` line and exit status 2."""

from __future__ import annotations

import argparse
import sys
import warnings

_SHOWN: set[str] = set()


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one `warning:` line, each text once per process ("" when shown before): the CLIs call the
    library several times for one request (a compiling run, then timed ones), and Python's once-per-location rule
    forgets what it showed whenever the warning filters change, as they do when a subprocess is started by name.
    Formatting, not display: `warnings.catch_warnings(record=True)` still records every warning."""
    text = f"warning: {message}\n"
    if text in _SHOWN:
        return ""
    _SHOWN.add(text)
    return text


def check_output_file(path: str, flag: str) -> None:
    """Refuse, before any work, an output file path that is a folder or whose folder does not exist (the error
    would otherwise come when the finished result is written)."""
    import os

    from dspark_jax.errors import UsageError

    if os.path.isdir(path):
        raise UsageError(f"{flag} {path!r} is a folder; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path!r}: folder {folder} does not exist")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse for the CLIs: a usage error is one `error:` line (exit 2); library warnings print as one
    `warning:` line without a source location (`_one_line_warning`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)  # keep the examples' lines
        super().__init__(*args, **kwargs)
        warnings.formatwarning = _one_line_warning

    def error(self, message: str):  # argparse's default prints the whole usage block first
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


PARALLEL_FLAGS = ("mesh", "coordinator", "num_processes", "process_id", "distributed")


def add_parallel_flags(p: argparse.ArgumentParser, *, mesh: bool = True) -> None:
    """--mesh and the multi-process flags of interfaces.md §4 (mesh=False: the parser has its own --mesh)."""
    if mesh:
        p.add_argument("--mesh", help="data=D,model=M,expert=E over all devices of all processes (default: one device)")
    p.add_argument("--coordinator", help="HOST:PORT of process 0, for one of N cooperating processes")
    p.add_argument("--num-processes", type=int, help="N, with --coordinator and --process-id")
    p.add_argument("--process-id", type=int, help="this process's index in [0, N)")
    p.add_argument(
        "--distributed", choices=("auto",), help="auto: let JAX detect a TPU pod slice / SLURM / Open MPI launch"
    )


def pop_parallel(ns: argparse.Namespace):
    """Take the flags of `add_parallel_flags` off `ns` and return them as a dspark_jax.distributed.Parallel."""
    from dspark_jax.distributed import Parallel

    return Parallel(**{name: vars(ns).pop(name) for name in PARALLEL_FLAGS if name in vars(ns)})


def compile_cache_dir() -> str:
    """Where the CLIs keep XLA's persistent compilation cache: $DSPARK_COMPILE_CACHE, else
    $XDG_CACHE_HOME/dspark_jax/xla (~/.cache/dspark_jax/xla)."""
    import os

    if os.environ.get("DSPARK_COMPILE_CACHE"):
        return os.environ["DSPARK_COMPILE_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dspark_jax/xla")  # one string: a bare "dspark_jax" reads as an import to the layer check


def enable_compile_cache() -> None:
    """Turn on JAX's persistent compilation cache, so a second run of a CLI with the same shapes loads its compiled
    loops from disk instead of compiling them again (the decode loop takes seconds to minutes to compile)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", compile_cache_dir())
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
