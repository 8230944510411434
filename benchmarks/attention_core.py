"""Time the package's cache attention against `jax.nn.dot_product_attention` (XLA and cuDNN) at decode shapes.

    python benchmarks/attention_core.py --shape qwen3-4b --out attention.json      (on a GPU)
    python benchmarks/attention_core.py --shape tiny --out attention.json          (CPU smoke run)

Each case is a verify-like read of a stacked cache: `t` query rows at the end of a prefix of `valid` slots (row i sees
slots < valid - t + 1 + i) in a cache of `cache_len` slots, for every layer of a [layers, batch, kv_heads, cache_len,
head_dim] cache in one `fori_loop` (so one call moves as many bytes as a decode pass's attention, and launch overhead
is the loop's, not the host's). Variants:

- `dspark`: layers/attention.cache_attention + finish (dense pass up to DENSE_CACHE_MAX slots, else key blocks that
  stop at the largest limit), the cache heads-major as the package stores it; `dspark@N` (`--key-blocks N ...`):
  the same with key blocks of N slots (N >= cache_len: one dense pass), on caches longer than DENSE_CACHE_MAX;
- `xla`: jax.nn.dot_product_attention(implementation="xla") with a bool mask, the cache [batch, slots, heads, dim];
- `cudnn`: the same with implementation="cudnn", the visibility given as is_causal + key_value_seq_lengths (cuDNN
  takes no general mask): `rel_l2_err` against `dspark` says whether its causal diagonal is aligned as the verify
  pass needs (bottom-right), so a fast but wrong variant shows as such.

Reports per case and variant the median ms per call, the bytes of valid cache read per second, the compile time and
the relative L2 error against `dspark`; a variant that fails records its error. Prints and writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.bench import error_line
from dspark_jax.decoding.pieces import median_seconds
from dspark_jax.layers.attention import DENSE_CACHE_MAX, cache_attention, finish, group_queries

SHAPES = {  # q_heads, kv_heads, head_dim, layers; cases: (batch, t, cache_len, valid)
    "qwen3-4b": dict(
        heads=(32, 8, 128),
        layers=36,
        cases=[
            (1, 8, 2048, 1536),
            (32, 8, 2048, 1536),
            (1, 8, 32768, 30000),
            (1, 1, 32768, 30000),
            (32, 1, 2048, 1536),
            (1, 512, 32768, 30000),  # a prefill chunk late in a long prompt
        ],
    ),
    "tiny": dict(heads=(4, 2, 32), layers=2, cases=[(1, 8, 256, 200), (4, 8, 256, 200), (1, 8, 4096, 3000)]),
}
VARIANTS = ("dspark", "xla", "cudnn")


def limits_of(batch: int, t: int, valid: int) -> jax.Array:
    """i32[batch, t]: row i of a verify block sees slots < valid - t + 1 + i."""
    return jnp.broadcast_to(valid - t + 1 + jnp.arange(t, dtype=jnp.int32), (batch, t))


def build(variant: str, layers: int, t: int, valid: int, scale: float):
    """A jitted fn(q [b, t, n, h], k, v) -> f32[b, t, n, h] summed over layers (so no layer's work is dead)."""
    if variant.startswith("dspark"):
        key_block = int(variant.split("@")[1]) if "@" in variant else None

        def one(q, k_all, v_all, layer):
            lim = limits_of(q.shape[0], t, valid)
            qg = group_queries(q, k_all.shape[2])
            return finish(cache_attention(qg, k_all, v_all, layer, lim, scale, key_block), q.dtype)
    else:

        def one(q, k_all, v_all, layer):
            k, v = k_all[layer], v_all[layer]  # [b, s, kv_heads, h]
            b, s = q.shape[0], k.shape[1]
            if variant == "xla":
                mask = jnp.arange(s)[None, :] < limits_of(b, t, valid)[..., None]  # [b, t, s]
                return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], scale=scale, implementation="xla")
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                scale=scale,
                is_causal=True,
                query_seq_lengths=jnp.full((b,), t, jnp.int32),
                key_value_seq_lengths=jnp.full((b,), valid, jnp.int32),
                implementation="cudnn",
            )

    @jax.jit
    def run(q, k_all, v_all):
        body = lambda i, acc: acc + one(q, k_all, v_all, i).astype(jnp.float32)  # noqa: E731
        return jax.lax.fori_loop(0, layers, body, jnp.zeros(q.shape, jnp.float32))

    return run


