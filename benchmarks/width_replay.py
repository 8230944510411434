"""Would a greedy round that picks its verify width from its own confidences pay? Replays full-block rounds.

    python benchmarks/width_replay.py --data corpus/heldout.jsonl --out width_replay.json

At temperature 0 any cut of a block is lossless (the target's argmax decides every token), so a greedy round could
choose its target-pass width after the draft ran, from this round's calibrated prefix confidences, instead of from
the previous round's (what `verify="scheduler"` does, for sampled rows' sake). This measures the cost table of the
scheduler's compiled widths on the main command's prompt, decodes the main prompt and `--num-prompts` held-out
windows with full blocks (batch 1, greedy), and replays each prompt's rounds three ways: every round at the widest
width (`full`), at the width spec §11's objective picks from the round's own confidences (`own`), and at the width
that commits the round's tokens at least cost (`oracle`, an upper bound). A round cut at width w commits min(a, w)
of its a tokens; later rounds are taken as they came (the replay does not re-decode), so it estimates, not measures.
Speedups are against the table's plain round. Writes one JSON.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np

import dspark_jax as dj
from dspark_jax.bench import DEFAULT_DRAFT, DEFAULT_TARGET
from dspark_jax.checkpoints import atomic_file
from dspark_jax.decoding.loop import prepare, round_seconds_table
from dspark_jax.decoding.schedule import plan_width, prefix_confidences
from dspark_jax.evaluate import load_prompts
from dspark_jax.generate import DEFAULT_PROMPT


def replay(acceptance: np.ndarray, logits: np.ndarray, temperatures, widths, width_seconds, plain_seconds) -> dict:
    """Speedups of one prompt's rounds (i32[rounds] tokens committed, f32[rounds, slots] confidence logits)."""
    s = prefix_confidences(jnp.asarray(logits, jnp.float32), jnp.asarray(temperatures, jnp.float32))
    one_row = jnp.ones((1,), bool)
    # The scheduler's own plan, one round at a time (a batch of one row): its objective, not a copy of it.
    own = np.asarray(jax.vmap(lambda si: plan_width(si[None], one_row, jnp.asarray(widths), width_seconds)[0])(s))
    oracle = np.array([np.argmin(width_seconds / np.minimum(a, widths)) for a in acceptance])

    def speedup(picks):
        return float(np.minimum(acceptance, widths[picks]).sum() / width_seconds[picks].sum() * plain_seconds)

    full = np.full(len(acceptance), len(widths) - 1)
    return {
        "tau": float(acceptance.mean()),
        "full": speedup(full),
        "own": speedup(own),
        "oracle": speedup(oracle),
        "own_mean_width": float(widths[own].mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--target", help="target folder or hub id (default: the embedded target)")
    p.add_argument("--draft", help="draft folder or hub id (default: the embedded DSpark draft)")
    p.add_argument("--data", required=True)
    p.add_argument("--num-prompts", type=int, default=30)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    target = dj.load_target(args.target or DEFAULT_TARGET, dtype="float32")
    draft = dj.load_draft(args.draft or DEFAULT_DRAFT, target=target)
    main_prompt = target.tokenizer.encode_prompt(DEFAULT_PROMPT)
    prep = prepare(target, draft, [main_prompt], max_new_tokens=args.max_new_tokens, verify="scheduler")
    width_seconds, plain_seconds = round_seconds_table(target, draft, prep)
    widths = np.asarray(prep.spec.widths)
    block = draft.config.block_size
    temperatures = np.ones(block) if draft.calibration is None else np.asarray(draft.calibration, np.float64)
    rows = []
    for prompt in [main_prompt] + load_prompts(args.data, args.num_prompts, 64, 0):
        r = dj.generate(target, draft, [prompt], max_new_tokens=args.max_new_tokens, verify="full")
        acceptance, logits = np.asarray(r.acceptance_lengths[0]), np.asarray(r.confidence_logits[0])
        rows.append(replay(acceptance, logits, temperatures, widths, width_seconds, plain_seconds))
        print(json.dumps(rows[-1]), flush=True)
    held = rows[1:]
    report = {
        "args": vars(args),
        "widths": widths.tolist(),
        "width_seconds": np.asarray(width_seconds).tolist(),
        "plain_seconds": float(plain_seconds),
        "main": rows[0],
        "heldout_mean": {k: float(np.mean([r[k] for r in held])) for k in held[0]},
        "rows": held,
    }
    print("main", json.dumps(report["main"]), "\nheld-out mean", json.dumps(report["heldout_mean"]))
    with atomic_file(args.out) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
