"""Benchmark CLI: plain vs speculative tokens/s in one process, τ, and the per-round time split (interfaces.md §6).

    python -m dspark_jax.bench --target T --draft D --batch 1 --max-new-tokens 128 --out bench.json
    python -m dspark_jax.bench --random-shape qwen3-4b --batch 1 32 --out h200.json   # random bf16 weights

Tokens/s come from `generate` (after one warm-up call that compiles), median over `--repeats` runs. The round
loop is one while_loop that cannot be timed inside, so the per-round split times separately jitted copies of its
pieces (draft backbone, sequential head + drafting, target verify pass, acceptance + commit) on the shapes of the
first round, with the round's caches donated as in the loop. The JSON is rewritten after every stage, so a run
cut short (time budget, out of memory) still leaves what it measured.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time

from dspark_jax.cli_util import OneLineArgumentParser
from dspark_jax.errors import DSparkError, UsageError

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny_code")
DEFAULT_TARGET = os.path.join(ASSETS, "target")
DEFAULT_DRAFT = os.path.join(ASSETS, "dspark")
DEFAULT_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
PAPER_TAUS = (1.0, 2.0, 4.0, 6.11)  # 6.11: the paper's Qwen3-4B DSpark τ (spec §8), for the throughput projection

# Random shapes: target geometry, then the draft's layers, block, feature layers, Markov rank and mask id (spec §3).
RANDOM_SHAPES = {
    "tiny": {
        "target": {
            "vocab_size": 256,
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 128,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "max_position_embeddings": 1024,
        },
        "draft_layers": 2,
        "block_size": 7,
        "target_layer_ids": (0, 1, 2),
        "markov_rank": 16,
        "mask_token_id": 255,
    },
    "qwen3-4b": {
        "target": {
            "vocab_size": 151936,
            "hidden_size": 2560,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "intermediate_size": 9728,
            "rope_theta": 1e6,
            "tie_word_embeddings": True,
            "max_position_embeddings": 40960,
        },
        "draft_layers": 5,
        "block_size": 7,
        "target_layer_ids": (1, 9, 17, 25, 33),
        "markov_rank": 256,
        "mask_token_id": 151669,
    },
}


@dataclasses.dataclass(frozen=True)
class BenchArgs:
    """The CLI's flags, one field each."""

    target: str | None = None
    draft: str | None = None
    random_shape: str | None = None
    batch: tuple[int, ...] = (1,)
    max_new_tokens: int = 128
    prompt_ids: str | None = None
    prompt_len: int = 64
    repeats: int = 5
    temperature: float = 0.0
    verify: str = "full"
    dtype: str | None = None
    seed: int = 0
    copy_mib: int | None = None
    time_budget: float | None = None
    out: str = "bench.json"


def build_parser() -> OneLineArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m dspark_jax.bench",
        description="Plain vs speculative decoding speed, τ and the per-round time split.",
    )
    p.add_argument("--target", help="target folder or hub id (default: the embedded tiny_code target)")
    p.add_argument("--draft", help="draft folder or hub id (default: the embedded DSpark draft)")
    p.add_argument(
        "--random-shape",
        choices=sorted(RANDOM_SHAPES),
        help="random weights at this shape instead of checkpoints (qwen3-4b: 36-layer target + 5-layer block-7 draft)",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes, e.g. --batch 1 32")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--prompt-ids",
        help="comma-separated prompt token ids (default: the tokenizer's default "
        "prompt, else random ids of --prompt-len)",
    )
    p.add_argument("--prompt-len", type=int, default=64, help="length of the random prompts (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument(
        "--verify", default="full", help="full | threshold:X | scheduler (spec §11: confidence + measured cost table)"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype (default: float32 on CPU, bfloat16 on accelerators and for --random-shape)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--copy-mib",
        type=int,
        default=None,
        help="size of the bandwidth probe copy (default: 4096 on GPU/TPU, 256 on CPU)",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; stages that would start after it are skipped (default: 200 for qwen3-4b)",
    )
    p.add_argument("--out", default="bench.json", help="output JSON path (written atomically after every stage)")
    return p


# ---------------------------------------------------------------------------------------------------- models


