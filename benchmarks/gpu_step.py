"""Where plain decoding's step goes on an accelerator, and what cuts it: products, loop and a kernel profile.

    python benchmarks/gpu_step.py --shape qwen3-4b --out gpu_step.json                 (on a GPU)
    XLA_FLAGS=... python benchmarks/gpu_step.py --shape qwen3-4b --quick --out f.json  (one flag set, fewer parts)
    python benchmarks/gpu_step.py --shape tiny --out gpu_step.json                      (CPU smoke run)

Why: on an H200 (2026-12-04, session 16) plain decoding at Qwen3-4B shape reached 0.32 of the HBM roofline at
batch 1: a 5.3 ms step for 8 GB of weights, and a chain of 12 layers' one-row products streamed 1.06 TB/s. Either
the products' kernels are slow at one row or the step is many small kernels with gaps between them. Parts:

- read: the bandwidth of a plain reduction over 2 GiB (what one streaming kernel reaches here);
- products: `--layers` layers' products (random bf16, in-major as declared) at 1 and 8 rows, as dots and as
  multiply-reduces (`linear._in_major_product`), each with seven kernels a layer (q, k, v, o, gate, up, down) and
  with q/k/v and gate/up fused into one kernel each (four a layer): ms per chain and the weights' GB/s;
- loop: `generate` on the random pair of that shape at batch 1 with `linear.ACCEL_REDUCE_ROWS` set to each
  candidate (dots everywhere; the one-row products as multiply-reduces; 1-8 rows), plain and speculative: tokens/s,
  and whether the tokens change (they may: bf16 near-ties of random weights);
- profile (not with --quick): one plain generate per product form under jax.profiler, summarised here: kernels per
  step, kernel time per step against wall time per step, the kernels that take the most time. Profiling turns XLA's
  command buffers (CUDA graphs) off, so the kernel count is what a step launches without them.

Prints and writes one JSON object, rewritten after every measurement.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from decode_layout import product_chain, shape_arguments, time_call  # a sibling script: benchmarks/ is on sys.path

from dspark_jax import bench
from dspark_jax.decoding.pieces import median_seconds
from dspark_jax.layers import linear

ROWS = (1, 8)
# ACCEL_REDUCE_ROWS candidates for the loop: dots everywhere, one-row products reduced, 1-8 rows reduced.
LOOP_FORMS = {"dot": (1, 0), "reduce 1": (1, 1), "reduce 1-8": (1, 8)}
SPECULATIVE_FORMS = ("dot", "reduce 1-8")  # what a round's 8-row verify pass and draft block would run


def read_bandwidth(nbytes: int, repeats: int) -> dict:
    """GB/s of one reduction over `nbytes` of bf16 (read only)."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    med = median_seconds(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), lambda: (x,), repeats)
    return {"bytes": nbytes, "ms": med * 1e3, "gb_per_s": nbytes / med / 1e9}


