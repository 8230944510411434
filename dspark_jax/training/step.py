"""The jitted train step over the split state (spec §9.5): AdamW with linear warmup + cosine decay, global-norm
clipping, gradient accumulation, f32 master weights; only `nnx.Param` variables are trained (the draft's `Frozen`
embedding / LM-head copies are a different Variable type and never reach the optimizer).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dspark_jax.training.data import build_blocks, candidate_anchors, sample_anchors
from dspark_jax.training.forward import draft_forward, target_features
from dspark_jax.training.losses import DSPARK_LOSS_WEIGHTS, draft_loss, target_loss


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW and its schedule: `warmup_steps` linear warmup updates, then cosine to 0 at `total_steps`."""

    lr: float = 6e-4
    warmup_steps: int = 0
    total_steps: int = 1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0


def lr_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """Update s (0-based) uses lr * (s + 1) / warmup during warmup, then lr * (1 + cos(pi * p)) / 2 with
    p = (s - warmup) / (total - warmup) (spec §9.5)."""
    warmup, total, peak = cfg.warmup_steps, cfg.total_steps, cfg.lr

    def schedule(count):
        s = jnp.asarray(count, jnp.float32)
        warm = peak * (s + 1.0) / max(warmup, 1)
        p = jnp.clip((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
        cosine = 0.5 * peak * (1.0 + jnp.cos(math.pi * p))
        return jnp.where(s < warmup, warm, cosine)

    return schedule


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clip the global gradient norm, then AdamW (f32 moments over the f32 master weights)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay),
    )


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about one compiled step (hashable: it keys the jit cache).

    mode 'draft': `graphdef` is a Draft whose context comes from the frozen target (`target_graphdef`, taps
    `tap_layer_ids`) or from cached features in the batch. mode 'target': `graphdef` is a Qwen3 trained on
    next-token CE.
    """

    mode: str
    graphdef: nnx.GraphDef
    optimizer: OptimizerConfig
    target_graphdef: nnx.GraphDef | None = None
    tap_layer_ids: tuple[int, ...] = ()
    num_anchors: int = 512
    loss_weights: tuple[float, float, float] = DSPARK_LOSS_WEIGHTS
    loss_decay_gamma: float = 4.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """params: nnx.State of the trained `nnx.Param`s (f32 master weights); opt_state: optax state; step: i32[]
    number of updates applied."""

    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array


def split_trainable(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, frozen): params are exactly the `nnx.Param` variables; everything else (the `Frozen`
    copies) is passed to the step but never differentiated or updated."""
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    return graphdef, params, frozen


def init_train_state(params: nnx.State, optimizer: OptimizerConfig) -> TrainState:
    # f32 master weights (spec §9.5); a copy, because the step donates them and the caller may still hold the model.
    params = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), params)
    opt_state = jax.jit(make_optimizer(optimizer).init)(params)
    return TrainState(params, opt_state, jnp.zeros((), jnp.int32))


def loss_fn(
    params: nnx.State, frozen: nnx.State, target_state: nnx.State | None, micro: dict, key: jax.Array, spec: StepSpec
):
    """Loss of one micro-batch. micro: tokens i32[batch, seq], loss_mask [batch, seq], and optionally cached
    `features` [batch, seq, taps * hidden] / `last_hidden` [batch, seq, hidden]. Returns (loss, metrics)."""
    model = nnx.merge(spec.graphdef, params, frozen)
    tokens, loss_mask = micro["tokens"], micro["loss_mask"]
    if spec.mode == "target":
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        hidden, _, _ = model(tokens, positions)
        return target_loss(model.logits(hidden), tokens, loss_mask)
    if "features" in micro:
        features, last_hidden = micro["features"], micro["last_hidden"]
    else:
        target = nnx.merge(spec.target_graphdef, target_state)
        features, last_hidden = target_features(target, tokens, spec.tap_layer_ids)
    # One stream per row of the micro-batch: anchors do not depend on how the batch is sharded.
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(tokens.shape[0]))
    anchors, keep = sample_anchors(loss_mask, spec.num_anchors, row_keys)
    c = model.config
    blocks = build_blocks(
        tokens,
        loss_mask,
        anchors,
        keep,
        block_size=c.block_size,
        mask_token_id=c.mask_token_id,
        loss_decay_gamma=spec.loss_decay_gamma,
    )
    if getattr(c, "flavour", None) == "deepseek_v4":  # V4 stages, context rings and heads (V4 §4)
        from dspark_jax.training.v4 import v4_draft_forward

        outputs = v4_draft_forward(model, features, last_hidden, blocks)
    else:
        outputs = draft_forward(model, features, last_hidden, blocks)
    return draft_loss(outputs, blocks, spec.loss_weights, candidate_anchors(loss_mask))


