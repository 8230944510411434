"""CLI: python -m dspark_jax.train — train a DSpark / DFlash draft against a frozen Qwen3 or DeepSeek-V4 target
(spec §9, V4 §4), or the target itself on next-token CE; one flag per TrainConfig field. The trained model is
exported next to the run's checkpoints and metrics (DeepSpec layout for Qwen3 drafts, HF Qwen3 layout for Qwen3
targets, the native V4 layout for V4 targets and a V4 -DSpark folder, target + mtp.*, for V4 drafts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

from dspark_jax.cli_util import OneLineArgumentParser
from dspark_jax.configs import DeepseekV4Config, DraftConfig, Qwen3Config, read_config_json
from dspark_jax.errors import DSparkError, UsageError
from dspark_jax.training.config import MODES, TrainConfig

# The MoE dispatch of training steps: exact like every variant, with a static shape that reverse mode can take.
TRAIN_MOE_IMPL = "dense"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated numbers CE,L1,confidence, got {text!r}") from None


def build_parser() -> OneLineArgumentParser:
    d = TrainConfig.__dataclass_fields__
    p = OneLineArgumentParser(
        prog="python -m dspark_jax.train",
        description=__doc__.splitlines()[0],
        epilog="""examples:
  python -m dspark_jax.train --mode draft --target dspark_jax/assets/tiny_code/target --data regen.jsonl \\
      --output-dir runs/draft --draft-config draft.json --seq-len 256
  # draft.json: {"num_hidden_layers": 1, "block_size": 7, "target_layer_ids": [0, 2, 4], "mask_token_id": 1,
  #   "num_anchors": 64, "markov_rank": 64, "markov_head_type": "vanilla", "enable_confidence_head": true,
  #   "confidence_head_with_markov": true}   (the embedded draft's: see its TRAINING.md)
  python -m dspark_jax.train --mode target --target-config config.json --tokenizer tokenizer.json --data corpus \\
      --output-dir runs/target""",
    )
    p.add_argument("--mode", required=True, choices=MODES, help="draft: train a draft; target: train the target")
    p.add_argument("--target", help="target folder or hub id (the frozen teacher, or the model trained in mode target)")
    p.add_argument(
        "--target-config",
        help="mode target: an HF Qwen3 or DeepSeek-V4 config.json for a fresh random target (instead of --target; "
        "needs --tokenizer)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="a .jsonl of {'input_ids' or 'ids': [...], 'loss_mask': [...] (optional)} or a folder of .txt files",
    )
    p.add_argument("--output-dir", required=True, help="run folder: checkpoints/, metrics.jsonl, exported model")
    p.add_argument("--draft", help="draft folder to continue training (mode draft)")
    p.add_argument(
        "--draft-config",
        help="JSON of DSpark fields (block_size, target_layer_ids, mask_token_id, "
        "markov_rank, ...) over the target's config, for a fresh draft",
    )
    p.add_argument("--tokenizer", help="tokenizer.json for text data (default: the target folder's)")
    for name, kind, help_ in (
        ("seq_len", int, "static sequence length (longer sequences are truncated / windowed)"),
        ("min_supervised", int, "drop sequences with fewer supervised tokens (spec §9.1)"),
        ("batch_size", int, "sequences per micro-step over all devices (a multiple of the data axis)"),
        ("grad_accum", int, "micro-steps per update"),
        ("epochs", int, "epochs (ignored with --max-steps)"),
        ("max_steps", int, "total updates (0: epochs x floor(sequences / global batch))"),
        ("stop_at_step", int, "checkpoint and stop after this update (0: run to the end)"),
        ("lr", float, "peak learning rate"),
        ("warmup_fraction", float, "linear warmup updates as a fraction of all updates"),
        ("weight_decay", float, "AdamW weight decay"),
        ("adam_b1", float, "AdamW beta1"),
        ("adam_b2", float, "AdamW beta2"),
        ("adam_eps", float, "AdamW epsilon"),
        ("grad_clip", float, "global gradient-norm clip"),
        ("num_anchors", int, "anchors per sequence (0: the draft config's num_anchors)"),
        ("loss_decay_gamma", float, "slot weight exp(-j / gamma)"),
        ("seed", int, "base PRNG seed (init, anchors, data order)"),
        ("checkpoint_every", int, "updates between checkpoints"),
        ("log_every", int, "updates between metrics.jsonl records"),
    ):
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=d[name].default, help=help_)
    p.add_argument(
        "--loss-weights",
        type=_floats,
        default=None,
        help="CE,L1,confidence (default: 0.1,0.9,1.0 for DSpark, 1,0,0 for DFlash)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="compute dtype (default: float32 on CPU, bfloat16 on accelerators); master weights are f32",
    )
    p.add_argument("--mesh", default=d["mesh"].default, help="mesh axis sizes, e.g. data=4")
    p.add_argument("--feature-cache", help="folder caching the target's features per sequence (mode draft)")
    p.add_argument("--export-dtype", choices=("float32", "bfloat16"), default=d["export_dtype"].default)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def parse_config(argv: list[str] | None) -> TrainConfig:
    """Flags -> TrainConfig (argparse errors exit 2 with one line; bad values raise UsageError)."""
    return TrainConfig(**vars(build_parser().parse_args(argv)))


# --------------------------------------------------------------------------------------------------------- setup


def _training_model_config(config, compute: str):
    """`config` computing in `compute` with f32 master weights (spec §9.5)."""
    model = config.model if hasattr(config, "model") else config
    model = dataclasses.replace(model, dtype=compute, param_dtype="float32")
    if isinstance(model, DeepseekV4Config):  # 'auto' (blocked) loops a data-dependent count: no reverse mode
        model = dataclasses.replace(model, moe_impl=TRAIN_MOE_IMPL)
    return dataclasses.replace(config, model=model) if hasattr(config, "model") else model


def _read_json(path: str, flag: str) -> dict:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path!r} does not exist")
    try:
        with open(path) as f:
            fields = json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{flag} {path} is not valid JSON ({e.msg})") from None
    if not isinstance(fields, dict):
        raise UsageError(f"{flag} {path} must hold a JSON object")
    return fields


# The DSpark fields a --draft-config may set besides the target's own config.json keys (spec §5.1).
DRAFT_FIELDS = (
    "num_hidden_layers",
    "block_size",
    "target_layer_ids",
    "mask_token_id",
    "markov_rank",
    "markov_head_type",
    "enable_confidence_head",
    "confidence_head_with_markov",
    "num_anchors",
)


def _draft_config_from_json(path: str, target) -> DraftConfig:
    fields = _read_json(path, "--draft-config")
    target_fields = read_config_json(target.path)
    known = set(DRAFT_FIELDS) | set(target_fields)
    unknown = sorted(set(fields) - known)
    if unknown:  # a misspelt field would silently leave its default in place
        raise UsageError(
            f"--draft-config {path}: unknown field(s) {', '.join(map(repr, unknown))}; accepted: "
            f"{', '.join(DRAFT_FIELDS)} or a key of the target's config.json"
        )
    merged = {
        **target_fields,
        "num_hidden_layers": 5,
        **fields,
        "num_target_layers": target.config.num_hidden_layers,
        "architectures": ["Qwen3DSparkModel"],
    }
    config = DraftConfig.from_hf_dict(merged, path)
    config.check_target(target.config)
    return config


def _target_class(config):
    from dspark_jax.models import DeepseekV4, Qwen3

    return DeepseekV4 if isinstance(config, DeepseekV4Config) else Qwen3


def _v4_draft_job(cfg: TrainConfig, compute: str, target):
    """A DeepSeek-V4 DSpark draft (V4 §4) against the loaded V4 `target`: fresh from --draft-config (training/v4.py's
    fields; `use_markov: false` = the DFlash-style twin) or continued from a -DSpark folder."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dspark_jax import loading
    from dspark_jax.models import DeepseekV4Draft
    from dspark_jax.training import v4

    if cfg.draft is not None:
        handle = loading.load_draft(cfg.draft, target)
        config = _training_model_config(handle.config, compute)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: DeepseekV4Draft(config, rngs=nnx.Rngs(0))))
        model = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), handle.state))
        use_markov = bool(jnp.any(model.markov_head.markov_w2[...] != 0))  # a zero head is the DFlash twin's
        num_anchors = v4.V4_DEFAULTS["num_anchors"]
    else:
        fields = _read_json(cfg.draft_config, "--draft-config")
        config, extras = v4.draft_settings(fields, target.config, cfg.draft_config)
        config = _training_model_config(config, compute)
        use_markov, num_anchors = extras["use_markov"], extras["num_anchors"]
        model = DeepseekV4Draft(config, rngs=nnx.Rngs(cfg.seed))
        t = target.state
        head = t["embed"][...].T if target.config.tie_word_embeddings else t["head"][...]
        model.embed[...] = jnp.asarray(t["embed"][...], jnp.float32)  # the target's arrays, Frozen (V4 §4)
        model.head[...] = jnp.asarray(head, jnp.float32)
        if not use_markov:
            v4.zero_markov(model)
    split = nnx.split(model, v4.trainable_filter(use_markov), ...)
    return _draft_job(cfg, compute, target, split, config, use_markov or config.enable_confidence_head, num_anchors)