@functools.cache
def _filler():
    import jax
    import jax.numpy as jnp

    @functools.partial(jax.jit, static_argnums=(1, 2, 3))
    def fill(key, shape, dtype, kind):
        if kind == "ones":
            return jnp.ones(shape, dtype)
        if kind == "zeros":
            return jnp.zeros(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    return fill


def _random_state(model_cls, config, seed: int):
    """(graphdef, state) of `model_cls(config)` with random weights made on device: N(0, 0.02^2) matrices, norm
    scales 1, biases 0 (the models' own init). One small jit per distinct leaf shape, so a 36-layer stack
    compiles in seconds rather than as one huge init program."""
    import jax
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: model_cls(config, rngs=nnx.Rngs(seed))))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    base = jax.random.key(seed)
    values = []
    for i, (path, leaf) in enumerate(leaves):
        name = jax.tree_util.keystr(path)
        kind = "zeros" if "bias" in name else "ones" if "norm" in name else "normal"
        values.append(_filler()(jax.random.fold_in(base, i), tuple(leaf.shape), jax.numpy.dtype(leaf.dtype), kind))
    return graphdef, jax.tree_util.tree_unflatten(treedef, values)


def random_pair(shape: str, dtype: str, seed: int):
    """A random target and a DSpark draft bound to it (frozen embedding / LM-head copies, spec §5.3)."""
    from flax import nnx

    from dspark_jax.configs import DraftConfig, Qwen3Config
    from dspark_jax.loading import DraftHandle, Target
    from dspark_jax.models import Draft, Qwen3

    s = RANDOM_SHAPES[shape]
    tcfg = Qwen3Config(**s["target"]).with_dtype(dtype)
    dcfg = DraftConfig(
        model=dataclasses.replace(tcfg, num_hidden_layers=s["draft_layers"], tie_word_embeddings=False),
        block_size=s["block_size"],
        num_target_layers=tcfg.num_hidden_layers,
        target_layer_ids=s["target_layer_ids"],
        mask_token_id=s["mask_token_id"],
        markov_rank=s["markov_rank"],
        enable_confidence_head=True,
        confidence_head_with_markov=True,
    )
    tdef, tstate = _random_state(Qwen3, tcfg, seed)
    ddef, dstate = _random_state(Draft, dcfg, seed + 1)
    draft = nnx.merge(ddef, dstate)
    embed = tstate["embed_tokens"][...]
    draft.embed_tokens[...] = embed
    draft.lm_head[...] = embed.T if tcfg.tie_word_embeddings else tstate["lm_head"][...]
    ddef, dstate = nnx.split(draft)
    return (Target(tcfg, tdef, tstate, f"<random {shape}>"), DraftHandle(dcfg, ddef, dstate, f"<random {shape}>"))


def _state_bytes(state) -> int:
    import jax

    return int(sum(x.nbytes for x in jax.tree.leaves(state)))


# ------------------------------------------------------------------------------------------------- timing


