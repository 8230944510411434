"""Lower + compile time of the decode loop at a full model shape, with abstract parameters (nothing allocated).

    python benchmarks/compile_time.py --shape qwen3-4b --batch 1 --policies plain full threshold --out compile.json

Prints and writes one JSON object: seconds to lower and to compile prefill and the round loop per verify policy
(plain decoding, `full` = one target width, `threshold` = the widths 1, 2, 4, ..., block + 1 in one loop), and the
size of the optimised HLO. Shapes: bench's random Qwen3 pairs, or a DeepSeek-V4 -DSpark checkpoint's (its committed
manifest's config: the target and its three-stage draft). Runs on whatever backend JAX picks (CPU here; the compile
on a GPU differs).
"""

from __future__ import annotations

import argparse
import json
import time

import jax

from conversion.loader import abstract_model
from conversion.reader import load_manifest
from dspark_jax.bench import RANDOM_SHAPES, random_pair_configs
from dspark_jax.configs import DeepseekV4Config, DeepseekV4DraftConfig
from dspark_jax.decoding import loop
from dspark_jax.loading import DraftHandle, Target
from dspark_jax.models import Draft, Qwen3
from dspark_jax.models.deepseek_v4 import DeepseekV4
from dspark_jax.models.deepseek_v4_draft import DeepseekV4Draft

V4_SHAPES = {"deepseek-v4-flash": "deepseek-v4-flash-dspark", "deepseek-v4-pro": "deepseek-v4-pro-dspark"}


def abstract_pair(shape: str, dtype: str):
    """(Target, DraftHandle) whose states are abstract arrays (jax.ShapeDtypeStruct) at `shape`."""
    if shape in V4_SHAPES:
        manifest = load_manifest(V4_SHAPES[shape])
        tcfg = DeepseekV4Config.from_hf_dict(manifest["config"], shape).with_dtype(dtype)
        dcfg = DeepseekV4DraftConfig.from_hf_dict(manifest["config"], shape, model=tcfg).with_dtype(dtype)
        target_cls, draft_cls = DeepseekV4, DeepseekV4Draft
    else:
        tcfg, dcfg = random_pair_configs(shape, dtype)
        target_cls, draft_cls = Qwen3, Draft
    tdef, tstate = abstract_model(target_cls, tcfg)
    ddef, dstate = abstract_model(draft_cls, dcfg)
    return Target(tcfg, tdef, tstate, shape), DraftHandle(dcfg, ddef, dstate, shape)


def measure(target, draft, batch: int, prompt_len: int, max_new: int, verify: str) -> dict:
    prompts = [[1] * prompt_len] * batch
    prep = loop.prepare(target, draft, prompts, max_new_tokens=max_new, verify=verify)
    ddef, dstate = (None, None) if draft is None else (draft.graphdef, draft.state)
    args = (
        target.graphdef,
        target.state,
        ddef,
        dstate,
        *map(jax.numpy.asarray, (prep.prompts, prep.prompt_lens, prep.limits)),
        prep.keys,
        *map(jax.numpy.asarray, (prep.stop_ids, prep.thresholds)),
        jax.tree.map(jax.numpy.asarray, prep.sampling),
    )
    out = {"verify": verify if draft is not None else "plain", "cache_len": prep.spec.cache_len}
    start = time.perf_counter()
    lowered = loop.prefill.lower(*args, spec=prep.spec)
    out["prefill_lower_s"] = time.perf_counter() - start
    start = time.perf_counter()
    lowered.compile()
    out["prefill_compile_s"] = time.perf_counter() - start
    state = jax.eval_shape(lambda *a: loop.prefill(*a, spec=prep.spec), *args)
    start = time.perf_counter()
    rounds = jax.ShapeDtypeStruct((), jax.numpy.int32)  # decode_loop's round budget is data
    lowered = loop.decode_loop.lower(target.graphdef, target.state, ddef, dstate, state, rounds, spec=prep.spec)
    out["loop_lower_s"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    out["loop_compile_s"] = time.perf_counter() - start
    out["loop_hlo_chars"] = len(compiled.as_text())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="qwen3-4b", choices=sorted(RANDOM_SHAPES) + sorted(V4_SHAPES))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    policies = ["plain", "full", "threshold"]
    p.add_argument("--policies", nargs="+", default=policies, choices=policies)
    p.add_argument("--out")
    a = p.parse_args()
    target, draft = abstract_pair(a.shape, a.dtype)
    report = {"shape": a.shape, "dtype": a.dtype, "batch": a.batch, "backend": jax.default_backend(), "runs": []}
    for policy in a.policies:
        d = None if policy == "plain" else draft
        verify = {"plain": "full", "full": "full", "threshold": "threshold:0.5"}[policy]
        report["runs"].append(measure(target, d, a.batch, a.prompt_len, a.max_new_tokens, verify))
        print(json.dumps(report["runs"][-1]), flush=True)
        if a.out:
            with open(a.out, "w") as f:
                json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
