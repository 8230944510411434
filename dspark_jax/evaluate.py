"""CLI: python -m dspark_jax.evaluate — offline acceptance metrics of drafts on held-out prompts (spec §7, §8).

Two ways to give prompts:

* `--benchmarks gsm8k,math500,...` (the default: the paper's eight sets): the evaluation protocol of spec §8. Each
  name resolves through huggingface_hub to its public dataset (downloaded once, then read from the cache; see
  `dspark_jax.eval_data`), or `--data-dir DIR` reads DIR/NAME.jsonl files in the `{"turns": [...]}` format (a path
  to any .jsonl file works as a name too). Each set is capped at its paper size (at most 500; `--num-prompts`
  overrides), shuffled with the eval seed when larger; turns[0] goes through the chat template (one user message,
  generation prompt, thinking off). Defaults: temperature 1, 2048 new tokens, seed 980406, one prompt at a time
  (`--batch-size`), full-block verification. Prompt i of a set draws from stream fold_in(key(seed + first index of
  its batch), position in its batch), i.e. seed + i with batches of one. Tokens/s leave compilation out: the first
  batch of each new compiled shape runs once untimed.
* `--data F.jsonl`: token-id rows (`{"ids": [...]}` / `{"prompt_ids": [...]}`: a window of `--prompt-len` tokens at
  a seeded offset of each row) or chat turns; quick defaults (32 prompts, 128 new tokens, greedy, seed 0, one batch).
  Prints the earlier single-set JSON (`metrics`, `num_prompts`, `new_tokens`, `config`) plus the fields below.

Reported per benchmark, draft and verify policy (the paper's Table 1): τ, mean proposal length, verify rate,
per-slot conditional acceptance and prefix survival, tokens/s (and plain decoding's tokens/s and the speedup with
`--compare`), plus the macro average over benchmarks. With full-block verification and a draft that has a
confidence head, the calibration metrics of spec §7.3; `--save-calibration` fits the per-slot temperatures of spec
§10 on all these rounds and writes them to the draft folder's calibration.json (which load_draft then reads and
`verify="scheduler"` uses). `--out DIR` writes DIR/results.json, DIR/results.csv and PNG plots.

`--tree N[,K[,W]]` (and `--tree-mode`) evaluates tree rounds instead of chains (trees §9): each row adds nodes
verified per round, τ per verified node (then also the `verify_rate`), the accepted-rank histogram per depth,
per-depth acceptance and the share of rounds leaving the rank-0 chain (confidence calibration is a chain measurement
and is left out). `--save-calibration` at a temperature above 0 also measures the tree builder's per-rank factors
(trees §3) on a full tree (N = 63, K = W = 4) over the same prompts and stores them as calibration.json's
"rank_factors" (at temperature 0 trees score by probabilities, so none are measured and stored ones are kept). A
DeepSeek-V4 -DSpark target folder without --draft is evaluated with its own draft (mtp.*).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
import warnings

import numpy as np

from dspark_jax.cli_util import OneLineArgumentParser, add_parallel_flags, pop_parallel
from dspark_jax.errors import DSparkError, UsageError
from dspark_jax.memory_plan import check_memory

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_code")
DEFAULT_TARGET = os.path.join(ASSETS, "target")
EMBEDDED_DRAFTS = {"dspark": os.path.join(ASSETS, "dspark"), "dflash": os.path.join(ASSETS, "dflash")}

# Defaults that differ between the two prompt sources; None in EvalArgs means "the default of the mode".
PROTOCOL_DEFAULTS = {"max_new_tokens": 2048, "temperature": 1.0, "seed": 980406, "batch_size": 1}  # spec §8
QUICK_DEFAULTS = {"num_prompts": 32, "max_new_tokens": 128, "temperature": 0.0, "seed": 0}  # --data

EXAMPLES = """examples:
  # the paper's protocol on the embedded pair, DSpark vs DFlash, prompt sets from a local folder:
  python -m dspark_jax.evaluate --drafts dspark,dflash --data-dir eval_datasets \\
      --benchmarks gsm8k,humaneval,mt-bench --num-prompts 20 --max-new-tokens 256 --out results/
  # a converted pair, all of the paper's sets from the hub, plain decoding for the speedup:
  python -m dspark_jax.evaluate --target Qwen/Qwen3-4B --draft DRAFT_DIR --compare --out results/
  # one token-id file, fitting the confidence temperatures (spec §10):
  python -m dspark_jax.evaluate --target T --draft D --data prompts.jsonl --save-calibration
