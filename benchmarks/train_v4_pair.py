"""Train a tiny DeepSeek-V4 pair end to end and measure tau (issue 12 item 3): a V4-architecture target on the
stdlib corpus (`python -m dspark_jax.train --mode target`), then against it a V4 DSpark draft (Markov head +
confidence head, spec §9.4 losses 0.1 / 0.9 / 1.0) and its DFlash-style twin (same draft, no Markov term, no
confidence head, CE only), both exported as V4 -DSpark folders (target + mtp.*) and loaded with `dj.load_draft`.
tau = committed tokens per round of `dj.generate` on windows of the held-out files, greedy and T = 1.

    python -m dspark_jax.training.corpus --out corpus --vocab-size 4096
    python benchmarks/train_v4_pair.py --corpus corpus --work runs/v4pair --out benchmarks/results/train_v4_pair.json

A stage whose folder already holds a finished export is reused (so the script resumes after an interruption);
`--target-checkpoint` exports a target from a training checkpoint instead (a run stopped early on a slow machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

# The tiny V4 target: every V4 part (mHC over 4 streams, SWA + CSA layers with compressor and indexer, one hash-routed
# MoE layer, top-k MoE with bias and a shared expert, hc_head), scaled to train on a CPU.
TARGET_CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "vocab_size": 4096,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "qk_rope_head_dim": 8,
    "q_lora_rank": 64,
    "o_groups": 2,
    "o_lora_rank": 32,
    "sliding_window": 64,
    "compress_ratios": [0, 4, 0, 4],
    "num_hash_layers": 1,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "index_n_heads": 4,
    "index_head_dim": 16,
    "index_topk": 16,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 128,
    "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True,
    "routed_scaling_factor": 1.5,
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "eos_token_id": 0,
}
DRAFT = {"block_size": 7, "mask_token_id": 1, "target_layer_ids": [1, 2, 3], "markov_rank": 64, "num_anchors": 32}
DRAFTS = {
    "dspark": DRAFT,
    "dflash": {**DRAFT, "use_markov": False, "enable_confidence_head": False},
}


def _done(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
        os.path.join(folder, "model.safetensors")
    )


def _train(argv: list[str]) -> float:
    from dspark_jax import train

    start = time.perf_counter()
    rc = train.main(argv + ["--no-progress"])
    if rc:
        raise SystemExit(f"training failed ({rc}): {' '.join(argv)}")
    return time.perf_counter() - start


def export_target_checkpoint(checkpoint: str, config_path: str, tokenizer: str, dst: str) -> None:
    """Export the params of a `--mode target` training checkpoint as a V4 folder (as a finished run would)."""
    import jax
    from flax import nnx

    from dspark_jax import train
    from dspark_jax.training import loop, step
    from dspark_jax.training.config import TrainConfig

    cfg = TrainConfig(
        mode="target", target=None, target_config=config_path, tokenizer=tokenizer, data="-", output_dir=dst
    )
    job, config, _ = train.build_job(cfg, "float32")
    like = step.init_train_state(job.params, step.OptimizerConfig())
    state, _ = loop.restore_checkpoint(checkpoint, like)
    model = nnx.merge(job.graphdef, state.params, job.frozen)
    extras = tuple(
        p for p in (os.path.join(os.path.dirname(tokenizer), f) for f in train.TOKENIZER_FILES) if os.path.isfile(p)
    )
    train.export_v4_target(dst, config, nnx.state(model), "bfloat16", extras)
    jax.clear_caches()


def measure(target_dir: str, draft_dir: str, prompts, max_new_tokens: int, temperature: float, seed: int) -> dict:
    """tau and losslessness of one draft on `prompts` (greedy output is compared with plain greedy)."""
    import numpy as np

    import dspark_jax as dj
    from dspark_jax.metrics import speculative_metrics

    target = dj.load_target(target_dir, dtype="float32")
    draft = dj.load_draft(draft_dir, target)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, stop_token_ids=[])
    start = time.perf_counter()
    out = dj.generate(target, draft, prompts, **kw)
    seconds = time.perf_counter() - start
    m = speculative_metrics(out.acceptance_lengths, out.proposal_lengths, draft.config.block_size)
    row = {
        "temperature": temperature,
        "tau": m["tau"],
        "rounds": m["rounds"],
        "prefix_survival": [round(x, 4) for x in m.get("prefix_survival", [])],
        "seconds": round(seconds, 2),
    }
    if temperature == 0:
        plain = dj.generate(target, None, prompts, **kw).tokens
        row["greedy_equals_plain"] = out.tokens == plain
    row["mean_new_tokens"] = float(np.mean([len(t) for t in out.tokens]))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", required=True, help="folder from python -m dspark_jax.training.corpus")
    p.add_argument("--work", required=True, help="run folder (target/, dspark/, dflash/, features/)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "train_v4_pair.json"))
    p.add_argument("--target-steps", type=int, default=220)
    p.add_argument("--target-checkpoint", help="export the target from this training checkpoint instead")
    p.add_argument("--draft-steps", type=int, default=150)
    p.add_argument("--draft-batch", type=int, default=4)
    p.add_argument("--draft-lr", type=float, default=2e-3)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    corpus, work = args.corpus, args.work
    os.makedirs(work, exist_ok=True)
    tokenizer = os.path.join(corpus, "tokenizer.json")
    config_path = os.path.join(work, "target_config.json")
    with open(config_path, "w") as f:
        json.dump(TARGET_CONFIG, f, indent=1)
    report = {"target_config": TARGET_CONFIG, "drafts": {}, "timings_s": {}, "machine": "2-core CPU, shared (loaded)"}
    target_dir = os.path.join(work, "target")
    if args.target_checkpoint:
        export_target_checkpoint(args.target_checkpoint, config_path, tokenizer, target_dir)
        report["target_from_checkpoint"] = os.path.basename(os.path.normpath(args.target_checkpoint))
    elif not _done(target_dir):
        report["timings_s"]["target"] = _train(
            ["--mode", "target", "--target-config", config_path, "--tokenizer", tokenizer]
            + ["--data", os.path.join(corpus, "train.jsonl"), "--output-dir", target_dir]
            + ["--seq-len", "256", "--batch-size", "8", "--max-steps", str(args.target_steps), "--lr", "2e-3"]
            + ["--checkpoint-every", "110", "--log-every", "5"]
        )
    for name, fields in DRAFTS.items():
        folder = os.path.join(work, name)
        fields_path = os.path.join(work, f"{name}.json")
        with open(fields_path, "w") as f:
            json.dump(fields, f)
        if not _done(folder):
            report["timings_s"][name] = _train(
                ["--mode", "draft", "--target", target_dir, "--draft-config", fields_path]
                + ["--data", os.path.join(corpus, "train.jsonl"), "--output-dir", folder]
                + ["--seq-len", "256", "--batch-size", str(args.draft_batch), "--max-steps", str(args.draft_steps)]
                + ["--lr", str(args.draft_lr), "--feature-cache", os.path.join(work, "features"), "--log-every", "5"]
                + ["--checkpoint-every", str(args.draft_steps)]
            )
        with open(os.path.join(folder, "metrics.jsonl")) as f:
            history = [json.loads(line) for line in f if line.strip()]
        last = history[-5:]
        report["drafts"][name] = {
            "fields": fields,
            "train_steps": history[-1]["step"],
            "train_loss_first": history[0]["loss"],
            "train_loss_last5": sum(r["loss"] for r in last) / len(last),
            "train_tau_teacher_forced_last5": sum(r["tau"] for r in last) / len(last),
        }

    from dspark_jax.evaluate import load_prompts

    prompts = load_prompts(os.path.join(corpus, "heldout.jsonl"), args.num_prompts, args.prompt_len, args.seed)
    report["eval"] = {
        "data": "heldout.jsonl",
        "num_prompts": len(prompts),
        "prompt_len": args.prompt_len,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    for name in DRAFTS:
        rows = []
        for temperature in (0.0, 1.0):
            rows.append(measure(target_dir, os.path.join(work, name), prompts, args.max_new_tokens, temperature, 0))
            print(name, rows[-1], flush=True)
        report["drafts"][name]["decode"] = rows
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(
        json.dumps(
            {n: [(r["temperature"], round(r["tau"], 3)) for r in d["decode"]] for n, d in report["drafts"].items()}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