def _median_time(fn, make_args, iters: int) -> tuple[float, list[float]]:
    """Median wall time of fn(*make_args()) over `iters` calls after one warm-up (compile) call.

    make_args builds fresh inputs for every call outside the timed region (donated buffers are consumed).
    """
    import jax

    jax.block_until_ready(fn(*make_args()))
    times = []
    for _ in range(iters):
        args = make_args()
        jax.block_until_ready(args)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def copy_bandwidth(nbytes: int, iters: int = 10) -> dict:
    """Device memory bandwidth from an elementwise pass over a big array (reads and writes `nbytes` each)."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((nbytes // 2,), jnp.bfloat16)
    step = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))
    med, times = _median_time(step, lambda: (x,), iters)
    return {"bytes": nbytes, "median_s": med, "seconds": times, "gb_per_s": 2 * nbytes / med / 1e9}


def dispatch_overhead(iters: int = 50) -> float:
    """Median time of a trivial jitted call: every separately timed piece of the split pays it once."""
    import jax
    import jax.numpy as jnp

    x = jnp.zeros((8,), jnp.float32)
    return _median_time(jax.jit(lambda a: a + 1), lambda: (x,), iters)[0]


def _roofline(c, weight_bytes: int, bw: float, batch: int, ctx: int, dtype: str) -> dict:
    """Plain decoding bound: each step reads every weight once (plus the KV cache at context `ctx`)."""
    kv_bytes = (
        2 * c.num_hidden_layers * batch * ctx * c.num_key_value_heads * c.head_dim * (2 if dtype == "bfloat16" else 4)
    )
    return {
        "weight_bytes": weight_bytes,
        "kv_bytes_per_step": kv_bytes,
        "bandwidth_gb_per_s": bw,
        "plain_step_s": weight_bytes / (bw * 1e9),
        "plain_tokens_per_s": batch * bw * 1e9 / weight_bytes,
        "plain_tokens_per_s_with_kv": batch * bw * 1e9 / (weight_bytes + kv_bytes),
    }


def measure_generate(target, draft, prompts, args: BenchArgs) -> dict:
    """Warm-up generate (compiles), then `repeats` timed runs; tokens/s from the median."""
    import dspark_jax as dj

    kw = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "seed": args.seed,
        "verify": args.verify if draft is not None else "full",
    }
    t0 = time.perf_counter()
    dj.generate(target, draft, prompts, **kw)
    warmup = time.perf_counter() - t0
    runs = [dj.generate(target, draft, prompts, **kw) for _ in range(args.repeats)]
    secs = [r.seconds for r in runs]
    med = statistics.median(secs)
    r = runs[0]
    acc = [a for row in r.acceptance_lengths for a in row]
    props = [k for row in r.proposal_lengths for k in row]
    return {
        "warmup_s": warmup,
        "seconds": secs,
        "median_s": med,
        "new_tokens": r.new_tokens,
        "tokens_per_s": r.new_tokens / med,
        "max_rounds": max(map(len, r.acceptance_lengths)),  # while_loop iterations: the slowest row's rounds
        "tau": r.tau if draft is not None else 1.0,
        "mean_proposal": statistics.fmean(props) if props else 0.0,
        "acceptance_histogram": [acc.count(i) for i in range(max(acc, default=0) + 1)],
    }


@functools.cache
def _pieces():
    """Jitted loops that repeat one piece of a round n times (n traced: one compile per piece and shape).

    The carry threads each piece's output into its next iteration through a test that is never true at run
    time (`> 1e30`) but that XLA cannot fold, so no iteration can be hoisted out of the loop. The caches stay
    inside the loop as in the decode loop (written in place), and the round's other inputs are loop invariants.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dspark_jax.decoding import loop
    from dspark_jax.decoding.propose import draft_backbone, sample_slots
    from dspark_jax.decoding.verify import target_pass

    def anchors_of(state):
        pos = state.lengths - 1
        return state.tokens[jnp.arange(pos.shape[0]), pos], pos

    def never(*arrays):
        """bool scalar, False at run time, that depends on every element of `arrays`."""
        return sum(jnp.sum(a.astype(jnp.float32)) for a in arrays) > 1e30

    @functools.partial(jax.jit, static_argnames=("draft_def",))
    def backbone(n, draft_def, draft_state, state):
        draft = nnx.merge(draft_def, draft_state)
        anchors, pos = anchors_of(state)

        def body(_, carry):
            cache, _ = carry
            hidden, new = draft_backbone(draft, cache, state.pending, state.num_pending, anchors, pos)
            return dataclasses.replace(new, lengths=cache.lengths), hidden

        return jax.lax.fori_loop(0, n, body, body(0, (state.draft_cache, None)))[1]

    @functools.partial(jax.jit, static_argnames=("draft_def", "spec"))
    def head(n, draft_def, draft_state, state, hidden, *, spec):
        draft = nnx.merge(draft_def, draft_state)
        anchors, _ = anchors_of(state)
        _, draft_keys, _ = loop._row_keys(state.keys)
        keys = None if spec.sampling.greedy else draft_keys

        def body(_, h):
            p = sample_slots(draft, h, anchors, spec.sampling, keys)
            return h + never(p.tokens, p.probs, p.confidence_logits).astype(h.dtype)

        return jax.lax.fori_loop(0, n, body, hidden)

    @functools.partial(jax.jit, static_argnames=("draft_def", "spec"))
    def proposal(draft_def, draft_state, state, hidden, *, spec):
        anchors, _ = anchors_of(state)
        _, draft_keys, _ = loop._row_keys(state.keys)
        return sample_slots(
            nnx.merge(draft_def, draft_state),
            hidden,
            anchors,
            spec.sampling,
            None if spec.sampling.greedy else draft_keys,
        )

    @functools.partial(jax.jit, static_argnames=("target_def", "spec"))
    def verify(n, target_def, target_state, state, drafts, *, spec):
        target = nnx.merge(target_def, target_state)
        anchors, pos = anchors_of(state)
        block = anchors[:, None] if drafts is None else jnp.concatenate([anchors[:, None], drafts], axis=1)

        def body(_, carry):
            cache, tokens = carry[:2]
            logits, taps, new = target_pass(target, cache, tokens, pos, spec.tap_layer_ids)
            flag = never(logits) if taps is None else never(logits, taps)
            return dataclasses.replace(new, lengths=cache.lengths), tokens + flag.astype(tokens.dtype), logits, taps

        return jax.lax.fori_loop(0, n, body, body(0, (state.target_cache, block)))[2:]  # (logits, taps)

    @functools.partial(jax.jit, static_argnames=("spec",))
    def accept_commit(n, state, proposal, logits, taps, *, spec):
        keys, _, accept_keys = loop._row_keys(state.keys)
        small = ("tokens", "pending", "num_pending", "acceptance", "proposals")

        def body(_, carry):
            # The logits depend on the carry too, or XLA would hoist the whole acceptance out of the loop.
            varied = logits + never(carry["tokens"]).astype(logits.dtype)
            new = loop._accept_and_commit(
                dataclasses.replace(state, **carry),
                spec,
                proposal,
                varied,
                taps,
                state.target_cache,
                state.draft_cache,
                keys,
                accept_keys,
            )
            # Lengths, done flags and round counters are reset so that every iteration commits the same round.
            flag = never(
                new.lengths,
                new.done,
                new.target_cache.lengths,
                *(() if new.draft_cache is None else (new.draft_cache.lengths,)),
            )
            out = {k: getattr(new, k) for k in small if getattr(new, k) is not None}
            out["tokens"] = out["tokens"] + flag.astype(jnp.int32)
            return out

        init = {k: getattr(state, k) for k in small if getattr(state, k) is not None}
        return jax.lax.fori_loop(0, n, body, init)

    return backbone, head, proposal, verify, accept_commit