"""


@dataclasses.dataclass(frozen=True)
class EvalArgs:
    """The CLI's flags, one field each (None: the default of the mode, see PROTOCOL_DEFAULTS / QUICK_DEFAULTS)."""

    target: str | None = None
    draft: str | None = None
    drafts: str | None = None
    data: str | None = None
    benchmarks: str | None = None
    data_dir: str | None = None
    num_prompts: int | None = None
    prompt_len: int = 64
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    verify: str = "full"
    dtype: str | None = None
    batch_size: int | None = None
    compare: bool = False
    out: str | None = None
    save_calibration: bool = False
    json: bool = False
    tree: str | None = None  # "N[,K[,W]]": tree rounds (trees §7); None = the chain
    tree_mode: str = "auto"


def build_parser() -> OneLineArgumentParser:
    import argparse

    p = OneLineArgumentParser(
        prog="python -m dspark_jax.evaluate",
        description=__doc__.splitlines()[0].split("— ", 1)[1],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", help="target folder or hub id (default: the embedded tiny_code target)")
    drafts = p.add_mutually_exclusive_group()
    drafts.add_argument("--draft", help="draft folder or hub id (default: the embedded DSpark draft)")
    drafts.add_argument(
        "--drafts",
        help="several drafts, comma-separated, evaluated on the same prompts (with the embedded target, the names "
        "dspark and dflash mean the embedded drafts)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--benchmarks",
        help="comma-separated prompt sets: gsm8k, math500, aime25, humaneval, mbpp, livecodebench, mt-bench, "
        "arena-hard-v2, alpaca, aime24, lbpp, 'paper' (the first eight; the default), or paths to .jsonl files",
    )
    src.add_argument("--data", help="one jsonl of token ids or chat turns (the quick single-set mode)")
    p.add_argument("--data-dir", help='folder of NAME.jsonl files ({"turns": [...]}) used instead of the hub')
    p.add_argument(
        "--num-prompts", type=int, help="prompts per set (default: each set's paper size, at most 500; --data: 32)"
    )
    p.add_argument("--prompt-len", type=int, default=64, help="--data token rows: window length")
    p.add_argument("--max-new-tokens", type=int, help="default 2048 (--data: 128)")
    p.add_argument("--temperature", type=float, help="default 1.0 (--data: 0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, help="eval seed (default 980406, the reference's; --data: 0)")
    p.add_argument(
        "--verify",
        default="full",
        help="full | threshold:X | scheduler; comma-separated to compare policies (e.g. full,scheduler)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: float32 on CPU, bfloat16 on accelerators")
    p.add_argument("--batch-size", type=int, help="prompts per generate call (default 1; --data: all in one)")
    p.add_argument("--compare", action="store_true", help="also run plain decoding: plain tokens/s and speedup")
    p.add_argument("--out", help="folder for results.json, results.csv and the PNG plots")
    p.add_argument(
        "--save-calibration",
        action="store_true",
        help="fit per-slot confidence temperatures on these rounds (spec §10) into the draft's calibration.json",
    )
    p.add_argument("--tree", help="draft trees N[,K[,W]]: N nodes, K children per node, beam W (default: chains)")
    p.add_argument("--tree-mode", default="auto", help="topk | swor | iid | auto (topk at temperature 0, swor above)")
    p.add_argument(
        "--json", action="store_true", help="print the results JSON instead of the table (--data always prints JSON)"
    )
    add_parallel_flags(p)
    return p


# ------------------------------------------------------------------------------------------------ prompts


def load_prompts(path: str, num_prompts: int, prompt_len: int, seed: int, tokenizer=None) -> list[list[int]]:
    """Up to `num_prompts` prompts from `path`; token rows give a seeded window of `prompt_len` ids each (a row no
    longer than prompt_len + 1 ids has no window to draw: it is skipped, with a warning counting such rows)."""
    from dspark_jax.eval_data import read_prompt_rows

    rng = np.random.default_rng(seed)
    prompts, short = [], 0
    for row in read_prompt_rows(path, "--data", ("ids", "prompt_ids")):
        if isinstance(row, str):
            if tokenizer is None:
                raise UsageError("--data holds text turns but the target folder has no tokenizer.json")
            prompts.append(tokenizer.encode_prompt(row))
        elif len(row) <= prompt_len + 1:
            short += 1
            continue
        else:
            start = int(rng.integers(0, len(row) - prompt_len))
            prompts.append(row[start : start + prompt_len])
        if len(prompts) == num_prompts:
            break
    if not prompts:
        raise UsageError(f"--data {path} yielded no prompt (rows need 'ids' longer than --prompt-len, or 'turns')")
    if short:
        warnings.warn(f"--data {path}: skipped {short} token row(s) of at most --prompt-len + 1 = {prompt_len + 1} ids")
    return prompts


@dataclasses.dataclass
class EncodedSet:
    """One prompt set as token ids: name, domain, ids, and how many prompts were dropped for not fitting."""

    name: str
    domain: str
    prompts: list[list[int]]
    skipped: int = 0
    source: str = "local"


def _encode_sets(sets, tokenizer, context_len: int) -> list[EncodedSet]:
    from dspark_jax.eval_data import HUB_SETS

    if tokenizer is None:
        raise UsageError("--benchmarks prompts are text but the target folder has no tokenizer.json; use --data ids")
    out = []
    for s in sets:
        ids = [tokenizer.encode_prompt(text) for text in s.prompts]
        kept = [p for p in ids if len(p) < context_len]  # generate() refuses longer ones; they are reported
        if not kept:
            raise UsageError(
                f"benchmark {s.name!r}: every selected prompt is longer than the target's context ({context_len})"
            )
        domain = HUB_SETS[s.name].domain if s.name in HUB_SETS else "other"
        out.append(EncodedSet(s.name, domain, kept, len(ids) - len(kept), s.source))
    return out


# ------------------------------------------------------------------------------------------------ decoding


@dataclasses.dataclass
class SetRun:
    """The merged outcome of all batches of one set under one draft and policy."""

    acceptance_lengths: list
    proposal_lengths: list
    confidence_logits: list
    new_tokens: int
    seconds: float
    warm: bool  # every timed batch ran on an already compiled shape
    nodes_verified: list = dataclasses.field(default_factory=list)  # tree rounds only (trees §9)
    accepted_ranks: list = dataclasses.field(default_factory=list)


class Runner:
    """Runs prompt sets in batches through dj.generate, with a progress bar; remembers compiled shapes so that a
    batch of a new shape first runs once untimed (when `warm_up`)."""

    def __init__(self, target, settings: dict, batch_size: int | None, warm_up: bool, progress):
        self.target, self.settings, self.batch_size = target, settings, batch_size
        self.warm_up, self.progress = warm_up, progress
        self.compiled: set = set()

    def run(self, draft, label: str, verify: str, prompts: list[list[int]], tree=None) -> SetRun:
        import dspark_jax as dj

        size = self.batch_size or len(prompts)
        acc, prop, conf, new_tokens, seconds, warm = [], [], [], 0, 0.0, True
        nodes, ranks = [], []
        for start in range(0, len(prompts), size):
            batch = prompts[start : start + size]
            kwargs = dict(self.settings, seed=self.settings["seed"] + start, verify=verify, tree=tree)
            # Finer than generate's own buckets (prompt bucket, batch bucket), so a batch that would compile is
            # never taken for a compiled one.
            shape = (label, verify, tree, len(batch), 1 << (max(map(len, batch)) - 1).bit_length())
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="max_new_tokens .* is capped")  # counted per set instead
                if shape not in self.compiled:
                    if self.warm_up:
                        dj.generate(self.target, draft, batch, **kwargs)
                    else:
                        warm = False
                    self.compiled.add(shape)
                result = dj.generate(self.target, draft, batch, **kwargs)
            acc += result.acceptance_lengths
            prop += result.proposal_lengths
            conf += result.confidence_logits
            nodes += result.nodes_verified
            ranks += result.accepted_ranks
            new_tokens += result.new_tokens
            seconds += result.seconds
            self.progress.update(len(batch))
        return SetRun(acc, prop, conf, new_tokens, seconds, warm, nodes, ranks)


def _calibration(draft, run_rounds, temperatures) -> dict:
    """Raw (and, with temperatures, calibrated) calibration metrics and reliability bins of pooled rounds."""
    from dspark_jax.metrics import calibration_metrics, calibration_reliability

    z, accepted, proposed = run_rounds
    out = {
        "raw": calibration_metrics(z, accepted, proposed),
        "reliability": calibration_reliability(z, accepted, proposed),
    }
    if temperatures is not None:
        out["calibrated"] = calibration_metrics(z, accepted, proposed, temperatures)
        out["calibrated"]["temperatures"] = [float(t) for t in temperatures]
        out["reliability_calibrated"] = calibration_reliability(z, accepted, proposed, temperatures)
    return out


def _rounds(run: SetRun):
    from dspark_jax.metrics import calibration_data

    return calibration_data(run.confidence_logits, run.acceptance_lengths, run.proposal_lengths)


MACRO_KEYS = (
    "tau",
    "mean_proposal_length",
    "verify_rate",
    "conditional_acceptance",
    "prefix_survival",
    "tokens_per_s",
    "plain_tokens_per_s",
    "speedup",
    "ece",
)
TREE_KEYS = ("nodes_verified_per_round", "tau_per_verified_node", "share_rounds_off_rank0", "per_depth_acceptance")
RANK_TREE = (63, 4, 4)  # the full tree the per-rank factors are measured on (trees §3), capped at its capacity


def _row(s: EncodedSet, label: str, draft, verify: str, run: SetRun, plain: SetRun | None, limits, tree=None) -> dict:
    """One results row; limits = (max_new_tokens, the target's context length); tree: the TreeConfig or None."""
    from dspark_jax.metrics import speculative_metrics, tree_metrics

    max_new_tokens, context_len = limits
    row = {"benchmark": s.name, "domain": s.domain, "draft": label, "verify": verify, "num_prompts": len(s.prompts)}
    row["skipped_prompts"] = s.skipped  # longer than the context
    row["capped_prompts"] = sum(len(p) + max_new_tokens >= context_len for p in s.prompts)  # fewer new tokens
    row |= speculative_metrics(run.acceptance_lengths, run.proposal_lengths, draft.config.block_size)
    tps = run.new_tokens / run.seconds if run.seconds > 0 else None
    plain_tps = plain.new_tokens / plain.seconds if plain is not None and plain.seconds > 0 else None
    row |= {"new_tokens": run.new_tokens, "seconds": run.seconds, "tokens_per_s": tps, "timed_warm": run.warm}
    row |= {"plain_tokens_per_s": plain_tps, "speedup": tps / plain_tps if tps and plain_tps else None}
    row["ece"] = None
    if tree is not None:
        row["tree"] = f"{tree.nodes},{tree.branch},{tree.beam}"
        row["tree_mode"] = tree.mode
        block = draft.config.block_size
        row |= tree_metrics(run.acceptance_lengths, run.nodes_verified, run.accepted_ranks, block, tree.branch)
    elif draft.config.enable_confidence_head and verify == "full":
        cal = _calibration(draft, _rounds(run), draft.calibration)
        row["calibration_raw"] = cal["raw"]
        row["ece"] = cal["raw"]["summary"]["ece"]
        if "calibrated" in cal:
            row["calibration"] = cal["calibrated"]
    return row


# ------------------------------------------------------------------------------------------------ the run


def _resolve(args: EvalArgs) -> EvalArgs:
    """Fill the mode's defaults and validate every flag that needs no model."""
    import dspark_jax as dj

    if args.data is not None and (args.benchmarks is not None or args.data_dir is not None):
        raise UsageError("--data is one file; --benchmarks / --data-dir select prompt sets (give one or the other)")
    quick = args.data is not None
    defaults = QUICK_DEFAULTS if quick else PROTOCOL_DEFAULTS
    args = dataclasses.replace(args, **{k: v for k, v in defaults.items() if getattr(args, k) is None})
    if args.out is not None and args.out.endswith(".json"):
        raise UsageError(f"--out {args.out!r} looks like a file; --out is a folder (DIR/results.json, results.csv)")
    for name in ("num_prompts", "prompt_len", "max_new_tokens", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    dj.SamplingConfig(args.temperature, args.top_p, args.top_k)
    for policy in _policies(args):
        dj.VerifyPolicy.parse(policy)
    if args.save_calibration and _policies(args) != ["full"]:
        raise UsageError(f"--save-calibration fits on full blocks; got --verify {args.verify} (accepted: full)")
    if args.save_calibration and args.drafts and len(args.drafts.split(",")) > 1:
        raise UsageError("--save-calibration fits one draft; give --draft, not several --drafts")
    _tree(args)
    if args.tree is not None and args.save_calibration:
        raise UsageError(
            f"--save-calibration fits on chain rounds (it measures its own trees); drop --tree {args.tree}"
        )
    return args


def _tree(args: EvalArgs):
    """--tree / --tree-mode as a TreeConfig (None without --tree); raises UsageError naming the flag."""
    from dspark_jax.decoding.tree import MODES, TreeConfig

    if args.tree_mode not in MODES:
        raise UsageError(f"--tree-mode must be one of {', '.join(MODES)}, got {args.tree_mode!r}")
    return None if args.tree is None else TreeConfig.parse(args.tree, args.tree_mode)


def _policies(args: EvalArgs) -> list[str]:
    policies = [v.strip() for v in args.verify.split(",") if v.strip()]
    if not policies:
        raise UsageError("--verify is empty; accepted: full, threshold:X, scheduler (comma-separated)")
    return list(dict.fromkeys(policies))


def _draft_paths(args: EvalArgs) -> list[tuple[str, str]]:
    """(label, path or hub id) per draft, in order."""
    if args.target is not None and args.draft is None and args.drafts is None:
        from dspark_jax.loading import has_own_draft

        if not has_own_draft(args.target):  # a DeepSeek-V4 -DSpark folder carries its own draft (V4 §4)
            raise UsageError("--target without --draft: pass --draft PATH|ID or --drafts A,B")
        return [(os.path.basename(os.path.normpath(args.target)) or args.target, args.target)]
    items = [d.strip() for d in args.drafts.split(",") if d.strip()] if args.drafts else [args.draft or "dspark"]
    if not items:
        raise UsageError("--drafts is empty; give comma-separated draft folders or hub ids")
    out = []
    for item in items:
        path = item
        if args.target is None and item in EMBEDDED_DRAFTS and not os.path.exists(item):
            path = EMBEDDED_DRAFTS[item]
        out.append((os.path.basename(os.path.normpath(path)) or item, path))
    labels = [label for label, _ in out]
    if len(set(labels)) < len(labels):  # same folder names: fall back to the arguments as given
        out = [(item, path) for item, (_, path) in zip(items, out)]
    if len({label for label, _ in out}) < len(out):
        raise UsageError(f"--drafts names a draft twice: {args.drafts!r}")
    return out


def run(args: EvalArgs, mesh=None) -> dict:
    import jax
    from tqdm import tqdm

    import dspark_jax as dj
    from dspark_jax import eval_data
    from dspark_jax.checkpoints import CALIBRATION_FILE, save_calibration
    from dspark_jax.decoding.calibration import fit_temperatures
    from dspark_jax.metrics import macro_average

    args = _resolve(args)
    tree = _tree(args)
    policies = _policies(args)
    draft_paths = _draft_paths(args)
    embedded = {os.path.realpath(p) for p in EMBEDDED_DRAFTS.values()}
    if args.save_calibration and os.path.realpath(draft_paths[0][1]) in embedded:
        raise UsageError(
            f"--save-calibration writes calibration.json into the draft's folder, and {draft_paths[0][1]} ships "
            "with the package; copy that folder and pass the copy as --draft"
        )
    text_sets = None
    if args.data is None:  # read (and download) every set before loading any model: bad names fail fast
        names = eval_data.parse_names(args.benchmarks or "paper")
        text_sets = eval_data.load_sets(names, args.data_dir, args.num_prompts, args.seed)
    if args.target is None and not os.path.isdir(DEFAULT_TARGET):
        raise DSparkError("the embedded default pair (dspark_jax/assets/tiny_code) is not built yet; pass --target")
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    check_memory(args.target or DEFAULT_TARGET, mesh, dtype)
    target = dj.load_target(args.target or DEFAULT_TARGET, dtype=dtype, mesh=mesh)
    drafts = [(label, dj.load_draft(path, target=target)) for label, path in draft_paths]
    for label, draft in drafts:
        cut = [p for p in policies if p != "full"]
        if cut and not draft.config.enable_confidence_head:
            raise UsageError(f"--verify {cut[0]} needs a draft with a confidence head; {label!r} has none")
    if args.save_calibration and not drafts[0][1].config.enable_confidence_head:
        raise UsageError(f"--save-calibration needs a draft with a confidence head; {draft_paths[0][1]!r} has none")
    context_len = target.config.max_position_embeddings
    if text_sets is None:
        ids = load_prompts(args.data, args.num_prompts, args.prompt_len, args.seed, target.tokenizer)
        sets = [EncodedSet(os.path.splitext(os.path.basename(args.data))[0], "other", ids)]
    else:
        sets = _encode_sets(text_sets, target.tokenizer, context_len)
    settings = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    total = sum(len(s.prompts) for s in sets) * (len(drafts) * len(policies) + int(args.compare))
    with tqdm(total=total, unit="prompt", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
        runner = Runner(target, settings, args.batch_size, warm_up=args.data is None or args.compare, progress=bar)
        plain = {}
        if args.compare:
            for s in sets:
                bar.set_description(f"plain {s.name}")
                plain[s.name] = runner.run(None, "plain", "full", s.prompts)
        rows, runs = [], {}
        for label, draft in drafts:
            for policy in policies:
                for s in sets:
                    bar.set_description(f"{label} {policy} {s.name}")
                    run_ = runner.run(draft, label, policy, s.prompts, tree)
                    runs[(label, policy, s.name)] = run_
                    limits = (args.max_new_tokens, context_len)
                    rows.append(_row(s, label, draft, policy, run_, plain.get(s.name), limits, tree))
        if args.save_calibration and args.temperature > 0:  # greedy rows score trees by probabilities: no factors
            label, draft = drafts[0]
            bar.total += sum(len(s.prompts) for s in sets)
            rank_tree = _rank_tree(draft, args)
            rank_runs = [runner.run(draft, f"{label} rank factors", "full", s.prompts, rank_tree) for s in sets]
    out = {}
    calibration = {}
    for label, draft in drafts:
        if not (draft.config.enable_confidence_head and "full" in policies) or tree is not None:
            continue
        pooled = [_rounds(runs[(label, "full", s.name)]) for s in sets]
        z, accepted, proposed = (np.concatenate([p[i] for p in pooled]) for i in range(3))
        temps = draft.calibration
        if args.save_calibration:
            raw = _calibration(draft, (z, accepted, proposed), None)["raw"]
            temps = fit_temperatures(z, accepted, proposed)
            fitted = _calibration(draft, (z, accepted, proposed), temps)["calibrated"]
            info = {"rounds": int(z.shape[0]), "ece_raw": raw["summary"]["ece"], "ece_fitted": fitted["summary"]["ece"]}
            info["fitted_on"] = dataclasses.asdict(args)
            if args.temperature > 0:
                out["rank_factors"] = _rank_factors(rank_tree, draft.config.block_size, rank_runs, sets)
                info["rank_factors"] = out["rank_factors"]["factors"]
                info["rank_factors_measured"] = {k: v for k, v in out["rank_factors"].items() if k != "factors"}
            elif getattr(draft, "rank_factors", None) is not None:  # greedy rounds measure none: keep the old ones
                with open(os.path.join(draft.path, CALIBRATION_FILE)) as f:
                    previous = json.load(f)
                info |= {k: previous[k] for k in ("rank_factors", "rank_factors_measured") if k in previous}
            out["calibration_file"] = save_calibration(draft.path, temps, draft.config.block_size, info)
            for row in rows:  # the rows now report the fitted temperatures
                if row["draft"] == label and row["verify"] == "full":
                    r = runs[(label, "full", row["benchmark"])]
                    row["calibration"] = _calibration(draft, _rounds(r), temps)["calibrated"]
        cal = _calibration(draft, (z, accepted, proposed), temps)
        calibration[label] = {
            "rounds": int(z.shape[0]),
            "summary": cal["raw"]["summary"],
            "per_slot": cal["raw"]["per_slot"],
            "reliability": cal["reliability"],
        }
        if "calibrated" in cal:
            calibration[label] |= {
                "calibrated": cal["calibrated"],
                "reliability_calibrated": cal["reliability_calibrated"],
            }
    macro = []
    macro_keys = MACRO_KEYS + (TREE_KEYS if tree is not None else ())
    for label, _ in drafts:
        for policy in policies:
            group = [r for r in rows if (r["draft"], r["verify"]) == (label, policy)]
            macro.append(
                {"benchmark": "macro-average", "draft": label, "verify": policy, "benchmarks": len(group)}
                | {"num_prompts": sum(r["num_prompts"] for r in group)}
                | macro_average(group, macro_keys)
            )
    config = dataclasses.asdict(args) | {
        "target": args.target or DEFAULT_TARGET,
        "drafts": {label: path for label, path in draft_paths},
        "dtype": dtype,
        "backend": jax.default_backend(),
        "context_len": context_len,
        "sets": {s.name: s.source for s in sets},
    }
    results = {**out, "rows": rows, "macro_average": macro, "calibration": calibration, "config": config}
    if args.data is not None and len(rows) == 1:  # the single-set JSON of the earlier CLI, kept for its users
        keep = ("rounds", "tau", "mean_proposal_length", "verify_rate", "prefix_survival", "conditional_acceptance")
        metrics = {k: rows[0][k] for k in keep if k in rows[0]}
        metrics |= {k: rows[0][k] for k in ("calibration_raw", "calibration") if k in rows[0]}
        results |= {"metrics": metrics, "num_prompts": rows[0]["num_prompts"], "new_tokens": rows[0]["new_tokens"]}
    return results


def _rank_tree(draft, args: EvalArgs):
    """The full tree the per-rank factors are measured on (trees §3): RANK_TREE capped at the block's capacity, in
    the calibration's mode, with the fallback factors so that a stored measurement never steers the next one (the
    loop supplies the draft's current temperatures)."""
    from dspark_jax.decoding.tree import RANK_FACTOR_FALLBACK, TreeConfig

    block = draft.config.block_size
    n, k, w = RANK_TREE
    fallback = tuple(tuple(RANK_FACTOR_FALLBACK**r for r in range(k)) for _ in range(block))
    return TreeConfig(min(n, TreeConfig(n, k, w).capacity(block)), k, w, args.tree_mode, rank_factors=fallback)


def _rank_factors(tree, block: int, rank_runs: list[SetRun], sets: list[EncodedSet]) -> dict:
    """Per-rank factors c_{d,r} from the accepted-rank histogram of the full-tree runs, pooled over the sets."""
    from dspark_jax.metrics import accepted_rank_histogram, rank_factors

    hist = sum(accepted_rank_histogram(run.accepted_ranks, block, tree.branch) for run in rank_runs)
    return {
        "factors": rank_factors(hist).tolist(),
        "tree": f"{tree.nodes},{tree.branch},{tree.beam}",
        "mode": tree.mode,
        "rounds": int(sum(len(a) for run in rank_runs for a in run.acceptance_lengths)),
        "accepted_rank_histogram": hist.tolist(),
        "sets": [s.name for s in sets],
    }


# ------------------------------------------------------------------------------------------------ output

SLOT_COLUMNS = (("accept", "conditional_acceptance"), ("survival", "prefix_survival"))
CSV_SCALARS = (
    "num_prompts",
    "rounds",
    "tau",
    "mean_proposal_length",
    "verify_rate",
    "tokens_per_s",
    "timed_warm",  # False: the only run was timed, compiling included (--data without --compare)
    "plain_tokens_per_s",
    "speedup",
    "ece",
)
CSV_TREE_SCALARS = ("tree", "tree_mode", "nodes_verified_per_round", "tau_per_verified_node", "share_rounds_off_rank0")


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def results_csv(results: dict) -> str:
    """One line per benchmark, draft and policy, then the macro averages: the paper's Table 1 layout."""
    table = results["rows"] + results["macro_average"]
    slots = max((len(r.get("conditional_acceptance") or []) for r in table), default=0)
    scalars = CSV_SCALARS + (CSV_TREE_SCALARS if any("tree" in r for r in table) else ())
    header = ["benchmark", "domain", "draft", "verify", *scalars]
    header += [f"{short}@{j}" for short, _ in SLOT_COLUMNS for j in range(slots)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in table:
        line = [r.get("benchmark"), r.get("domain", ""), r["draft"], r["verify"]]
        line += [_fmt(r.get(k)) for k in scalars]
        for _, key in SLOT_COLUMNS:
            values = list(r.get(key) or [])
            line += [_fmt(v) for v in values + [None] * (slots - len(values))]
        w.writerow(line)
    return buf.getvalue()


def results_table(results: dict) -> str:
    """The printed table: one line per row and macro average."""
    lines = [
        f"{'benchmark':<16}{'draft':<12}{'verify':<14}{'n':>5}{'tau':>7}{'tok/s':>9}{'speedup':>9}  "
        "conditional acceptance per slot"
    ]
    for r in results["rows"] + results["macro_average"]:
        n = r.get("num_prompts", "")
        tps, sp = r.get("tokens_per_s"), r.get("speedup")
        acc = " ".join(f"{a:.2f}" for a in (r.get("conditional_acceptance") or []) if a is not None)
        if r.get("nodes_verified_per_round") is not None:  # tree rounds: slots are depths
            acc += f" | {r['nodes_verified_per_round']:.1f} nodes/round, tau/node {r['tau_per_verified_node']:.3f}"
        tau = r.get("tau")
        lines.append(
            f"{r['benchmark']:<16}{r['draft']:<12}{r['verify']:<14}{n!s:>5}"
            f"{(f'{tau:.2f}' if tau is not None else '-'):>7}{(f'{tps:.1f}' if tps else '-'):>9}"
            f"{(f'{sp:.2f}x' if sp else '-'):>9}  {acc}"
        )
    return "\n".join(lines)


def write_outputs(results: dict, out_dir: str) -> list[str]:
    """DIR/results.json, DIR/results.csv and the plots; returns the paths written."""
    from dspark_jax.plots import write_plots

    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {out_dir!r} cannot be created ({type(e).__name__})") from None
    paths = [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "results.csv")]
    with open(paths[0], "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    with open(paths[1], "w") as f:
        f.write(results_csv(results))
    return paths + write_plots(results, out_dir)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    parallel = pop_parallel(ns)
    args = EvalArgs(**vars(ns))
    try:
        results = run(args, mesh=parallel.start())
        if args.out:
            results["files"] = write_outputs(results, args.out)
    except DSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.data is not None or args.json:
        print(json.dumps(results))
    else:
        print(results_table(results))
        if args.out:
            print(f"wrote {', '.join(results['files'])}")
    capped = sum(r["capped_prompts"] for r in results["rows"])
    if capped:
        print(
            f"warning: {capped} prompt runs reached the target's context ({results['config']['context_len']}) "
            "before --max-new-tokens",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
