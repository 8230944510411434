"""Does the weights' layout decide a decode pass's speed on this backend? Products, then the loop.

    python benchmarks/decode_layout.py --shape qwen3-4b --out layout.json      (on a GPU)
    python benchmarks/decode_layout.py --shape tiny --out layout.json          (CPU smoke run)

Why: on an H200 (2026-12-04) the Qwen3-4B-shape target took 5.5 ms for one row per pass but 3.1 ms for eight
(`bench` split), so the one-row products, not the weights' bytes, set plain decoding's speed there. Two parts:

- products: a chain of `--layers` Qwen3 layers' seven products (q, k, v, o, gate, up, down; random bf16 weights)
  at 1, 8, 32 and 256 rows, the kernels stored in-major ([in, out], as declared) or out-major ([out, in], the CPU
  decode copy's layout), each compiled on its own: ms per chain and the weights' GB/s;
- loop: `generate` on the random pair of that shape at batch 1, plain then speculative, each in both layouts:
  tokens/s, and whether a layout changes plain greedy tokens (bf16 products summed in another order can flip a
  near-tie of random weights; speculative = plain holds per layout, tests/test_loop.py).

Prints and writes one JSON object, rewritten after every measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp

from dspark_jax import bench
from dspark_jax.decoding.pieces import median_seconds
from dspark_jax.layers import linear
from dspark_jax.loading import out_major_parts

ROWS = (1, 8, 32, 256)
LAYOUTS = ("in-major", "out-major")


def product_chain(
    layers: int, hidden: int, q: int, kv: int, ffw: int, dtype, out_major: bool, fused: bool = False, reduce=False
):
    """(fn(x, weights) -> x, weights): `layers` layers of a Qwen3 layer's products, dependent on each other. fused:
    q/k/v and gate/up as one kernel each (four kernels a layer instead of seven); reduce: each product as a
    multiply-reduce (`linear._row_product` / `_in_major_product`) instead of a dot."""
    if fused:
        shapes = {"qkv": (hidden, q + 2 * kv), "o": (q, hidden), "gate_up": (hidden, 2 * ffw), "down": (ffw, hidden)}
    else:
        shapes = {"q": (hidden, q), "k": (hidden, kv), "v": (hidden, kv), "o": (q, hidden)}
        shapes |= {"gate": (hidden, ffw), "up": (hidden, ffw), "down": (ffw, hidden)}
    keys = iter(jax.random.split(jax.random.key(0), len(shapes) * layers))
    weights = [
        {
            n: (0.02 * jax.random.normal(next(keys), s[::-1] if out_major else s)).astype(dtype)
            for n, s in shapes.items()
        }
        for _ in range(layers)
    ]
    spec = "mk,nk->mn" if out_major else "mk,kn->mn"

    def mm(x, w):
        if reduce:
            y = linear._row_product(x, w) if out_major else linear._in_major_product(x, w)
        else:
            y = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
        return y.astype(dtype)

    @jax.jit
    def chain(x, weights):
        for w in weights:
            if fused:
                qkv = mm(x, w["qkv"])
                a = qkv[:, :q] + jnp.tile(qkv[:, q : q + kv] + qkv[:, q + kv :], (1, q // kv))
            else:
                a = mm(x, w["q"]) + jnp.tile(mm(x, w["k"]) + mm(x, w["v"]), (1, q // kv))
            h = x + mm(a, w["o"])
            if fused:
                gu = mm(h, w["gate_up"])
                g, u = gu[:, :ffw], gu[:, ffw:]
            else:
                g, u = mm(h, w["gate"]), mm(h, w["up"])
            x = h + mm(jax.nn.silu(g) * u, w["down"])
        return x

    return chain, weights


def time_call(fn, *args, repeats: int) -> tuple[float, float]:
    """(compile + first call seconds, median seconds of `repeats` calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    return first, median_seconds(fn, lambda: args, repeats)


def shape_arguments(description: str) -> argparse.ArgumentParser:
    """A parser with the options this script shares with gpu_step.py: shape, chain layers, repeats, new tokens."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shape", choices=sorted(bench.RANDOM_SHAPES), default="qwen3-4b")
    p.add_argument("--layers", type=int, default=12, help="layers in the product chain")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> int:
    p = shape_arguments(__doc__.splitlines()[0])
    p.add_argument("--skip-loop", action="store_true")
    p.add_argument("--out", default="decode_layout.json")
    args = p.parse_args(argv)
    import dspark_jax as dj

    t = bench.RANDOM_SHAPES[args.shape]["target"]
    hidden, ffw = t["hidden_size"], t["intermediate_size"]
    q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    dtype = jnp.bfloat16
    report = {"machine": bench.machine_info(), "shape": args.shape, "layers": args.layers, "products": [], "loop": {}}

    def save():
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)

    for out_major in (False, True):
        chain, weights = product_chain(args.layers, hidden, q, kv, ffw, dtype, out_major)
        nbytes = sum(w.nbytes for layer in weights for w in layer.values())
        for rows in ROWS:
            x = jax.random.normal(jax.random.key(rows), (rows, hidden), dtype)
            first, med = time_call(chain, x, weights, repeats=args.repeats)
            row = {"layout": "out-major" if out_major else "in-major", "rows": rows, "ms": med * 1e3}
            row |= {"weights_gb_per_s": nbytes / med / 1e9, "first_call_s": first}
            report["products"].append(row)
            print(json.dumps(row), flush=True)
            save()
        del weights

    if not args.skip_loop:
        target, draft = bench.random_pair(args.shape, "bfloat16", 0)
        prompts = [list(range(1, 65))]
        kw = {"max_new_tokens": args.max_new_tokens, "temperature": 0.0}
        runs = [(f"{kind} {layout}", d) for kind, d in (("plain", None), ("speculative", draft)) for layout in LAYOUTS]
        for name, d in runs:
            # The handles' decode parts set by hand: the loop runs what `decode_parts` returns.
            layout = out_major_parts if "out-major" in name else lambda g, s: (g, s)
            target._decode = layout(target.graphdef, target.state)
            if d is not None:
                d._decode = layout(d.graphdef, d.state)
            start = time.perf_counter()
            dj.generate(target, d, prompts, **kw)
            first = time.perf_counter() - start
            results = [dj.generate(target, d, prompts, **kw) for _ in range(3)]
            sec = statistics.median(r.seconds for r in results)
            entry = {"tokens_per_s": results[0].new_tokens / sec, "first_call_s": first, "tau": results[0].tau}
            entry["tokens"] = results[0].tokens[0]
            report["loop"][name] = entry
            print(name, json.dumps({k: v for k, v in entry.items() if k != "tokens"}), flush=True)
            save()
        for layout in LAYOUTS:
            same = report["loop"][f"plain {layout}"]["tokens"] == report["loop"][f"speculative {layout}"]["tokens"]
            report["loop"][f"speculative_equals_plain {layout}"] = same
        plain = [report["loop"][f"plain {layout}"]["tokens"] for layout in LAYOUTS]
        report["loop"]["same_tokens_plain"] = plain[0] == plain[1]
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