@functools.partial(jax.jit, static_argnames=("spec", "shardings"), donate_argnames=("state",))
def train_step(
    state: TrainState,
    frozen: nnx.State,
    target_state: nnx.State | None,
    batch: dict,
    base_key: jax.Array,
    *,
    spec: StepSpec,
    shardings: tuple | None = None,
) -> tuple[TrainState, dict]:
    """One optimizer update. `state` is donated.

    batch: tokens i32[accum, batch, seq], loss_mask [accum, batch, seq] (+ cached features [accum, batch, seq, ...]).
    The accum micro-batches are each normalised on their own and their gradients averaged with equal weight
    (spec §9.4). The step's key is fold_in(base_key, step), micro-batch i uses fold_in(step key, i): a resumed
    run repeats its anchors exactly. `shardings` (the state's leaf shardings, see `state_leaf_shardings`) pins the
    new state to the input layout, so the next call reuses this compilation. Returns the new state and f32 metrics
    (means over micro-batches, plus grad_norm before clipping and the lr of this update).
    """
    key = jax.random.fold_in(base_key, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro(i, mb):
        (_, metrics), grads = grad_fn(state.params, frozen, target_state, mb, jax.random.fold_in(key, i), spec)
        return grads, metrics

    accum = batch["tokens"].shape[0]
    if accum == 1:
        grads, metrics = micro(0, jax.tree.map(lambda x: x[0], batch))
    else:

        def body(carry, xs):
            g, m = micro(*xs)
            return jax.tree.map(jnp.add, carry, (g, m)), None

        zeros = jax.eval_shape(micro, 0, jax.tree.map(lambda x: x[0], batch))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), batch))
        grads, metrics = jax.tree.map(lambda x: x / accum, (grads, metrics))
    tx = make_optimizer(spec.optimizer)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads), "lr": lr_schedule(spec.optimizer)(state.step)}
    new_state = TrainState(params, opt_state, state.step + 1)
    if shardings is not None:
        leaves, treedef = jax.tree.flatten(new_state)
        new_state = jax.tree.unflatten(
            treedef, [jax.lax.with_sharding_constraint(x, s) for x, s in zip(leaves, shardings)]
        )
    return new_state, metrics


def state_leaf_shardings(state: TrainState) -> tuple | None:
    """The shardings of a placed state's leaves (a hashable static argument of `train_step`); None off-mesh."""
    shardings = tuple(x.sharding for x in jax.tree.leaves(state))
    return shardings if all(isinstance(s, jax.sharding.NamedSharding) for s in shardings) else None


@functools.partial(jax.jit, static_argnames=("target_graphdef", "tap_layer_ids"))
def compute_features(
    target_graphdef: nnx.GraphDef, target_state: nnx.State, tokens: jax.Array, tap_layer_ids: tuple[int, ...]
) -> tuple[jax.Array, jax.Array]:
    """Target features of tokens i32[batch, seq] for the on-disk cache: (taps [batch, seq, taps * hidden],
    last_hidden [batch, seq, hidden]) in the target's compute dtype."""
    return target_features(nnx.merge(target_graphdef, target_state), tokens, tap_layer_ids)
