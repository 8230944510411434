"""Which of equivalent forms of a CPU product runs fastest on this machine: timed once, remembered on disk.

Why measure: the same product (one row times a compact out-major kernel, layers/linear.py) runs fastest in a
different form on different CPUs. On 2-core AMD EPYCs (AVX2, and Zen 5 with AVX-512; L3 32 MiB) the isolated
multiply-reduce was chosen, a dot with the kernel's widening in it having run 3-8x slower (benchmarks/RESULTS.md,
session 8). On a 2-core Xeon with AVX-512 and AMX (L3 300 MiB, session 24) the multiply-reduce took 98 us on a
[1536, 512] kernel, and a dot over the kernel widened and transposed to [in, out] inside the same conditional 65 us;
plain decoding of the embedded pair ran 2.24 instead of 3.34 ms a step with it. A rule written on one machine is
wrong on the next, so each machine times the candidates the first time a product of that shape is traced.

What is timed: a chain of copies of the kernel, each product waiting for the one before, streaming up to
STREAM_BYTES of weights as a decode pass does (one kernel alone would sit in L2). On the Xeon above this chain ranked
the forms as the decode loop did (a chain of 16 kernels: 98 / 65 us; the loop: 3.34 / 2.24 ms a step).

Where it is kept: a JSON file ($DSPARK_PRODUCT_FORMS, else $XDG_CACHE_HOME/dspark_jax/product_forms.json), one
section per machine (CPU model, core count, jax version), replaced whole through a temporary file; an unreadable
file is ignored and rewritten. A choice changes only the order in which the same products are summed.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

STREAM_BYTES = 32 << 20  # weights a timing chain streams, at most (a decode pass streams its whole model)
MAX_COPIES = 16  # ... in at most this many kernel copies (each one more product to compile)
REPEATS = 5  # timed runs of a chain; the fastest counts (the machine's noise only ever adds time)

_chosen: dict[str, str] = {}  # this process's choices, by key


def choose(key: str, candidates: tuple[str, ...], timer: Callable[[str], Callable[[], float]]) -> str:
    """The fastest of `candidates` (names of forms) for `key`: remembered in this process, else read from this
    machine's section of the file, else timed and written there. `timer(name)` compiles a form and returns a
    function that runs it once and returns seconds per product; the candidates take turns, REPEATS runs each, so a
    burst of load on the machine slows them alike, and each keeps its fastest run. One candidate is returned as it
    is."""
    if len(candidates) == 1:
        return candidates[0]
    if key not in _chosen:
        stored = _load().get(machine(), {}).get(key)
        if stored in candidates:
            _chosen[key] = stored
        else:
            with jax.ensure_compile_time_eval():  # called while a loop is traced: run the timings now, for real
                runs = {name: timer(name) for name in candidates}
                best = dict.fromkeys(candidates, math.inf)
                for _ in range(REPEATS):
                    for name in candidates:
                        best[name] = min(best[name], runs[name]())
            _chosen[key] = min(best, key=best.get)
            _store(key, _chosen[key])
    return _chosen[key]


def product_timer(product: Callable, rows: int, shape: tuple[int, int], w_dtype, x_dtype) -> Callable[[], float]:
    """product(x [rows, k], w [n, k]) compiled into a chain of kernel copies (module docstring): a function that runs
    the chain once and returns the seconds per product."""
    n, k = shape
    copies = int(np.clip(STREAM_BYTES // (n * k * jnp.dtype(w_dtype).itemsize), 2, MAX_COPIES))
    kernels = [jnp.full(shape, 0.01 * (i + 1), w_dtype) for i in range(copies)]  # values do not change the speed
    x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, k)), x_dtype)

    @jax.jit
    def chain(x, kernels):
        for w in kernels:  # each product needs the one before, as in a pass
            x = x + (1e-30 * jnp.sum(product(x, w), axis=-1, keepdims=True)).astype(x.dtype)
        return x

    jax.block_until_ready(chain(x, kernels))  # compiles

    def run() -> float:
        start = time.perf_counter()
        jax.block_until_ready(chain(x, kernels))
        return (time.perf_counter() - start) / copies

    return run


def path() -> str:
    """The file of measured choices: $DSPARK_PRODUCT_FORMS, else $XDG_CACHE_HOME/dspark_jax/product_forms.json."""
    if os.environ.get("DSPARK_PRODUCT_FORMS"):
        return os.environ["DSPARK_PRODUCT_FORMS"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dspark_jax/product_forms.json")  # one string: a bare "dspark_jax" reads as an import


@functools.cache
def machine() -> str:
    """This machine's section: its CPU model, core count and jax version (XLA's kernels change with it); read once
    per process (a choice and its store ask for it several times)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} | {os.cpu_count()} cores | jax {jax.__version__}"


def _load() -> dict[str, dict]:
    try:
        with open(path()) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return {m: s for m, s in data.items() if isinstance(s, dict)} if isinstance(data, dict) else {}


def _store(key: str, name: str) -> None:
    """Add key -> name to this machine's section: a temporary file beside the old one, renamed over it."""
    data = _load()
    data[machine()] = {**data.get(machine(), {}), key: name}
    folder = os.path.dirname(path()) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".product_forms-")
    except OSError:  # a read-only home: the choice holds for this process only
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path())
    except OSError:
        os.unlink(tmp)
