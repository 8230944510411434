"""The scheduler's draft gate on a batch, replayed on measured rounds: what its drafting rounds cost a batch whose
planned width-w round costs r plain rounds (the CPU's batch-8 case: w = 4, r = 3.0-3.8).

    python benchmarks/gate_replay_batch.py --commits benchmarks/results/2026-12-03_gate_commits.json --out b8.json

The a(L) of `gate_replay.py` (tokens a whole-block round commits at answer length L, greedy), held-out prompts
grouped into batches of `--batch` rows; a round at width w commits min(a(L), w) tokens to each live row, a plain
round one. The batch runs until every row has `--max-new-tokens` tokens, so plain decoding takes that many rounds.
The cost table's gain and variance are its slowest row's over its first TIMED_ROUNDS whole-block rounds, each capped
at the planned width as the live table does (`loop.slowest_row_stats`), and every batch takes a turn as the table's
source. `--draws K` draws K batches at random instead (seed 0; rows repeat when the batch is larger than the 30
prompts), for batches of 16 and more. Reports the scheduler's and `full`'s speedup over plain decoding and the share
of rounds the scheduler drafted, per r.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from gate_replay import full_rounds, replay, save_report

from dspark_jax.decoding.loop import TIMED_ROUNDS, slowest_row_stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--commits", required=True, help="gate_replay.py's a(L) file")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--width", type=int, default=4, help="the planned target-pass width")
    p.add_argument("--block", type=int, default=7)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--ratios", type=float, nargs="+", default=[3.0, 3.3, 3.6, 3.9])
    p.add_argument("--draws", type=int, default=0, help="batches drawn at random (default: consecutive groups)")
    p.add_argument("--out")
    args = p.parse_args()
    with open(args.commits) as f:
        data = json.load(f)[1:]  # the held-out prompts
    n, b = args.max_new_tokens, args.batch
    commits = [d["commits"] + [1] * (n + args.block + 1) for d in data]  # a stop token ends an answer: 1 a round
    if args.draws:
        rng = np.random.default_rng(0)
        picks = [rng.choice(len(commits), b, replace=b > len(commits)) for _ in range(args.draws)]
        batches = [[commits[i] for i in pick] for pick in picks]
    else:
        batches = [commits[i : i + b] for i in range(0, len(commits) - b + 1, b)]
    tables = []
    for rows in batches:
        gain, spread = slowest_row_stats([np.asarray(full_rounds(a, n)[:TIMED_ROUNDS]) for a in rows], [args.width])
        tables.append((float(gain[0]), float(spread[0])))
    report = {"args": vars(args), "rows": []}
    for ratio in args.ratios:
        runs = [replay(rows, ratio, args.width, g, v, n, args.block) for rows in batches for g, v in tables]
        speedup = np.asarray([n / steps for steps, _ in runs])
        # `full` at the same width: every round drafts; the batch takes as many rounds as its slowest row needs.
        full = [n / (ratio * max(len(full_rounds(np.minimum(a, args.width), n)) for a in rows)) for rows in batches]
        row = {
            "ratio": ratio,
            "full_over_plain_mean": float(np.mean(full)),
            "scheduler_over_plain_mean": float(speedup.mean()),
            "scheduler_over_plain_min": float(speedup.min()),
            "below_0.95_share": float((speedup < 0.95).mean()),
            "drafting_share_mean": float(np.mean([share for _, share in runs])),
            "table_gains": [g for g, _ in tables],
        }
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    save_report(report, args.out)


if __name__ == "__main__":
    main()