def _draft_job(cfg: TrainConfig, compute: str, target, split, config, is_dspark: bool, num_anchors: int):
    """The draft's TrainJob from its (graphdef, params, frozen) split: the spec §9 loss weights of its kind and the
    frozen target as teacher, cast to the compute dtype (it only runs forward); --num-anchors overrides the draft's
    own `num_anchors`."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dspark_jax.training.loop import TrainJob
    from dspark_jax.training.losses import DFLASH_LOSS_WEIGHTS, DSPARK_LOSS_WEIGHTS

    weights = cfg.loss_weights or (DSPARK_LOSS_WEIGHTS if is_dspark else DFLASH_LOSS_WEIGHTS)
    teacher_graphdef, teacher_state = target.graphdef, target.state
    if compute != "float32":
        tc = target.config.with_dtype(compute)
        teacher_graphdef = nnx.graphdef(nnx.eval_shape(lambda: _target_class(tc)(tc, rngs=nnx.Rngs(0))))
        teacher_state = jax.tree.map(
            lambda x: x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x, target.state
        )
    layer_ids = tuple(config.target_layer_ids)
    # A sequence has fewer than seq_len candidate anchors and all of them are drawn when they are fewer than asked
    # for (spec §9.3.2): more anchors would only be padding, each a whole block of the draft's forward.
    anchors = min(cfg.num_anchors or num_anchors, cfg.seq_len)
    job = TrainJob("draft", *split, teacher_graphdef, teacher_state, layer_ids, anchors, tuple(weights))
    return job, config, target


def build_job(cfg: TrainConfig, compute: str):
    """Load the models named by `cfg` and split them for training: (TrainJob, model config for export, target)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dspark_jax import loading
    from dspark_jax.models import Draft
    from dspark_jax.training.loop import TrainJob
    from dspark_jax.training.step import split_trainable

    f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)  # noqa: E731
    if cfg.mode == "target" and cfg.target_config is not None:
        fields = _read_json(cfg.target_config, "--target-config")
        kind = DeepseekV4Config if DeepseekV4Config.is_hf_dict(fields) else Qwen3Config
        config = _training_model_config(kind.from_hf_dict(fields, cfg.target_config), compute)
        gd, params, frozen = split_trainable(_target_class(config)(config, rngs=nnx.Rngs(cfg.seed)))  # N(0, 0.02^2)
        return TrainJob("target", gd, params, frozen), config, None
    if cfg.mode == "target":
        target = loading.load_target(cfg.target, dtype="float32")
        config = _training_model_config(target.config, compute)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: _target_class(config)(config, rngs=nnx.Rngs(0))))
        gd, params, frozen = split_trainable(nnx.merge(graphdef, target.state))
        return TrainJob("target", gd, params, frozen), config, target
    # f32 first: a continued draft is loaded in the target's param dtype and must keep full-precision masters.
    target = loading.load_target(cfg.target, dtype="float32")
    if isinstance(target.config, DeepseekV4Config):
        return _v4_draft_job(cfg, compute, target)
    if cfg.draft is not None:
        handle = loading.load_draft(cfg.draft, target)
        config = _training_model_config(handle.config, compute)
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: Draft(config, rngs=nnx.Rngs(0))))
        model = nnx.merge(graphdef, f32(handle.state))
    else:
        config = _training_model_config(_draft_config_from_json(cfg.draft_config, target), compute)
        model = Draft(config, rngs=nnx.Rngs(cfg.seed))  # reference init: N(0, 0.02^2), norms 1, biases 0
        t = target.state
        lm_head = t["embed_tokens"][...].T if target.config.tie_word_embeddings else t["lm_head"][...]
        model.embed_tokens[...] = jnp.asarray(t["embed_tokens"][...], jnp.float32)  # frozen copies (spec §5.3)
        model.lm_head[...] = jnp.asarray(lm_head, jnp.float32)
    is_dspark = config.use_markov or config.enable_confidence_head
    return _draft_job(
        cfg, compute, target, split_trainable(model), config, is_dspark, cfg.num_anchors or config.num_anchors
    )