def profile_summary(trace_dir: str, steps: int, top: int = 15) -> dict:
    """Kernels on the device planes of the newest trace in `trace_dir`: count and time per step, busy fraction of
    the traced span, and the `top` kernels by total time. Falls back to the planes' names when none is a device."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))
    data = ProfileData.from_file(files[-1])
    planes = {p.name: sum(1 for line in p.lines for _ in line.events) for p in data.planes}
    by_name = collections.defaultdict(lambda: [0, 0.0])
    count, busy_ns, lines, first, last = 0, 0.0, collections.Counter(), None, None
    device_lines = {}  # every line of the device planes: events, ms (names vary between profiler versions)
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            events = list(line.events)
            device_lines[f"{plane.name} {line.name}"] = [len(events), sum(e.duration_ns for e in events) / 1e6]
            if not line.name.startswith("Stream"):  # kernel and memcpy events live on the stream lines
                continue
            for e in events:
                count += 1
                busy_ns += e.duration_ns
                lines[line.name] += 1
                by_name[e.name][0] += 1
                by_name[e.name][1] += e.duration_ns
                first = e.start_ns if first is None else min(first, e.start_ns)
                last = e.start_ns + e.duration_ns if last is None else max(last, e.start_ns + e.duration_ns)
    ranked = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return {
        "planes": planes,
        "device_lines": device_lines,
        "stream_lines": dict(lines),
        "kernels": count,
        "kernels_per_step": count / steps,
        "kernel_ms_per_step": busy_ns / steps / 1e6,
        "span_ms": None if first is None else (last - first) / 1e6,
        "busy_fraction_of_span": None if first is None else busy_ns / max(last - first, 1),
        "top": [
            {"name": n[:160], "count": c, "total_ms": t / 1e6, "mean_us": t / c / 1e3, "per_step": c / steps}
            for n, (c, t) in ranked
        ],
    }


def main(argv: list[str] | None = None) -> int:
    p = shape_arguments(__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="seven-kernel products and the plain loop only, no profile")
    p.add_argument("--out", default="gpu_step.json")
    args = p.parse_args(argv)
    import dspark_jax as dj

    t = bench.RANDOM_SHAPES[args.shape]["target"]
    hidden, ffw = t["hidden_size"], t["intermediate_size"]
    q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    report = {"machine": bench.machine_info(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "shape": args.shape}
    report |= {"layers": args.layers, "read": None, "products": [], "loop": {}, "profile": {}}

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    report["read"] = read_bandwidth((2 << 30) if jax.default_backend() != "cpu" else (64 << 20), args.repeats)
    print("read", json.dumps(report["read"]), flush=True)
    save()

    for fused in (False,) if args.quick else (False, True):
        for reduce in (False, True):
            chain, weights = product_chain(args.layers, hidden, q, kv, ffw, jnp.bfloat16, False, fused, reduce)
            nbytes = sum(w.nbytes for layer in weights for w in layer.values())
            for rows in ROWS:
                x = jax.random.normal(jax.random.key(rows), (rows, hidden), jnp.bfloat16)
                first, med = time_call(chain, x, weights, repeats=args.repeats)
                row = {"kernels": "fused" if fused else "seven", "form": "reduce" if reduce else "dot", "rows": rows}
                row |= {"ms": med * 1e3, "weights_gb_per_s": nbytes / med / 1e9, "first_call_s": first}
                report["products"].append(row)
                print(json.dumps(row), flush=True)
                save()
            del weights, chain

    target, draft = bench.random_pair(args.shape, "bfloat16", 0)
    prompts = [list(range(1, 65))]
    kw = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    forms = {"dot": LOOP_FORMS["dot"], "reduce 1": LOOP_FORMS["reduce 1"]} if args.quick else LOOP_FORMS
    runs = [(f"plain {f}", None, f) for f in forms if f != "reduce 1-8"]
    runs += [] if args.quick else [(f"speculative {f}", draft, f) for f in SPECULATIVE_FORMS]
    for name, d, form in runs:
        linear.ACCEL_REDUCE_ROWS = forms[form]
        jax.clear_caches()  # a compiled loop keeps the products it was traced with
        try:
            start = time.perf_counter()
            dj.generate(target, d, prompts, **kw)
            first = time.perf_counter() - start
            results = [dj.generate(target, d, prompts, **kw) for _ in range(3)]
        except Exception as e:  # recorded; the next form still runs
            report["loop"][name] = {"error": bench.error_line(e)}
            print(name, report["loop"][name], flush=True)
            save()
            continue
        sec = statistics.median(r.seconds for r in results)
        entry = {"tokens_per_s": results[0].new_tokens / sec, "step_ms": sec / results[0].new_tokens * 1e3}
        entry |= {"first_call_s": first, "tau": results[0].tau, "tokens": results[0].tokens[0]}
        report["loop"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "tokens"}), flush=True)
        save()
        if d is None and not args.quick:
            with tempfile.TemporaryDirectory() as trace_dir:
                try:
                    with jax.profiler.trace(trace_dir):
                        r = dj.generate(target, d, prompts, **kw)
                    report["profile"][name] = profile_summary(trace_dir, r.new_tokens)
                    report["profile"][name]["wall_ms_per_step"] = r.seconds / r.new_tokens * 1e3
                except Exception as e:
                    report["profile"][name] = {"error": bench.error_line(e)}
            prof = report["profile"][name]
            print(name, "profile", json.dumps({k: v for k, v in prof.items() if k != "top"}), flush=True)
            save()
    plain = {k: v.get("tokens") for k, v in report["loop"].items()}
    report["same_tokens_as_dot"] = {k: v == plain.get("plain dot") for k, v in plain.items() if v}
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
