"""Would stacking the target's layers under lax.scan pay? A measurement on a stand-in decoder, not the package's model.

    python benchmarks/scan_layers.py --out scan_layers.json

Issue 10 asks to stack the layers and scan them to cut the decode loop's compile time (each compiled target width
inlines every layer), or to show by measurement why not. Doing it in the package changes the parameter tree that
the converter, the exporter, the trainer and the sharding rules address, so this script first measures both sides
on a minimal Qwen3-shaped decoder (RMSNorm, GQA over a KV cache written in place, SwiGLU; no RoPE or q/k norms,
which change neither side's layer count) written twice: a Python loop over per-layer weights (what the package
does) and lax.scan over weights stacked on a leading layer axis, the cache passed per layer as scan input and
output. Each runs `--rounds` decode passes in a fori_loop.

- compile: lower + compile of one decode loop at Qwen3-4B shape (bfloat16, abstract arrays, nothing allocated);
- speed: ms per pass at the embedded target's shape (6 layers, hidden 512, float32), 1 and 8 query rows, both
  variants taking turns in one process, fastest of `--repeats`.

Prints and writes one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

QWEN3_4B = dict(layers=36, hidden=2560, heads=32, kv_heads=8, head_dim=128, mlp=9728, vocab=151936)
TINY_CODE = dict(layers=6, hidden=512, heads=8, kv_heads=2, head_dim=64, mlp=1536, vocab=4096)


def rms(x):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def layer(x, w, k_cache, v_cache, pos, shape):
    """One decoder layer on x f32[b, t, hidden]; k_cache / v_cache [b, kv_heads, cache, head_dim], rows written at
    pos. Matmuls run in the weights' dtype."""
    b, t, _ = x.shape
    nh, kvh, hd = shape["heads"], shape["kv_heads"], shape["head_dim"]
    h = (rms(x) * w["ln1"]).astype(w["q"].dtype)
    q = (h @ w["q"]).reshape(b, t, kvh, nh // kvh, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, -1, hd)
    k = jnp.swapaxes((h @ w["k"]).reshape(b, t, kvh, hd), 1, 2).astype(k_cache.dtype)
    v = jnp.swapaxes((h @ w["v"]).reshape(b, t, kvh, hd), 1, 2).astype(v_cache.dtype)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k, (0, 0, pos, 0))
    v_cache = jax.lax.dynamic_update_slice(v_cache, v, (0, 0, pos, 0))
    scores = jnp.einsum("bkrh,bksh->bkrs", q, k_cache.astype(q.dtype), preferred_element_type=jnp.float32)
    visible = jnp.arange(k_cache.shape[2]) < pos + t
    p = jax.nn.softmax(jnp.where(visible, scores / np.sqrt(hd), -1e30), -1).astype(v_cache.dtype)
    o = jnp.einsum("bkrs,bksh->bkrh", p, v_cache).reshape(b, kvh, nh // kvh, t, hd)
    o = o.transpose(0, 3, 1, 2, 4).reshape(b, t, nh * hd).astype(w["o"].dtype)
    x = x + (o @ w["o"]).astype(jnp.float32)
    h = (rms(x) * w["ln2"]).astype(w["up"].dtype)
    return x + ((jax.nn.silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]).astype(jnp.float32), k_cache, v_cache


def weight_shapes(s) -> dict:
    d, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"]
    return dict(ln1=(d,), q=(d, q), k=(d, kv), v=(d, kv), o=(q, d), ln2=(d,), gate=(d, s["mlp"]), up=(d, s["mlp"]),
                down=(s["mlp"], d))  # fmt: skip


def unrolled(weights, emb, tokens, k_all, v_all, pos, shape):
    """weights: a list of per-layer dicts; k_all / v_all [layers, b, kv_heads, cache, head_dim]."""
    x = emb[tokens].astype(jnp.float32)
    ks, vs = [], []
    for i, w in enumerate(weights):
        x, k, v = layer(x, w, k_all[i], v_all[i], pos, shape)
        ks.append(k)
        vs.append(v)
    return x[:, -1].astype(emb.dtype) @ emb.T, jnp.stack(ks), jnp.stack(vs)


def scanned(weights, emb, tokens, k_all, v_all, pos, shape):
    """weights: one dict of [layers, ...] arrays."""

    def body(x, xs):
        w, k, v = xs
        x, k, v = layer(x, w, k, v, pos, shape)
        return x, (k, v)

    x, (k_all, v_all) = jax.lax.scan(body, emb[tokens].astype(jnp.float32), (weights, k_all, v_all))
    return x[:, -1].astype(emb.dtype) @ emb.T, k_all, v_all


def decode(forward, shape, rounds, weights, emb, tokens, k_all, v_all):
    """`rounds` greedy passes over `tokens`' rows (each pass feeds its argmax back), in one fori_loop."""

    def body(i, carry):
        t, k, v = carry
        logits, k, v = forward(weights, emb, t, k, v, 64 + i, shape)
        return jnp.broadcast_to(jnp.argmax(logits, -1)[:, None], t.shape).astype(jnp.int32), k, v

    return jax.lax.fori_loop(0, rounds, body, (tokens, k_all, v_all))


def arrays(shape, dtype, rows: int, cache: int, make):
    per = [{n: make(s) for n, s in weight_shapes(shape).items()} for _ in range(shape["layers"])]
    stacked = {n: make((shape["layers"], *s)) for n, s in weight_shapes(shape).items()}
    kv = make((shape["layers"], 1, shape["kv_heads"], cache, shape["head_dim"]))
    tokens = (
        jax.ShapeDtypeStruct((1, rows), jnp.int32)
        if isinstance(kv, jax.ShapeDtypeStruct)
        else jnp.ones((1, rows), jnp.int32)
    )
    return {"unrolled": per, "scanned": stacked}, make((shape["vocab"], shape["hidden"])), tokens, kv


def compile_times(rows: int, rounds: int) -> list[dict]:
    weights, emb, tokens, kv = arrays(
        QWEN3_4B, jnp.bfloat16, rows, 1024, lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    )
    out = []
    for name, forward in (("unrolled", unrolled), ("scanned", scanned)):
        fn = jax.jit(lambda w, e, t, k, v, f=forward: decode(f, QWEN3_4B, rounds, w, e, t, k, v))
        begin = time.perf_counter()
        lowered = fn.lower(weights[name], emb, tokens, kv, kv)
        mid = time.perf_counter()
        lowered.compile()
        seconds = dict(lower_s=mid - begin, compile_s=time.perf_counter() - mid)
        out.append(dict(shape="qwen3-4b", rows=rows, loop=name, **seconds))
    return out


def speeds(rows_list, rounds: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)

    def make(s):
        return jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02)

    runs = {}
    for rows in rows_list:
        weights, emb, tokens, kv = arrays(TINY_CODE, jnp.float32, rows, 256, make)
        kv = jnp.zeros_like(kv)
        for name, forward in (("unrolled", unrolled), ("scanned", scanned)):
            fn = jax.jit(lambda w, e, t, k, v, f=forward: decode(f, TINY_CODE, rounds, w, e, t, k, v))
            jax.block_until_ready(fn(weights[name], emb, tokens, kv, kv))  # compile
            runs[(rows, name)] = (fn, (weights[name], emb, tokens, kv, kv), [])
    for _ in range(repeats):  # every variant once per pass: all see the same machine
        for fn, args, times in runs.values():
            begin = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append((time.perf_counter() - begin) / rounds * 1e3)
    return [
        dict(shape="tiny_code target", rows=rows, loop=name, ms_per_pass=min(t), ms_median=float(np.median(t)))
        for (rows, name), (_, _, t) in runs.items()
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out")
    args = p.parse_args()
    report = {
        "command": "python benchmarks/scan_layers.py" + (f" --out {os.path.basename(args.out)}" if args.out else ""),
        "machine": {
            "backend": jax.default_backend(),
            "cpu": platform.processor(),
            "nproc": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "jax": jax.__version__,
        },  # fmt: skip
        "compile": compile_times(8, 4),
        "speed": speeds((1, 8), args.rounds, args.repeats),
    }
    for row in report["compile"] + report["speed"]:
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