def _per_iteration(fn, args, kwargs, reps: int, n: int = 16) -> float:
    """Seconds per iteration of a piece: (t(1 + n) - t(1)) / n, medians of `reps` calls each; the difference
    cancels dispatch, argument handling and the loop's entry copies."""
    t1, _ = _median_time(lambda: fn(1, *args, **kwargs), lambda: (), reps)
    tn, _ = _median_time(lambda: fn(1 + n, *args, **kwargs), lambda: (), reps)
    return max(tn - t1, 0.0) / n


def round_split(target, draft, prep, reps: int) -> dict:
    """Per-round time of each piece on the first round's shapes (seconds)."""
    backbone, head, proposal, verify, accept_commit = _pieces()
    spec = prep.spec
    state = prep.prefill(target, draft)
    out = {"prefill_s": _median_time(lambda: prep.prefill(target, draft), lambda: (), reps)[0]}
    tdef, tstate = target.graphdef, target.state
    if draft is None:
        out["verify_s"] = _per_iteration(verify, (tdef, tstate, state, None), {"spec": spec}, reps)
        logits, taps = verify(1, tdef, tstate, state, None, spec=spec)
        out["accept_commit_s"] = _per_iteration(accept_commit, (state, None, logits, taps), {"spec": spec}, reps)
        out["pieces_sum_s"] = out["verify_s"] + out["accept_commit_s"]
        return out
    ddef, dstate = draft.graphdef, draft.state
    out["draft_backbone_s"] = _per_iteration(backbone, (ddef, dstate, state), {}, reps)
    hidden = backbone(1, ddef, dstate, state)
    out["sequential_head_s"] = _per_iteration(head, (ddef, dstate, state, hidden), {"spec": spec}, reps)
    prop = proposal(ddef, dstate, state, hidden, spec=spec)
    out["verify_s"] = _per_iteration(verify, (tdef, tstate, state, prop.tokens), {"spec": spec}, reps)
    logits, taps = verify(1, tdef, tstate, state, prop.tokens, spec=spec)
    out["accept_commit_s"] = _per_iteration(accept_commit, (state, prop, logits, taps), {"spec": spec}, reps)
    out["pieces_sum_s"] = sum(out[k] for k in ("draft_backbone_s", "sequential_head_s", "verify_s", "accept_commit_s"))
    return out


# ---------------------------------------------------------------------------------------------------- run