# ------------------------------------------------------------------------------------------- V4 export (V4 §3, §4.2)

# Each accepted-spelling alternative of the loader's key maps -> the native spelling we write.
_NATIVE = (
    (r"(?:model\.)?", ""),
    (r"(?:model\.embed_tokens|embed)", "embed"),
    (r"(?:lm_head|head)", "head"),
    (r"(?:model\.hc_head\.hc_|hc_head_)", "hc_head_"),
    (r"(?:markov_w1|embed)", "markov_w1"),
    (r"(?:markov_w2|head)", "markov_w2"),
    (r"(?:kv_)?", "kv_"),
)


def native_keymap(keymap, last_stage: int = 0):
    """The loader's key map with one spelling per entry (native), so it inverts to unique checkpoint keys; the
    draft's un-numbered `mtp.\\d+.` rows (final norm, hc_head, heads) name the last stage."""
    out = []
    for pattern, tpl, fn in keymap:
        for alt, native in _NATIVE:
            pattern = pattern.replace(alt, native)
        pattern = pattern.replace(r"mtp\.\d+\.", rf"mtp\.{last_stage}\.")
        out.append((pattern, tpl, fn))
    return tuple(out)


def export_v4_target(dst: str, config: DeepseekV4Config, state, dtype: str, extras=()) -> None:
    """A V4 target state -> native-layout folder (model.safetensors + config.json [+ tokenizer files])."""
    from conversion.export import export_tensors, write_folder
    from conversion.keymaps.deepseek_v4 import DEEPSEEK_V4_KEYMAP

    d = {**config.to_hf_dict(), "torch_dtype": dtype}
    write_folder(dst, export_tensors(state, native_keymap(DEEPSEEK_V4_KEYMAP), dtype), d, tuple(extras))


