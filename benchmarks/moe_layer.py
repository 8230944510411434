"""Time the MoE layer's dispatch variants (layers/moe.py) side by side at V4-Flash expert shapes.

    python benchmarks/moe_layer.py --width-divisor 8 --tokens 1 4 16 64 256 --prefill 1024 --out moe.json

V4-Flash: 256 experts, top-6, expert width I = 2048, hidden H = 4096. `--width-divisor d` divides H and I by d (CPU
runs here use 8); the expert count and top-k stay, so the routing and the sort/gather pattern are those of the full
model. For each token count (decode-sized counts, then the prefill chunk) and each variant, one jitted call of
`experts_ffn` (routing included: router matmul + sqrtsoftplus top-k + bias, as V4 top-k layers do) is compiled,
warmed, then timed `--repeats` times; the median is reported with the compile time. A variant whose working set
would exceed `--max-gib` (gather copies [rows, hidden, ffw] weights; dense runs every expert on every token) is
recorded as skipped with the reason. Prints and writes one JSON object; runs on whatever backend JAX picks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.bench import error_line
from dspark_jax.layers.moe import experts_ffn, route

V4_FLASH = dict(num_experts=256, top_k=6, ffw=2048, hidden=4096)
IMPLS = ("blocked", "ragged", "gather", "dense")


def working_set_gib(impl: str, tokens: int, e: int, k: int, d: int, f: int, itemsize: int) -> float:
    """Rough peak bytes of the variant's intermediates (weights excluded: they are the same for all)."""
    if impl == "gather":
        return 3 * tokens * k * d * f * itemsize / 2**30  # three gathered [rows, d, f] weight copies
    if impl == "dense":
        return (3 * tokens * e * f + tokens * e * d) * 4 / 2**30  # [t, e, f] activations and [t, e, d] outputs
    return (tokens * k * (d + 3 * f)) * 4 / 2**30


def one_run(impl, x, router, bias, gate, up, down, top_k, dtype, repeats) -> dict:
    @jax.jit
    def layer(x, router, bias, gate, up, down):
        logits = jnp.einsum("td,de->te", x, router, preferred_element_type=jnp.float32)
        weights, ids = route(
            logits, top_k=top_k, score_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5, bias=bias
        )
        return experts_ffn(x, weights, ids, gate, up, down, dtype=dtype, swiglu_limit=10.0, impl=impl)

    args = (x, router, bias, gate, up, down)
    start = time.perf_counter()
    compiled = layer.lower(*args).compile()
    compile_s = time.perf_counter() - start
    out = compiled(*args)
    out.block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        compiled(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return {"compile_s": compile_s, "median_s": statistics.median(times), "min_s": min(times), "out": out}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width-divisor", type=int, default=8, help="divide hidden and expert width by this (1 = full)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256], help="decode-sized token counts")
    p.add_argument("--prefill", type=int, default=1024, help="prefill chunk tokens (0 = none)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-gib", type=float, default=4.0, help="skip a variant whose intermediates exceed this")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)

    e, k = V4_FLASH["num_experts"], V4_FLASH["top_k"]
    d, f = V4_FLASH["hidden"] // args.width_divisor, V4_FLASH["ffw"] // args.width_divisor
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    gate, up = (jnp.asarray(rng.standard_normal((e, d, f), np.float32) * d**-0.5, dtype) for _ in range(2))
    down = jnp.asarray(rng.standard_normal((e, f, d), np.float32) * f**-0.5, dtype)
    router = jnp.asarray(rng.standard_normal((d, e), np.float32) * d**-0.5, dtype)
    bias = jnp.asarray(rng.standard_normal(e, np.float32) * 0.1)
    counts = [*args.tokens] + ([args.prefill] if args.prefill else [])
    runs = []
    for t in counts:
        x = jnp.asarray(rng.standard_normal((t, d), np.float32), dtype)
        ref = None
        for impl in args.impls:
            row = {"tokens": t, "rows": t * k, "impl": impl, "phase": "prefill" if t == args.prefill else "decode"}
            gib = working_set_gib(impl, t, e, k, d, f, dtype.itemsize)
            if gib > args.max_gib:
                row["skipped"] = f"intermediates ~{gib:.1f} GiB > --max-gib {args.max_gib}"
                runs.append(row)
                print(json.dumps(row))
                continue
            try:
                r = one_run(impl, x, router, bias, gate, up, down, k, dtype, args.repeats)
            except Exception as err:  # noqa: BLE001 - e.g. XLA:CPU has no bf16 x bf16 -> f32 dot; the rest still run
                row["error"] = error_line(err)
                runs.append(row)
                print(json.dumps(row))
                continue
            out = np.asarray(r.pop("out"), np.float64)
            if ref is None:
                ref = out
            # Every variant computes the same sum: record the disagreement (f32 reassociation only).
            row["rel_diff_vs_first"] = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
            row.update(r)
            runs.append(row)
            print(json.dumps(row))
    best = {}
    for t in counts:
        timed = [r for r in runs if r["tokens"] == t and "median_s" in r]
        if timed:
            best[str(t)] = min(timed, key=lambda r: r["median_s"])["impl"]
    result = {
        "benchmark": "moe_layer",
        "shape": {"num_experts": e, "top_k": k, "hidden": d, "ffw": f, "width_divisor": args.width_divisor},
        "routing": "sqrtsoftplus top-k with selection bias, renormalised, scale 1.5, swiglu_limit 10",
        "dtype": args.dtype,
        "backend": jax.default_backend(),
        "devices": len(jax.devices()),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "repeats": args.repeats,
        "runs": runs,
        "fastest": best,
    }
    text = json.dumps(result, indent=1)
    print(json.dumps({"fastest": best}))
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
