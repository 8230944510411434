"""The training driver: data order, data-parallel placement, the step loop with a progress bar and a jsonl metrics
log, orbax checkpoints of the full train state, and exact resume (same data, keys, optimizer state)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dspark_jax.checkpoints import atomic_dir
from dspark_jax.errors import UsageError
from dspark_jax.sharding import ShardingRules, state_shardings
from dspark_jax.training.config import TrainConfig
from dspark_jax.training.data import Corpus, FeatureCache, batch_indices, corpus_fingerprint, steps_per_epoch
from dspark_jax.training.losses import DSPARK_LOSS_WEIGHTS
from dspark_jax.training.step import (
    OptimizerConfig,
    StepSpec,
    TrainState,
    compute_features,
    init_train_state,
    state_leaf_shardings,
    train_step,
)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
KEEP_CHECKPOINTS = 2


@dataclasses.dataclass
class TrainJob:
    """What one run trains, already split: `params` (nnx.Param only) and `frozen` (everything else) of the model
    `graphdef`; in mode 'draft' also the frozen target that supplies the context features."""

    mode: str
    graphdef: nnx.GraphDef
    params: nnx.State
    frozen: nnx.State
    target_graphdef: nnx.GraphDef | None = None
    target_state: nnx.State | None = None
    tap_layer_ids: tuple[int, ...] = ()
    num_anchors: int = 512
    loss_weights: tuple[float, float, float] = DSPARK_LOSS_WEIGHTS


@dataclasses.dataclass
class FitResult:
    state: TrainState
    frozen: nnx.State
    spec: StepSpec
    history: list[dict]
    total_steps: int

    def model(self) -> nnx.Module:
        return nnx.merge(self.spec.graphdef, self.state.params, self.frozen)


def total_steps(cfg: TrainConfig, num_seqs: int) -> int:
    per_epoch = steps_per_epoch(num_seqs, cfg.global_batch)
    if per_epoch < 1:
        raise UsageError(
            f"the corpus holds {num_seqs} sequence(s), fewer than one global batch "
            f"(batch_size * grad_accum = {cfg.global_batch})"
        )
    return cfg.max_steps or cfg.epochs * per_epoch


def make_spec(job: TrainJob, cfg: TrainConfig, num_steps: int) -> StepSpec:
    opt = OptimizerConfig(
        lr=cfg.lr,
        warmup_steps=int(cfg.warmup_fraction * num_steps),
        total_steps=num_steps,
        b1=cfg.adam_b1,
        b2=cfg.adam_b2,
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        grad_clip=cfg.grad_clip,
    )
    return StepSpec(
        job.mode,
        job.graphdef,
        opt,
        job.target_graphdef,
        tuple(job.tap_layer_ids),
        job.num_anchors,
        tuple(job.loss_weights),
        cfg.loss_decay_gamma,
    )


def _place(tree, mesh):
    if mesh is None or tree is None:
        return tree
    return jax.device_put(tree, state_shardings(tree, mesh, ShardingRules()))


def _batch_sharding(mesh, ndim: int):
    if mesh is None:
        return None
    return NamedSharding(mesh, PartitionSpec(None, "data", *([None] * (ndim - 2))))


# ------------------------------------------------------------------------------------------------- checkpoints


def _leaves(state: TrainState):
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    return [jax.tree_util.keystr(p) for p, _ in flat], [x for _, x in flat], treedef


def save_checkpoint(folder: str, state: TrainState, meta: dict) -> None:
    """Write the full train state (params, optimizer state, step) and `meta` atomically to `folder`."""
    import orbax.checkpoint as ocp

    names, leaves, _ = _leaves(state)
    with atomic_dir(folder) as tmp:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({**meta, "step": int(state.step), "leaves": names}, f, indent=1)
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "state"), {f"{i:05d}": x for i, x in enumerate(leaves)})
            ckptr.wait_until_finished()


def restore_checkpoint(folder: str, like: TrainState) -> tuple[TrainState, dict]:
    """Restore a state saved by `save_checkpoint` with the structure, dtypes and shardings of `like`."""
    import orbax.checkpoint as ocp

    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    names, leaves, treedef = _leaves(like)
    if meta["leaves"] != names:
        raise UsageError(
            f"checkpoint {folder!r} holds another model or optimizer than this run (its parameter list differs)"
        )
    target = {f"{i:05d}": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) for i, x in enumerate(leaves)}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(os.path.abspath(os.path.join(folder, "state")), target)
    return jax.tree_util.tree_unflatten(treedef, [restored[f"{i:05d}"] for i in range(len(leaves))]), meta


def latest_checkpoint(output_dir: str) -> str | None:
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return None
    steps = sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d{8}", d))
    return os.path.join(root, steps[-1]) if steps else None


def _prune(output_dir: str) -> None:
    root = os.path.join(output_dir, CHECKPOINT_DIR)
    steps = sorted(d for d in os.listdir(root) if re.fullmatch(r"step_\d{8}", d))
    for d in steps[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- batches


def _make_batch(
    corpus: Corpus, ids: np.ndarray, cfg: TrainConfig, job: TrainJob, cache: FeatureCache | None, mesh
) -> dict:
    shape = (cfg.grad_accum, cfg.batch_size)
    batch = {"tokens": corpus.tokens[ids].reshape(*shape, -1), "loss_mask": corpus.loss_mask[ids].reshape(*shape, -1)}
    if cache is not None:
        missing = [int(i) for i in ids if not cache.has(int(i))]
        for start in range(0, len(missing), cfg.batch_size):  # fixed [batch_size, seq] shape: one compile
            chunk = missing[start : start + cfg.batch_size]
            rows = chunk + [chunk[0]] * (cfg.batch_size - len(chunk))
            feats, last = compute_features(
                job.target_graphdef, job.target_state, jnp.asarray(corpus.tokens[rows]), job.tap_layer_ids
            )
            feats, last = np.asarray(feats), np.asarray(last)
            for k, seq_id in enumerate(chunk):
                cache.save(seq_id, feats[k], last[k])
        loaded = [cache.load(int(i)) for i in ids]  # always read back, so every epoch sees identical inputs
        batch["features"] = np.stack([f for f, _ in loaded]).reshape(*shape, *loaded[0][0].shape)
        batch["last_hidden"] = np.stack([h for _, h in loaded]).reshape(*shape, *loaded[0][1].shape)
    return {k: jax.device_put(v, _batch_sharding(mesh, v.ndim)) for k, v in batch.items()}


def _to_host(metrics: dict) -> dict:
    out = {}
    for k, v in jax.device_get(metrics).items():
        v = np.asarray(v)
        out[k] = v.tolist() if v.ndim else float(v)
    return out


# ---------------------------------------------------------------------------------------------------------- fit


def fit(job: TrainJob, corpus: Corpus, cfg: TrainConfig, *, mesh=None) -> FitResult:
    """Train `job` on `corpus` under `cfg`, writing checkpoints and metrics.jsonl under cfg.output_dir.

    With cfg.resume the latest checkpoint there is restored (train state incl. optimizer and step); the data order
    (batch_indices) and keys (fold_in(seed key, step)) are functions of the step, so the continuation is exactly the
    uninterrupted run. Stops at cfg.stop_at_step when set (after checkpointing), else after all steps.
    """
    num_steps = total_steps(cfg, len(corpus))
    if mesh is not None and cfg.batch_size % mesh.shape["data"]:
        raise UsageError(
            f"batch_size ({cfg.batch_size}) must be a multiple of the mesh's data axis ({mesh.shape['data']})"
        )
    spec = make_spec(job, cfg, num_steps)
    params = _place(job.params, mesh)
    frozen = _place(job.frozen, mesh)
    target_state = _place(job.target_state, mesh)
    job = dataclasses.replace(job, params=params, frozen=frozen, target_state=target_state)
    state = init_train_state(params, spec.optimizer)
    if mesh is not None:  # scalars (step, optimizer counts) replicated, so the layout is fixed from step 0
        replicated = NamedSharding(mesh, PartitionSpec())
        state = jax.tree.map(
            lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), state
        )
    meta = {
        "total_steps": num_steps,
        "seed": cfg.seed,
        "global_batch": cfg.global_batch,
        "num_sequences": len(corpus),
        "mode": cfg.mode,
    }
    os.makedirs(cfg.output_dir, exist_ok=True)
    log_path = os.path.join(cfg.output_dir, METRICS_FILE)
    if cfg.resume:
        ckpt = latest_checkpoint(cfg.output_dir)
        if ckpt is None:
            raise UsageError(f"resume: no checkpoint under {os.path.join(cfg.output_dir, CHECKPOINT_DIR)!r}")
        state, saved = restore_checkpoint(ckpt, state)
        for k, v in meta.items():
            if saved.get(k) != v:
                raise UsageError(
                    f"resume: checkpoint {ckpt!r} was written with {k}={saved.get(k)!r}, this run has "
                    f"{v!r}; resume with the same data and settings"
                )
        _truncate_log(log_path, int(state.step))
    elif os.path.exists(log_path):
        os.remove(log_path)
    shardings = state_leaf_shardings(state)
    start = int(state.step)
    end = min(cfg.stop_at_step or num_steps, num_steps)
    cache = None
    if cfg.feature_cache and job.mode == "draft":
        leaves = jax.tree.leaves(job.target_state)
        signature = {
            "target": os.path.abspath(cfg.target),
            "tap_layer_ids": list(job.tap_layer_ids),
            "dtype": str(leaves[0].dtype),
            "corpus": corpus_fingerprint(corpus),
        }
        cache = FeatureCache(cfg.feature_cache, signature)
    base_key = jax.random.key(cfg.seed)
    history: list[dict] = []
    from tqdm import tqdm

    per_epoch = steps_per_epoch(len(corpus), cfg.global_batch)
    with (
        tqdm(
            total=end, initial=start, desc=f"train {job.mode}", disable=not cfg.progress or None, dynamic_ncols=True
        ) as bar,
        open(log_path, "a") as log,
    ):
        for step in range(start, end):
            ids = batch_indices(step, len(corpus), cfg.global_batch, cfg.seed)
            batch = _make_batch(corpus, ids, cfg, job, cache, mesh)
            state, metrics = train_step(state, frozen, target_state, batch, base_key, spec=spec, shardings=shardings)
            done = step + 1
            if done % cfg.log_every == 0 or done == end:
                record = {"step": done, "epoch": step // per_epoch, **_to_host(metrics)}
                history.append(record)
                log.write(json.dumps(record) + "\n")
                log.flush()
                post = {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}"}
                if "tau" in record:
                    post["tau"] = f"{record['tau']:.2f}"
                bar.set_postfix(post)
            bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == end:
                save_checkpoint(os.path.join(cfg.output_dir, CHECKPOINT_DIR, f"step_{done:08d}"), state, meta)
                _prune(cfg.output_dir)
    return FitResult(state, frozen, spec, history, num_steps)


def _truncate_log(path: str, step: int) -> None:
    """Drop records past the restored step (written after the checkpoint by a run that then died)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)
