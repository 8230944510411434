"""Tokens/s of plain decoding and of each verify policy, side by side, per batch size; and per-prompt speedups.

    python benchmarks/policy_table.py --data corpus/heldout.jsonl --batch 1 4 8 16 64 --out policy_table.json
    python benchmarks/policy_table.py --data corpus/heldout.jsonl --per-prompt 30 --policies full --out heldout.json

Defaults: the embedded pair, greedy, 64-token prompt windows (`evaluate.load_prompts`; a batch larger than the file
takes further windows of its rows at the next seeds), 128 new tokens. Each configuration compiles with one run;
then every mode runs `--repeats` times in turn, in a rotating order (so all see the same machine), and the median
time counts (`best_speedup`: the ratio of the fastest runs, as noise only ever adds time). Writes one JSON
(rewritten after every batch size) and prints one line per row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess

import dspark_jax as dj
from dspark_jax.bench import DEFAULT_DRAFT, DEFAULT_TARGET
from dspark_jax.checkpoints import atomic_file
from dspark_jax.evaluate import load_prompts


def timed_modes(target, draft, prompts, policies, args) -> dict:
    """{mode: (median seconds, fastest seconds, result)} for "plain" and each verify policy on the same prompts."""
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    modes = [("plain", None, "full")] + [(p, draft, p) for p in policies]
    for _, d, verify in modes:
        dj.generate(target, d, prompts, verify=verify, **kw)  # compile (and measure the scheduler's table)
    runs = {name: [] for name, _, _ in modes}
    for i in range(args.repeats):
        # The order rotates: a mode run right after another that streamed the same weights may find part of them in
        # the L3 (32 MiB against 40 MB of compact target weights), and with a fixed order plain always followed the
        # shut scheduler (batch 4 read 0.89-0.92x where the loops timed alone were even).
        for name, d, verify in modes[i % len(modes) :] + modes[: i % len(modes)]:
            runs[name].append(dj.generate(target, d, prompts, verify=verify, **kw))
    return {
        name: (statistics.median(r.seconds for r in rs), min(r.seconds for r in rs), rs[0]) for name, rs in runs.items()
    }


def batch_prompts(args, batch: int) -> list[list[int]]:
    """`batch` prompt windows: the data rows' windows at --seed, then at --seed + 1, ... until the batch is full (the
    30 held-out files give 30 a pass; until 2026-12-03 a larger batch silently ran with those 30)."""
    prompts, seed = [], args.seed
    while len(prompts) < batch:
        prompts += load_prompts(args.data, batch - len(prompts), args.prompt_len, seed)
        seed += 1
    return prompts


def row(times: dict, sampled: bool, exact: bool = True) -> dict:
    """Ratios to plain decoding. `exact` (float32): greedy tokens must equal plain's. In bf16 a one-row and an
    eight-row pass round their sums differently and a near-tie can flip, so there the share of equal rows is
    reported."""
    plain_s, plain_best, plain = times["plain"]
    out = {"plain_tokens_per_s": plain.new_tokens / plain_s}
    for name, (seconds, best, result) in times.items():
        if name != "plain":
            assert sampled or not exact or result.tokens == plain.tokens, f"{name} is not lossless"
            out[name] = {
                "tokens_per_s": result.new_tokens / seconds,
                "speedup": (result.new_tokens / seconds) / out["plain_tokens_per_s"],
                "best_speedup": (result.new_tokens / best) / (plain.new_tokens / plain_best),
                "tau": result.tau,
                "mean_verified": statistics.fmean(k for q in result.proposal_lengths for k in q),
                # Rounds that ran the draft (a skipped round records zero confidences): the scheduler's gate at work.
                "drafting_share": statistics.fmean(any(z) for q in result.confidence_logits for z in q),
                "rows_equal_to_plain": statistics.fmean(a == b for a, b in zip(result.tokens, plain.tokens)),
            }
    return out


def machine() -> dict:
    flags = ""
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        pass
    avx = sorted({w for w in flags.split() if w.startswith("avx")})
    return {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(), "avx_flags": avx}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", help="target folder or hub id (default: the embedded target)")
    p.add_argument("--draft", help="draft folder or hub id (default: the embedded DSpark draft)")
    p.add_argument("--data", required=True)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--per-prompt", type=int, default=0, help="batch 1, this many prompts, one speedup each")
    p.add_argument("--policies", nargs="+", default=["full", "threshold:0.5", "scheduler"])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out")
    args = p.parse_args()
    target = dj.load_target(args.target or DEFAULT_TARGET, dtype=args.dtype)
    draft = dj.load_draft(args.draft or DEFAULT_DRAFT, target=target)
    report = {"machine": machine(), "args": vars(args), "rows": []}
    exact = args.dtype == "float32"

    def save():
        if args.out:
            with atomic_file(args.out) as tmp, open(tmp, "w") as f:
                json.dump(report, f, indent=1)

    if args.per_prompt:
        for i, prompt in enumerate(load_prompts(args.data, args.per_prompt, args.prompt_len, args.seed)):
            times = timed_modes(target, draft, [prompt], args.policies, args)
            r = {"prompt": i, **row(times, args.temperature > 0, exact)}
            report["rows"].append(r)
            print(json.dumps(r), flush=True)
            save()
        for name in args.policies:
            speedups = [r[name]["speedup"] for r in report["rows"]]
            report[f"{name}_mean_speedup"] = statistics.fmean(speedups)
            report[f"{name}_median_speedup"] = statistics.median(speedups)
            print(name, "mean", round(statistics.fmean(speedups), 3), "median", round(statistics.median(speedups), 3))
    for batch in [] if args.per_prompt else args.batch:
        prompts = batch_prompts(args, batch)
        times = timed_modes(target, draft, prompts, args.policies, args)
        r = {"batch": batch, **row(times, args.temperature > 0, exact)}
        report["rows"].append(r)
        print(json.dumps(r), flush=True)
        save()
    save()


if __name__ == "__main__":
    main()
