"""CLI: python -m dspark_jax.evaluate — offline acceptance metrics of a draft on held-out prompts (spec §7.1, §8).

Prompts come from a jsonl of token ids (`{"ids": [...]}` or `{"prompt_ids": [...]}`: a window of `--prompt-len`
tokens at a seeded offset of each row) or of chat turns (`{"turns": [...]}`, the eval_datasets format, through
the tokenizer). Prints (and with `--out`, writes) one JSON object. With full-block verification and a draft that has
a confidence head it also reports the calibration metrics of spec §7.3, and `--save-calibration` fits the per-slot
temperatures of spec §10 on these rounds and writes them to the draft folder's calibration.json (which load_draft
then reads and `verify="scheduler"` uses).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

from dspark_jax.cli_util import OneLineArgumentParser
from dspark_jax.errors import DSparkError, UsageError


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    target: str
    draft: str
    data: str
    num_prompts: int = 32
    prompt_len: int = 64
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    verify: str = "full"
    dtype: str = "float32"
    out: str | None = None
    save_calibration: bool = False


def load_prompts(path: str, num_prompts: int, prompt_len: int, seed: int, tokenizer=None) -> list[list[int]]:
    """Up to `num_prompts` prompts from `path`; token rows give a seeded window of `prompt_len` ids each."""
    if not os.path.isfile(path):
        raise UsageError(f"--data {path!r} does not exist")
    rng = np.random.default_rng(seed)
    prompts = []
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for row in rows:
        ids = row.get("ids", row.get("prompt_ids")) if isinstance(row, dict) else None
        if ids is not None:
            if len(ids) <= prompt_len + 1:
                continue
            start = int(rng.integers(0, len(ids) - prompt_len))
            prompts.append([int(t) for t in ids[start : start + prompt_len]])
        elif isinstance(row, dict) and row.get("turns"):
            if tokenizer is None:
                raise UsageError("--data holds text turns but the target folder has no tokenizer.json")
            prompts.append(tokenizer.encode_prompt(row["turns"][0]))
        if len(prompts) == num_prompts:
            break
    if not prompts:
        raise UsageError(f"--data {path} yielded no prompt (rows need 'ids' longer than --prompt-len, or 'turns')")
    return prompts


def run(args: EvalArgs) -> dict:
    import dspark_jax as dj
    from dspark_jax.checkpoints import save_calibration
    from dspark_jax.decoding.calibration import fit_temperatures
    from dspark_jax.metrics import calibration_data, calibration_metrics, speculative_metrics

    dj.SamplingConfig(args.temperature, args.top_p, args.top_k)
    dj.VerifyPolicy.parse(args.verify)
    if args.save_calibration and args.verify != "full":
        raise UsageError(f"--save-calibration fits on full blocks; got --verify {args.verify} (accepted: full)")
    target = dj.load_target(args.target, dtype=args.dtype)
    draft = dj.load_draft(args.draft, target=target)
    if args.save_calibration and not draft.config.enable_confidence_head:
        raise UsageError(f"--save-calibration needs a draft with a confidence head; {args.draft!r} has none")
    prompts = load_prompts(args.data, args.num_prompts, args.prompt_len, args.seed, target.tokenizer)
    result = dj.generate(
        target,
        draft,
        prompts=prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        verify=args.verify,
    )
    metrics = speculative_metrics(result.acceptance_lengths, result.proposal_lengths, draft.config.block_size)
    out = {}
    if draft.config.enable_confidence_head and args.verify == "full":
        z, accepted, proposed = calibration_data(
            result.confidence_logits, result.acceptance_lengths, result.proposal_lengths
        )
        metrics["calibration_raw"] = calibration_metrics(z, accepted, proposed)
        temps = draft.calibration
        if args.save_calibration:
            temps = fit_temperatures(z, accepted, proposed)
            fitted = calibration_metrics(z, accepted, proposed, temps)
            info = {"rounds": int(z.shape[0]), "ece_raw": metrics["calibration_raw"]["summary"]["ece"]}
            info |= {"ece_fitted": fitted["summary"]["ece"], "fitted_on": dataclasses.asdict(args)}
            out["calibration_file"] = save_calibration(draft.path, temps, draft.config.block_size, info)
        if temps is not None:
            metrics["calibration"] = calibration_metrics(z, accepted, proposed, temps)
            metrics["calibration"]["temperatures"] = [float(t) for t in temps]
    return {
        **out,
        "metrics": metrics,
        "num_prompts": len(prompts),
        "new_tokens": result.new_tokens,
        "config": dataclasses.asdict(args),
    }


def main(argv: list[str] | None = None) -> int:
    p = OneLineArgumentParser(prog="python -m dspark_jax.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--draft", required=True)
    p.add_argument("--data", required=True, help="jsonl of token ids or chat turns")
    for name, kind in (
        ("num_prompts", int),
        ("prompt_len", int),
        ("max_new_tokens", int),
        ("temperature", float),
        ("top_p", float),
        ("top_k", int),
        ("seed", int),
    ):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=EvalArgs.__dataclass_fields__[name].default)
    p.add_argument("--verify", default="full")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument(
        "--save-calibration",
        action="store_true",
        help="fit per-slot confidence temperatures on these rounds (spec §10) into the draft's calibration.json",
    )
    args = EvalArgs(**vars(p.parse_args(argv)))
    try:
        if args.num_prompts < 1 or args.prompt_len < 1:
            raise UsageError("--num-prompts and --prompt-len must be positive integers")
        out = run(args)
    except DSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(out)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
