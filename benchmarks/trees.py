"""Tree vs chain rounds (trees §9): tau, nodes verified per round, tau per verified node, wall-clock per round and
tokens/s against plain decoding, with the accepted-rank histogram per depth.

    python benchmarks/trees.py --data corpus/heldout.jsonl --out trees.json

Defaults: the embedded pair, every held-out prompt in one batch (64-token windows, `evaluate.load_prompts`), 128 new
tokens, the chain and trees (7,2,2), (15,4,4), (31,4,4), at T = 0 and T = 1. Each configuration compiles with one
run, then runs `--repeats` times; the median time counts. Wall-clock per round = time / loop rounds (the batch's
longest row). Plain decoding is timed the same way, once per temperature, just before that temperature's rows, so
`speedup` = tokens/s over plain tokens/s on nearly the same machine load. At T = 0 every configuration must
reproduce plain greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import statistics

import dspark_jax as dj
from dspark_jax.bench import DEFAULT_DRAFT, DEFAULT_TARGET
from dspark_jax.checkpoints import atomic_file
from dspark_jax.decoding.tree import TreeConfig
from dspark_jax.evaluate import load_prompts
from dspark_jax.metrics import tree_metrics

TREES = {"chain": None, "7,2,2": TreeConfig(7, 2, 2), "15,4,4": TreeConfig(15, 4, 4), "31,4,4": TreeConfig(31, 4, 4)}


def measure(target, draft, prompts, tree, temperature, args) -> dict:
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=temperature, seed=args.seed, tree=tree)
    dj.generate(target, draft, prompts, **kw)  # compile
    runs = [dj.generate(target, draft, prompts, **kw) for _ in range(args.repeats)]
    seconds = statistics.median(r.seconds for r in runs)
    res = runs[0]
    rounds = sum(len(a) for a in res.acceptance_lengths)
    loop_rounds = max(len(a) for a in res.acceptance_lengths)
    row = {"tau": sum(map(sum, res.acceptance_lengths)) / max(rounds, 1)}
    if draft is not None:
        block = draft.config.block_size
        branch = 1 if tree is None else tree.branch
        # A chain round is the 1-child tree: its ranks are all 0 and it verifies proposal_lengths nodes.
        ranks = res.accepted_ranks or [[[0] * (a - 1) for a in p] for p in res.acceptance_lengths]
        nodes = res.nodes_verified or res.proposal_lengths
        row |= tree_metrics(res.acceptance_lengths, nodes, ranks, block, branch)
    row |= {
        "seconds": seconds,
        "loop_rounds": loop_rounds,
        "ms_per_round": 1000 * seconds / loop_rounds,
        "tokens_per_s": res.new_tokens / seconds,
        "tokens": res.tokens,
    }
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", help="target folder (default: the embedded target)")
    p.add_argument("--draft", help="draft folder (default: the embedded DSpark draft)")
    p.add_argument("--data", required=True)
    p.add_argument("--num-prompts", type=int, default=30)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    p.add_argument("--trees", nargs="+", default=list(TREES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--machine", help="a note on the machine's load, stored in the JSON's config")
    p.add_argument("--out")
    args = p.parse_args()
    target = dj.load_target(args.target or DEFAULT_TARGET, dtype="float32")
    draft = dj.load_draft(args.draft or DEFAULT_DRAFT, target=target)
    prompts = load_prompts(args.data, args.num_prompts, args.prompt_len, args.seed, target.tokenizer)
    trees = {name: TREES[name] if name in TREES else TreeConfig.parse(name) for name in args.trees}
    rows = []
    for temperature in args.temperatures:
        plain = measure(target, None, prompts, None, temperature, args)
        plain_tokens = plain.pop("tokens")
        rows.append({"tree": "plain", "temperature": temperature, "batch": len(prompts), **plain})
        for name, tree in trees.items():
            row = measure(target, draft, prompts, tree, temperature, args)
            if temperature == 0.0:
                assert row["tokens"] == plain_tokens, f"{name} is not lossless at T = 0"
            del row["tokens"]
            row["speedup"] = row["tokens_per_s"] / plain["tokens_per_s"]
            row = {"tree": name, "temperature": temperature, "batch": len(prompts), **row}
            rows.append(row)
            print(
                f"T={temperature:g} {name:>7}: tau {row['tau']:.3f} | nodes/round {row['nodes_verified_per_round']:.1f}"
                f" | tau/node {row['tau_per_verified_node']:.3f} | {row['ms_per_round']:.1f} ms/round"
                f" | {row['tokens_per_s']:.1f} tok/s ({row['speedup']:.2f}x plain)"
                f" | off rank 0 {row['share_rounds_off_rank0']:.2f}",
                flush=True,
            )
            if args.out:
                with atomic_file(args.out) as tmp, open(tmp, "w") as f:
                    json.dump({"config": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