def time_variant(variant, q, k_all, v_all, layers, t, valid, repeats) -> tuple[dict, np.ndarray | None]:
    """Compile, run once (the output, to compare), time `repeats` calls; the error instead when it fails."""
    ours = variant.startswith("dspark")
    if not ours:  # the layout jax.nn.dot_product_attention takes: [layers, b, slots, kv_heads, h]
        k_all, v_all = jnp.swapaxes(k_all, 2, 3), jnp.swapaxes(v_all, 2, 3)
    fn = build(variant, layers, t, valid, q.shape[-1] ** -0.5)
    try:
        start = time.perf_counter()
        compiled = fn.lower(q, k_all, v_all).compile()
        compile_s = time.perf_counter() - start
        out = np.asarray(compiled(q, k_all, v_all))
        ms = median_seconds(compiled, lambda: (q, k_all, v_all), repeats) * 1e3
    except Exception as e:  # noqa: BLE001 - a variant this backend lacks is recorded, the others still run
        return {"error": error_line(e)}, None
    kv_heads = k_all.shape[2 if ours else 3]
    valid_bytes = 2 * layers * q.shape[0] * kv_heads * valid * q.shape[-1] * q.dtype.itemsize  # K and V, read once
    return {"ms": ms, "compile_s": compile_s, "valid_cache_gb_per_s": valid_bytes / (ms * 1e-3) / 1e9}, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-4b")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--key-blocks", type=int, nargs="*", default=[4096, 8192, 32768], help="dspark@N variants")
    p.add_argument("--out", default="attention_core.json")
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    n, kh, h = shape["heads"]
    layers = shape["layers"]
    dtype = jnp.dtype(args.dtype)
    report = {
        "command": "python benchmarks/attention_core.py " + " ".join(argv if argv is not None else []),
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "shape": args.shape,
        "heads": [n, kh, h],
        "layers": layers,
        "dtype": args.dtype,
        "cases": [],
    }
    for i, (batch, t, cache_len, valid) in enumerate(shape["cases"]):
        case = {"batch": batch, "t": t, "cache_len": cache_len, "valid": valid, "variants": {}}
        report["cases"].append(case)
        kq, kk, kv = jax.random.split(jax.random.key(i), 3)
        q = jax.random.normal(kq, (batch, t, n, h), dtype)
        # Drawn on the device (GBs at 4B shape). Slots past `valid` hold large values: a variant that reads them
        # unmasked shows as an error.
        cache = (layers, batch, kh, cache_len, h)
        k_all, v_all = (jax.random.normal(key, cache, dtype).at[..., valid:, :].set(30.0) for key in (kk, kv))
        ref = None  # the first variant that ran (dspark unless it failed or was left out)
        long_cache = cache_len > DENSE_CACHE_MAX and "dspark" in args.variants
        blocks = [f"dspark@{size}" for size in args.key_blocks] if long_cache else []
        for variant in args.variants + blocks:
            entry, out = time_variant(variant, q, k_all, v_all, layers, t, valid, args.repeats)
            if out is not None and ref is None:
                ref, case["reference"] = out, variant
            elif out is not None:
                entry["rel_l2_err"] = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
            case["variants"][variant] = entry
            print(f"b{batch} t{t} cache {cache_len} valid {valid} {variant}: {json.dumps(entry)}", flush=True)
            with open(args.out, "w") as f:
                json.dump(report, f, indent=1)
        del k_all, v_all
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
