"""CLI: python -m dspark_jax.generate — speculative (or plain) generation with stats; see interfaces.md §4."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types

from dspark_jax.cli_util import OneLineArgumentParser, add_parallel_flags, enable_compile_cache, pop_parallel
from dspark_jax.errors import DSparkError, UsageError
from dspark_jax.memory_plan import check_memory

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_code")
DEFAULT_TARGET = os.path.join(ASSETS, "target")
DEFAULT_DRAFT = os.path.join(ASSETS, "dspark")
DEFAULT_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
EXAMPLES = """examples:
  python -m dspark_jax.generate                        # the embedded pair, speculative vs plain
  python -m dspark_jax.generate --prompt "def parse(path):" --max-new-tokens 64 --temperature 0.7 --top-p 0.9
  python -m dspark_jax.generate --target Qwen/Qwen3-4B --draft deepseek-ai/dspark_qwen3_4b_block7 --verify scheduler
  python -m dspark_jax.generate --no-draft --prompt-ids 1,2,3 --json
"""


@dataclasses.dataclass(frozen=True)
class GenerateArgs:
    """The CLI's flags, one field each."""

    target: str | None = None
    draft: str | None = None
    no_draft: bool = False
    prompt: str | None = None
    prompt_ids: str | None = None
    prompts_file: str | None = None
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    verify: str = "full"
    dtype: str | None = None
    compare: bool = False
    json: bool = False
    no_stream: bool = False
    no_compile_cache: bool = False
    tree: str | None = None  # "N[,K[,W]]": tree rounds (trees §7); None = the chain
    tree_mode: str = "auto"


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m dspark_jax.generate",
        description="Generate with a target and a DSpark draft (defaults: the embedded pair).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", help="target folder or hub id (default: the embedded tiny_code target)")
    p.add_argument("--draft", help="draft folder or hub id (default: the embedded DSpark draft)")
    p.add_argument("--no-draft", action="store_true", help="plain decoding with the target alone")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text (through the chat template when the tokenizer has one)")
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    src.add_argument("--prompts-file", help='jsonl with {"turns": ["..."]} or {"prompt_ids": [...]} per line')
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--verify", default="full", help="full | threshold:X | scheduler (spec §11: confidence + measured cost table)"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype (default: float32 on CPU, bfloat16 on accelerators)",
    )
    p.add_argument("--compare", action="store_true", help="also run plain decoding and report the speedup")
    p.add_argument("--tree", help="draft tree N[,K[,W]]: N nodes, K children per node, beam W (default: a chain)")
    p.add_argument("--tree-mode", default="auto", help="topk | swor | iid | auto (topk at temperature 0, swor above)")
    p.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and stats")
    p.add_argument(
        "--no-stream", action="store_true", help="print the text when it is complete (default: as rounds complete)"
    )
    p.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="do not use the persistent compilation cache (default: on, in $XDG_CACHE_HOME/dspark_jax/xla)",
    )
    add_parallel_flags(p)
    return p


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise UsageError("--prompt-ids is empty; give at least one token id")
    return ids


def _read_prompts_file(path: str, tokenizer) -> list[list[int]]:
    from dspark_jax.eval_data import read_prompt_rows

    rows = read_prompt_rows(path, "--prompts-file", ("prompt_ids",))
    return [_encode(row, tokenizer) if isinstance(row, str) else row for row in rows]


def _encode(text: str, tokenizer) -> list[int]:
    if tokenizer is None:
        raise UsageError("a text prompt needs a tokenizer.json in the target folder; use --prompt-ids instead")
    return tokenizer.encode_prompt(text)


TIMED_RUNS = 3  # timed runs per mode after the compiling one; the median is reported