def export_v4_draft(dst: str, config, state, target, dtype: str) -> None:
    """A V4 -DSpark folder (V4 §4.2): the target's tensors plus the draft under mtp.0..S-1, one config.json with the
    dspark_* fields, the target's tokenizer files. `target` is the loading.Target the draft was trained against."""
    from conversion.export import export_tensors, write_folder
    from conversion.keymaps.deepseek_v4 import DEEPSEEK_V4_DRAFT_KEYMAP, DEEPSEEK_V4_KEYMAP

    tensors = export_tensors(target.state, native_keymap(DEEPSEEK_V4_KEYMAP), dtype)
    keymap = native_keymap(DEEPSEEK_V4_DRAFT_KEYMAP, config.num_stages - 1)
    tensors.update(export_tensors(state, keymap, dtype, skip=(("embed",), ("head",))))  # bound: the target's own
    d = {**target.config.to_hf_dict(), **config.to_hf_fields(), "torch_dtype": dtype}
    d["compress_ratios"] = list(target.config.compress_ratios) + [0] * config.num_stages  # stages are SWA-only
    names = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
    extras = tuple(p for p in (os.path.join(target.path, n) for n in names) if os.path.isfile(p))
    write_folder(dst, tensors, d, extras)


def _export(cfg: TrainConfig, config, state, target) -> None:
    """Write the trained model into output_dir itself (config.json last, so a folder with one is complete)."""
    from conversion.export import export_draft, export_target

    tmp = os.path.join(cfg.output_dir, ".export")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.mode == "draft" and isinstance(target.config, DeepseekV4Config):
        export_v4_draft(tmp, config, state, target, cfg.export_dtype)  # a -DSpark folder: target + mtp.*
    elif cfg.mode == "draft":
        export_draft(tmp, config, state, cfg.export_dtype)
    elif isinstance(config, DeepseekV4Config):
        folders = [os.path.dirname(os.path.abspath(cfg.tokenizer))] if target is None else [target.path]
        extras = tuple(
            os.path.join(folders[0], f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folders[0], f))
        )
        export_v4_target(tmp, config, state, cfg.export_dtype, extras)
    else:
        folders = [os.path.dirname(os.path.abspath(cfg.tokenizer))] if target is None else [target.path]
        extras = tuple(
            os.path.join(folders[0], f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folders[0], f))
        )
        export_target(tmp, config, state, cfg.export_dtype, extras)
    names = sorted(os.listdir(tmp), key=lambda n: n == "config.json")
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(cfg.output_dir, name))
    os.rmdir(tmp)