def machine_info() -> dict:
    import jax

    dev = jax.devices()[0]
    return {
        "platform": jax.default_backend(),
        "device_kind": dev.device_kind,
        "num_devices": jax.device_count(),
        "jax_version": jax.__version__,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "os": platform.platform(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def _prompts(args: BenchArgs, target, batch: int) -> list[list[int]]:
    import numpy as np

    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--prompt-ids must be comma-separated integers, got {args.prompt_ids!r}") from None
        return [ids] * batch
    if target.tokenizer is not None:
        return [target.tokenizer.encode_prompt(DEFAULT_PROMPT)] * batch
    rng = np.random.default_rng(args.seed)
    return rng.integers(0, target.config.vocab_size, (batch, args.prompt_len)).tolist()


def _write(path: str, report: dict) -> None:
    from dspark_jax.checkpoints import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(report, f, indent=1)


def _validate(args: BenchArgs) -> None:
    from dspark_jax.configs import SamplingConfig, VerifyPolicy

    SamplingConfig(args.temperature)
    VerifyPolicy.parse(args.verify)
    for name in ("max_new_tokens", "prompt_len", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(b < 1 for b in args.batch):
        raise UsageError(f"--batch sizes must be >= 1, got {list(args.batch)}")
    if args.random_shape and (args.target or args.draft):
        raise UsageError("--random-shape builds its own models; drop --target/--draft")
    if not args.random_shape and not (args.target and args.draft):
        if args.target or args.draft:
            raise UsageError("pass both --target and --draft (or neither, for the embedded pair)")
        if not os.path.isdir(DEFAULT_TARGET):
            raise UsageError(
                "the embedded default pair (dspark_jax/assets/tiny_code) is not built yet; pass "
                "--target and --draft, or --random-shape"
            )
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {args.out!r}: folder {folder} does not exist")


def run(args: BenchArgs, log=print) -> dict:
    _validate(args)
    import jax

    import dspark_jax as dj
    from dspark_jax.decoding.loop import prepare

    t_start = time.perf_counter()
    accel = jax.default_backend() != "cpu"
    dtype = args.dtype or ("bfloat16" if accel or args.random_shape else "float32")
    budget = args.time_budget if args.time_budget is not None else (200.0 if args.random_shape == "qwen3-4b" else None)
    report = {
        "schema": "dspark_jax.bench/1",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python -m dspark_jax.bench " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "config": {**dataclasses.asdict(args), "dtype": dtype, "time_budget": budget},
        "results": [],
        "skipped": [],
        "errors": [],
    }

    def stage(name, fn):
        """Run one stage unless the budget is spent; record its error instead of dying; save the report."""
        elapsed = time.perf_counter() - t_start
        if budget is not None and elapsed > budget:
            report["skipped"].append({"stage": name, "reason": f"time budget {budget:.0f} s spent ({elapsed:.0f} s)"})
            log(f"skip {name}: time budget")
            return None
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - a benchmark records a failed stage and goes on
            report["errors"].append({"stage": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            log(f"error in {name}: {type(e).__name__}: {str(e)[:200]}")
            value = None
        log(f"{name}: {time.perf_counter() - t0:.1f} s")
        report["total_s"] = time.perf_counter() - t_start
        _write(args.out, report)
        return value

    if not args.random_shape:
        # Loading errors are usage errors (missing folder, mismatched pair): they reach main() before any output.
        target = dj.load_target(args.target or DEFAULT_TARGET, dtype=dtype)
        draft = dj.load_draft(args.draft or DEFAULT_DRAFT, target=target)
    copy_mib = args.copy_mib or (4096 if accel else 256)
    report["bandwidth"] = stage("bandwidth", lambda: copy_bandwidth(copy_mib << 20))
    if args.random_shape:
        pair = stage("random weights", lambda: random_pair(args.random_shape, dtype, args.seed))
        if pair is None:
            return report
        target, draft = pair
    weight_bytes = _state_bytes(target.state)
    report["config"]["target"] = {
        **dataclasses.asdict(target.config),
        "path": target.path,
        "weight_bytes": weight_bytes,
    }
    dc = draft.config
    report["config"]["draft"] = {
        "path": draft.path,
        "block_size": dc.block_size,
        "layers": dc.model.num_hidden_layers,
        "markov_rank": dc.markov_rank,
        "markov_head_type": dc.markov_head_type,
        "confidence_head": dc.enable_confidence_head,
        "target_layer_ids": list(dc.target_layer_ids),
        "weight_bytes": _state_bytes(draft.state),
    }
    bw = (report.get("bandwidth") or {}).get("gb_per_s")
    iters = max(3, 2 * args.repeats)
    kw = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    entries = []
    # Pass 1: tokens/s for every batch size (what matters most comes first under a time budget).
    for batch in args.batch:
        prompts = _prompts(args, target, batch)
        entry = {"batch": batch, "prompt_lens": sorted({len(p) for p in prompts})}
        report["results"].append(entry)
        entries.append((entry, prompts))
        entry["plain"] = stage(f"plain b{batch}", lambda p=prompts: measure_generate(target, None, p, args))
        entry["speculative"] = stage(
            f"speculative b{batch}", lambda p=prompts: measure_generate(target, draft, p, args)
        )
        if entry["plain"] and entry["speculative"]:
            entry["speedup"] = entry["speculative"]["tokens_per_s"] / entry["plain"]["tokens_per_s"]
        if bw:
            entry["roofline"] = _roofline(
                target.config, weight_bytes, bw, batch, max(entry["prompt_lens"]) + args.max_new_tokens // 2, dtype
            )
        _write(args.out, report)
    # Pass 2: the per-round split.
    report["dispatch_s"] = stage("dispatch", dispatch_overhead)
    for entry, prompts in entries:
        batch = entry["batch"]
        plain, spec = entry["plain"], entry["speculative"]
        split = entry["split"] = stage(
            f"split b{batch}",
            lambda p=prompts: round_split(target, draft, prepare(target, draft, p, verify=args.verify, **kw), iters),
        )
        psplit = entry["plain_split"] = stage(
            f"plain split b{batch}", lambda p=prompts: round_split(target, None, prepare(target, None, p, **kw), iters)
        )
        if split and spec:
            # Loop time per round from generate (prefill excluded), next to the sum of the separately timed pieces.
            split["round_s"] = (spec["median_s"] - split["prefill_s"]) / max(spec["max_rounds"], 1)
            split["loop_overhead_s"] = split["round_s"] - split["pieces_sum_s"]
            entry["projected_tokens_per_s"] = {str(t): batch * t / split["round_s"] for t in PAPER_TAUS}
        if psplit and plain:
            psplit["step_s"] = (plain["median_s"] - psplit["prefill_s"]) / max(plain["max_rounds"], 1)
            psplit["loop_overhead_s"] = psplit["step_s"] - psplit["pieces_sum_s"]
        _write(args.out, report)
    report["total_s"] = time.perf_counter() - t_start
    _write(args.out, report)
    return report


def _summary(report: dict) -> str:
    m = report["machine"]
    lines = [f"{m['platform']} ({m['device_kind']}), jax {m['jax_version']}"]
    if report.get("bandwidth"):
        lines.append(f"bandwidth {report['bandwidth']['gb_per_s']:.1f} GB/s")
    if report.get("dispatch_s"):
        lines.append(f"dispatch overhead per timed piece {report['dispatch_s'] * 1e3:.3f} ms")
    for e in report["results"]:
        p, s, sp = e.get("plain") or {}, e.get("speculative") or {}, e.get("split") or {}
        line = (
            f"batch {e['batch']}: plain {p.get('tokens_per_s', float('nan')):.1f} tok/s | speculative "
            f"{s.get('tokens_per_s', float('nan')):.1f} tok/s, tau {s.get('tau', float('nan')):.2f}"
        )
        if "speedup" in e:
            line += f" | speedup {e['speedup']:.2f}x"
        lines.append(line)
        if sp:
            parts = " ".join(
                f"{k[:-2]} {sp[k] * 1e3:.2f}"
                for k in ("draft_backbone_s", "sequential_head_s", "verify_s", "accept_commit_s", "round_s")
                if k in sp
            )
            lines.append(f"  round split (ms): {parts}")
    for err in report["errors"]:
        lines.append(f"error in {err['stage']}: {err['error']}")
    for sk in report["skipped"]:
        lines.append(f"skipped {sk['stage']}: {sk['reason']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    args = BenchArgs(**{**vars(ns), "batch": tuple(ns.batch)})
    try:
        report = run(args, log=lambda msg: print(msg, file=sys.stderr))
    except DSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(_summary(report))
    print(f"wrote {args.out}")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