def _timed(target, draft, prompts, args: GenerateArgs, compare: bool, on_tokens=None):
    """(speculative result, plain result or None): each mode compiles with one run, then the modes take turns for
    TIMED_RUNS runs each, so both see the same machine; each result carries its median time. `on_tokens` streams
    the first (compiling) run of the first mode."""
    import statistics

    import dspark_jax as dj

    kwargs = dict(
        prompts=prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    tree = _tree(args) if draft else None
    modes = [(draft, args.verify if draft else "full", tree)] + ([(None, "full", None)] if compare else [])
    for i, (d, verify, t) in enumerate(modes):
        dj.generate(target, d, verify=verify, on_tokens=on_tokens if i == 0 else None, tree=t, **kwargs)
    runs = [[dj.generate(target, d, verify=v, tree=t, **kwargs) for d, v, t in modes] for _ in range(TIMED_RUNS)]
    out = []
    for i in range(len(modes)):
        results = [r[i] for r in runs]
        out.append(dataclasses.replace(results[0], seconds=statistics.median(r.seconds for r in results)))
    return out[0], (out[1] if compare else None)


def run(args: GenerateArgs, mesh=None) -> dict:
    import jax

    import dspark_jax as dj
    from dspark_jax.decoding.loop import check_prompts

    # Validate every flag before anything is loaded or compiled.
    dj.SamplingConfig(args.temperature, args.top_p, args.top_k)
    dj.VerifyPolicy.parse(args.verify)
    _tree(args)
    if args.tree is not None and args.no_draft:
        raise UsageError(f"--tree {args.tree} needs a draft; drop --no-draft")
    if not isinstance(args.max_new_tokens, int) or args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be a positive integer, got {args.max_new_tokens}")
    target_path = args.target or DEFAULT_TARGET
    draft_path = None if args.no_draft else (args.draft or (DEFAULT_DRAFT if args.target is None else None))
    if args.target is None and not os.path.isdir(DEFAULT_TARGET):
        raise DSparkError("the embedded default pair (dspark_jax/assets/tiny_code) is not built yet; pass --target")
    if args.draft is None and args.target is not None and not args.no_draft:
        from dspark_jax.loading import has_own_draft

        if not has_own_draft(args.target):  # a DeepSeek-V4 -DSpark folder carries its own draft (V4 §4)
            raise UsageError("--target without --draft: pass --draft PATH|ID or --no-draft")
        draft_path = args.target
    if args.no_draft and args.compare:
        raise UsageError("--compare sets speculative decoding beside plain decoding; with --no-draft there is none")
    if args.no_draft and args.verify != "full":
        raise UsageError(f"--verify {args.verify} needs a draft; with --no-draft only 'full' applies")
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    check_memory(target_path, mesh, dtype)
    target = dj.load_target(target_path, dtype=dtype, mesh=mesh)
    draft = dj.load_draft(draft_path, target=target) if draft_path else None
    if args.prompt_ids is not None:
        prompts = [_parse_ids(args.prompt_ids)]
    elif args.prompts_file is not None:
        prompts = _read_prompts_file(args.prompts_file, target.tokenizer)
    else:
        if args.prompt is None and target.tokenizer is None:
            raise UsageError(
                f"{target_path!r} has no tokenizer.json for the default text prompt; pass --prompt-ids or "
                "--prompts-file"
            )
        prompts = [_encode(args.prompt if args.prompt is not None else DEFAULT_PROMPT, target.tokenizer)]
    check_prompts(prompts, target.config.vocab_size, target.config.max_position_embeddings)  # before any is shown
    tok = target.tokenizer
    streamed = _streams(args, len(prompts))
    printer = None
    if streamed:
        printer = _StreamPrinter(tok, args.prompt if args.prompt is not None and tok else _text(prompts[0], tok))
    result, plain = _timed(target, draft, prompts, args, args.compare and draft is not None, printer)
    if printer is not None:
        printer.close()
        print("-" * 60)
    tps = result.new_tokens / max(result.seconds, 1e-9)
    plain_tps = plain.new_tokens / max(plain.seconds, 1e-9) if plain else None
    return {
        "prompts": [
            {
                "prompt_ids": p,
                "tokens": t,
                "text": tok.decode(t) if tok else None,
                "acceptance_lengths": a,
                "proposal_lengths": q,
                **({"nodes_verified": nv, "accepted_ranks": ar} if args.tree is not None else {}),
            }
            for p, t, a, q, nv, ar in zip(
                prompts,
                result.tokens,
                result.acceptance_lengths,
                result.proposal_lengths,
                result.nodes_verified or [None] * len(prompts),
                result.accepted_ranks or [None] * len(prompts),
            )
        ],
        "tau": result.tau if draft is not None else 1.0,
        **(_tree_stats(result) if args.tree is not None and draft is not None else {}),
        "new_tokens": result.new_tokens,
        "seconds": result.seconds,
        "tokens_per_s": tps,
        "plain_tokens_per_s": plain_tps,
        "speedup": tps / plain_tps if plain_tps else None,
        "config": {
            **dataclasses.asdict(args),
            "target": target_path,
            "draft": draft_path,
            "dtype": dtype,
            "backend": jax.default_backend(),
        },
    }


def _tree_stats(result) -> dict:
    """Tree rounds' totals (trees §9): nodes verified per round and tau per verified node (anchor included)."""
    rounds = sum(len(r) for r in result.nodes_verified)
    nodes = sum(map(sum, result.nodes_verified))
    committed = sum(map(sum, result.acceptance_lengths))
    return {
        "nodes_verified_per_round": nodes / max(rounds, 1),
        "tau_per_verified_node": committed / max(nodes + rounds, 1),
    }


def _tree(args: GenerateArgs):
    """--tree / --tree-mode as a TreeConfig (None without --tree); raises UsageError on bad values."""
    from dspark_jax.decoding.tree import MODES, TreeConfig

    if args.tree_mode not in MODES:
        raise UsageError(f"--tree-mode must be one of {', '.join(MODES)}, got {args.tree_mode!r}")
    return None if args.tree is None else TreeConfig.parse(args.tree, args.tree_mode)


def _text(ids: list[int], tokenizer) -> str:
    return tokenizer.decode(ids) if tokenizer else " ".join(map(str, ids)) + " "


class _StreamPrinter:
    """generate()'s on_tokens for one prompt: prints the continuation as it grows. The whole continuation is
    decoded each time and only the new suffix printed, so tokens that form one character together print once it
    is complete (a trailing U+FFFD means an incomplete UTF-8 sequence: held back)."""

    def __init__(self, tokenizer, prompt: str):
        self.tokenizer, self.prompt, self.ids, self.shown = tokenizer, prompt, [], 0

    def __call__(self, pieces: list[list[int]]) -> None:
        if self.prompt is not None:  # printed once the request has passed validation and prefill
            print(self.prompt, end="", flush=True)
            self.prompt = None
        self.ids += pieces[0]
        text = _text(self.ids, self.tokenizer)
        if text.endswith("\ufffd"):
            return
        print(text[self.shown :], end="", flush=True)
        self.shown = len(text)

    def close(self) -> None:
        print(_text(self.ids, self.tokenizer)[self.shown :])


def _streams(args: GenerateArgs, num_prompts: int) -> bool:
    """Whether the text streams while it is generated: one prompt, human output, not --no-stream."""
    return not args.json and not args.no_stream and num_prompts == 1


def _print_human(out: dict, streamed: bool) -> None:
    for p in [] if streamed else out["prompts"]:
        print(p["text"] if p["text"] is not None else " ".join(map(str, p["tokens"])))
        print("-" * 60)
    line = (
        f"tau {out['tau']:.2f} | {out['new_tokens']} tokens in {out['seconds']:.2f} s | {out['tokens_per_s']:.1f} tok/s"
    )
    if "nodes_verified_per_round" in out:
        line += f" | {out['nodes_verified_per_round']:.1f} nodes verified/round"
    if out["speedup"] is not None:
        line += f" | plain {out['plain_tokens_per_s']:.1f} tok/s | speedup {out['speedup']:.2f}x"
    print(line)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ns = build_parser().parse_args(argv)
    parallel = pop_parallel(ns)
    # The bare command is the demo: it also shows the speedup over plain decoding on the same prompt.
    args = GenerateArgs(**{**vars(ns), "compare": ns.compare or not argv})
    if not args.no_compile_cache and __name__ == "__main__":  # a real CLI run, not main() called in a process
        enable_compile_cache()
    try:
        out = run(args, mesh=parallel.start())
    except DSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out))
    else:
        _print_human(out, streamed=_streams(args, len(out["prompts"])))
    return 0


class _CallableModule(types.ModuleType):
    """Importing this module sets the package attribute `dspark_jax.generate` to the module, hiding the API
    function `dj.generate` (interfaces.md §3) for the rest of the process; calls go on to that function."""

    def __call__(self, *args, **kwargs):
        from dspark_jax.decoding.loop import generate

        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