def run(cfg: TrainConfig) -> dict:
    """Validate, load, train, export. Returns a summary dict (last metrics, steps, output folder)."""
    import jax
    from flax import nnx

    from dspark_jax.sharding import make_mesh
    from dspark_jax.training import loop
    from dspark_jax.training.data import load_corpus

    mesh = make_mesh(cfg.mesh)
    if cfg.batch_size % mesh.shape["data"]:
        raise UsageError(
            f"batch_size ({cfg.batch_size}) must be a multiple of the mesh's data axis ({mesh.shape['data']})"
        )
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise UsageError(f"--output-dir {cfg.output_dir!r} is a file; give a folder (new, or a run's with --resume)")
    if not cfg.resume and loop.latest_checkpoint(cfg.output_dir) is not None:
        raise UsageError(f"--output-dir {cfg.output_dir!r} already holds a run; pass --resume or choose another folder")
    compute = cfg.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    job, config, target = build_job(cfg, compute)
    tokenizer = cfg.tokenizer or os.path.join(target.path, "tokenizer.json")
    vocab = (target.config if target is not None else config).vocab_size
    corpus = load_corpus(
        cfg.data, cfg.seq_len, tokenizer_path=tokenizer, min_supervised=cfg.min_supervised, vocab_size=vocab
    )
    loop.total_steps(cfg, len(corpus))  # fail before anything is written
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "train_config.json"), "w") as f:
        json.dump({**cfg.to_json_dict(), "compute_dtype": compute, "num_sequences": len(corpus)}, f, indent=2)
    result = loop.fit(job, corpus, cfg, mesh=mesh)
    finished = int(result.state.step) == result.total_steps
    if finished:
        _export(cfg, config, nnx.state(result.model()), target)
    last = result.history[-1] if result.history else {}
    return {
        "steps": int(result.state.step),
        "total_steps": result.total_steps,
        "finished": finished,
        "output_dir": cfg.output_dir,
        "last": last,
    }


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_config(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, one `error:` line already printed)
        return int(e.code or 0)
    except DSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out = run(cfg)
    except DSparkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last = out["last"]
    state = "done" if out["finished"] else "stopped (continue with --resume)"
    print(
        f"{state}: {out['steps']}/{out['total_steps']} updates, loss {last.get('loss', float('nan')):.4f} -> "
        f"{out['output_dir']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
