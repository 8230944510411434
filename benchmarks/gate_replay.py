"""The scheduler's draft gate at batch 1, replayed on measured rounds: how far it falls behind `full`, and how often
below plain decoding, when the cost table says a widest round costs r plain steps.

    python benchmarks/gate_replay.py --data corpus/heldout.jsonl \
        --commits benchmarks/results/2026-12-03_gate_commits.json --out replay.json

Greedy decoding writes one answer whatever the rounds do, so the tokens a whole-block round commits depend only on
where it starts: a(L) for an answer L tokens long. `--commits` is measured once (one batched `generate` per prompt,
a row per start position, ~10 min on 2 CPU cores for the default prompt and 30 held-out windows; the embedded
pair's is in benchmarks/results, greedy float32 on CPU); the replay then runs the real `SchedulerState` (`initial`,
`observed`, `after_round`, as the decode loop calls them) over each answer: a drafting round costs r and commits
a(L), a plain one costs 1 and commits 1. The gate's measured
gain and its variance come from the first TIMED_ROUNDS rounds of one prompt's answer (the cost table's timing run
measures those on the request that builds it; a server reuses it for later requests), and every prompt takes a
turn as that source, so a prompt whose early rounds are poor shows what it does to every other request.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import dspark_jax as dj
from dspark_jax.bench import DEFAULT_DRAFT, DEFAULT_TARGET
from dspark_jax.checkpoints import atomic_file
from dspark_jax.decoding.loop import TIMED_ROUNDS
from dspark_jax.decoding.schedule import SchedulerState
from dspark_jax.evaluate import load_prompts
from dspark_jax.generate import DEFAULT_PROMPT


def measure_commits(target, draft, prompts, new_tokens: int) -> list[dict]:
    """Per prompt: the plain greedy answer's a(L), L = 1 .. new_tokens (tokens a full-block round commits when the
    answer holds L tokens), and the acceptance lengths of a `full` run (a check: replaying a(L) must give them)."""
    block = draft.config.block_size
    out = []
    for p in prompts:
        answer = dj.generate(target, None, [p], max_new_tokens=new_tokens + block + 1).tokens[0]
        full = dj.generate(target, draft, [p], max_new_tokens=new_tokens).acceptance_lengths[0]
        starts = [p + answer[: n - 1] for n in range(1, min(new_tokens, len(answer)) + 1)]
        commits = []
        for i in range(0, len(starts), 64):  # the prefix ends where the round's anchor is: the first round is a(L)
            r = dj.generate(target, draft, starts[i : i + 64], max_new_tokens=block + 2)
            commits += [q[0] for q in r.acceptance_lengths]
        out.append({"commits": commits, "full": full})
    return out


@jax.jit
def gate_step(sched: SchedulerState, committed, live, seconds):
    """One round of the gate: a drafting round (observed, then after_round, as the loop's `_gate`) or a plain one
    (after_round with nothing delivered). committed: i32[batch] tokens the round gave each row; live: bool[batch]."""
    rows = jnp.sum(live)

    def drafting(s):
        s, delivered = s.observed(committed, live, seconds)
        return s.after_round(delivered, rows, seconds)

    return jax.lax.cond(sched.drafting, drafting, lambda s: s.after_round(jnp.float32(0), rows), sched)


def replay(rows: list[list[int]], ratio: float, width: int, gain: float, spread: float, n: int, block: int):
    """(plain steps a batch of `rows` (each an answer's a(L)) takes for n tokens a row, share of its rounds that
    drafted) when a drafting round runs at `width` and costs `ratio` plain steps: it commits min(a(L), width) tokens
    to each live row, a plain round one."""
    sched = SchedulerState.initial(
        np.ones(block), [ratio], 1.0, len(rows), gain=gain, spread=spread, widths=[width], prior=np.ones(block)
    )
    lengths, steps, drafted, rounds = np.ones(len(rows), int), 0.0, 0, 0
    while (lengths <= n).any():
        live = lengths <= n
        drafting = bool(sched.drafting)
        got = [min(a[min(m, n) - 1], width) if drafting else 1 for a, m in zip(rows, lengths)]
        committed = np.where(live, got, 0)
        steps, drafted, rounds = steps + (ratio if drafting else 1.0), drafted + drafting, rounds + 1
        lengths = lengths + committed
        sched = gate_step(sched, jnp.asarray(committed, jnp.int32), jnp.asarray(live), jnp.float32(ratio))
    return steps, drafted / rounds


def full_rounds(commits: list[int], new_tokens: int) -> list[int]:
    """Tokens each round commits when every round drafts the whole block (`full`) until `new_tokens` are out."""
    n, rounds = 1, []
    while n <= new_tokens:
        rounds.append(commits[n - 1])
        n += rounds[-1]
    return rounds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="held-out .jsonl (windows as in policy_table.py)")
    p.add_argument("--commits", required=True, help="a(L) per prompt: read if it exists, else measured and written")
    p.add_argument("--prompts", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--ratios", type=float, nargs="+", default=[2.3, 2.6, 2.9, 3.3, 4.0])
    p.add_argument("--out")
    args = p.parse_args()
    target = dj.load_target(DEFAULT_TARGET, dtype="float32")
    draft = dj.load_draft(DEFAULT_DRAFT, target=target)
    block, n = draft.config.block_size, args.max_new_tokens
    if os.path.exists(args.commits):
        with open(args.commits) as f:
            data = json.load(f)
    else:
        prompts = [target.tokenizer.encode_prompt(DEFAULT_PROMPT)]
        prompts += load_prompts(args.data, args.prompts, 64, 0)
        data = measure_commits(target, draft, prompts, n)
        with atomic_file(args.commits) as tmp, open(tmp, "w") as f:
            json.dump(data, f)
    commits = [d["commits"] + [1] * n for d in data]  # a stop token may end an answer early: one token a round
    for a, d in zip(commits, data):  # the measurement's own check: replaying a(L) with every round drafting
        rounds = full_rounds(a, n)
        assert rounds[: len(d["full"])] == d["full"][: len(rounds)], "a(L) does not reproduce the full run"
    report = {"args": vars(args), "rows": []}
    for ratio in args.ratios:
        full = np.asarray([n / (ratio * len(full_rounds(a, n))) for a in commits])
        per_source = []
        for src in data:  # prompt 0 is the main command's: it measures its own table there
            first = src["full"][:TIMED_ROUNDS]
            gain, spread = float(np.mean(first)), float(np.var(first))
            per_source.append([n / replay([a], ratio, block + 1, gain, spread, n, block)[0] for a in commits])
        gated = np.asarray(per_source)  # [source, prompt] scheduler speedup over plain
        diffs = gated - full  # scheduler - full
        row = {
            "ratio": ratio,
            "full_mean_speedup": float(full[1:].mean()),
            "main_full": float(full[0]),
            "main_scheduler_minus_full": float(diffs[0, 0]),
            "heldout_mean_diff_worst_source": float(diffs[1:, 1:].mean(axis=1).min()),
            "heldout_mean_diff_avg": float(diffs[1:, 1:].mean()),
            "prompts_behind_0.04_avg": float((diffs[1:, 1:] < -0.04).sum(axis=1).mean()),
            "worst_prompt_diff": float(diffs[1:, 1:].min()),
            "prompts_below_0.95_plain_avg": float((gated[1:, 1:] < 0.95).sum(axis=1).mean()),
        }
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
    save_report(report, args.out)


def save_report(report: dict, path: str | None) -> None:
    """Write the report's JSON to `path` (atomically), if one was given."""
    if path:
        with atomic_file(path) as tmp, open(tmp, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
