"""CLI: python -m dspark_jax.regenerate — draft training data whose responses the target wrote itself (spec §9.1.2).

A draft is judged on the target's own continuations, so it should be trained on them too: prompts are windows of
a token corpus (`{"input_ids" | "ids": [...]}` per line, e.g. `training.corpus`'s train.jsonl), the responses are
sampled from the target (spec defaults: temperature 0.7, top-p 0.8, top-k 20), and each output line is
`{"input_ids": prompt + response, "loss_mask": [0] * len(prompt) + [1] * len(response)}`, ready for
`python -m dspark_jax.train --mode draft --data`. The file appears only once complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np

from dspark_jax.cli_util import OneLineArgumentParser
from dspark_jax.errors import DSparkError, UsageError


@dataclasses.dataclass(frozen=True)
class RegenArgs:
    target: str
    data: str
    out: str
    num_prompts: int = 1024
    prompt_len: int = 64
    max_new_tokens: int = 192
    batch_size: int = 64
    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    seed: int = 0
    dtype: str = "float32"


def sample_prompts(rows: list[list[int]], num: int, prompt_len: int, seed: int) -> list[list[int]]:
    """`num` windows of `prompt_len` ids, files drawn in proportion to their length, offsets uniform (seeded)."""
    rows = [r for r in rows if len(r) > prompt_len]
    if not rows:
        raise UsageError(f"--data has no row longer than --prompt-len {prompt_len}")
    rng = np.random.default_rng(seed)
    sizes = np.array([len(r) - prompt_len for r in rows], np.float64)
    prompts = []
    for i in rng.choice(len(rows), size=num, p=sizes / sizes.sum()):
        start = int(rng.integers(0, len(rows[i]) - prompt_len))
        prompts.append(rows[i][start : start + prompt_len])
    return prompts


def _read_rows(path: str) -> list[list[int]]:
    from dspark_jax.training.data import jsonl_token_rows

    if not (os.path.isfile(path) and path.endswith(".jsonl")):
        raise UsageError(f"--data must be a .jsonl file of token ids, got {path!r}")
    return [[int(t) for t in ids] for _, _, ids in jsonl_token_rows(path)]


def run(args: RegenArgs, log=print) -> int:
    """Write args.out; returns the number of supervised (response) tokens."""
    from dspark_jax.checkpoints import atomic_file
    from dspark_jax.cli_util import check_output_file
    from dspark_jax.decoding.loop import generate
    from dspark_jax.loading import load_target

    for name in ("num_prompts", "prompt_len", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    check_output_file(args.out, "--out")
    prompts = sample_prompts(_read_rows(args.data), args.num_prompts, args.prompt_len, args.seed)
    target = load_target(args.target, dtype=args.dtype)
    supervised, start = 0, time.perf_counter()
    with atomic_file(args.out) as tmp, open(tmp, "w") as f:
        for i in range(0, len(prompts), args.batch_size):
            batch = prompts[i : i + args.batch_size]
            # A short last batch is padded with copies so every call reuses the one compiled loop.
            padded = batch + [batch[0]] * (args.batch_size - len(batch))
            out = generate(
                target,
                None,
                padded,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed + i,
            )
            for prompt, response in zip(batch, out.tokens[: len(batch)]):
                ids = prompt + response
                f.write(json.dumps({"input_ids": ids, "loss_mask": [0] * len(prompt) + [1] * len(response)}))
                f.write("\n")
                supervised += len(response)
            rate = supervised / (time.perf_counter() - start)
            log(f"{i + len(batch)}/{len(prompts)} prompts, {supervised} response tokens ({rate:.0f} tok/s)")
    return supervised


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m dspark_jax.regenerate",
        description="Regenerate responses with the target for draft training (spec §9.1.2).",
        epilog="""example:
  python -m dspark_jax.regenerate --target dspark_jax/assets/tiny_code/target \\
      --data corpus/train.jsonl --out regen.jsonl""",
    )
    p.add_argument("--target", required=True, help="target folder or hub id")
    p.add_argument("--data", required=True, help="a .jsonl of token ids ({'input_ids' or 'ids': [...]} per line)")
    p.add_argument("--out", required=True, help="output .jsonl (written atomically)")
    for field in dataclasses.fields(RegenArgs):
        if field.name in ("target", "data", "out"):
            continue
        p.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        n = run(RegenArgs(**vars(ns)), log=lambda s: print(s, file=sys.stderr, flush=True))
    except DSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {ns.out}: {ns.num_prompts} prompts, {n} response tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
