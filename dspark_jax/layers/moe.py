"""Mixture-of-experts FFN: routing (pure), expert dispatch/combine over the `expert` mesh axis, and the MoE block.

Public API (also what the DeepSeek-V4 target uses):

* `route(logits, ...)` -> (weights f32[tokens, top_k], ids i32[tokens, top_k]): every router variant as one pure
  function: softmax top-k with or without renormalisation (Qwen3-MoE `norm_topk_prob`), V4 `sqrtsoftplus` scores
  with a selection-only bias, hash routing (`hash_ids` = tid2eid[token]), the route scale and the sum epsilon.
* `swiglu(gate, up, limit)`: silu(gate) * up, with V4's clamps when `limit` is given.
* `experts_ffn(x, weights, ids, gate_proj, up_proj, down_proj, ...)`: sum_i weights_i * expert_{ids_i}(x) with the
  stacked expert weights sharded over `expert` (and their ffw dim over `model`); dispatch/combine in shard_map.
* `MoE` (NNX): router weight + stacked experts (+ optional V4 bias, tid2eid table, shared expert); `SharedExpert`.

Dispatch variants (`impl`), all exact (no capacity factor, no token ever dropped) and all combining with one psum
over ('expert', 'model'): routing is computed from replicated inputs on every device, so every device knows every
token's experts and runs its local experts only on the rows routed to them.
  'blocked': sort the tokens*top_k (token, expert) rows by local expert, cut them into blocks of BLOCK_ROWS rows
            and, per block, run each expert present in it on the whole block (masked): a loop with data-dependent
            trip counts. Cost: (rows routed here / BLOCK_ROWS + distinct experts hit) matmuls of BLOCK_ROWS rows.
            Forward only (a while loop with a data-dependent trip count has no reverse-mode derivative): targets
            are never trained here; a trainable MoE would use 'ragged' or 'dense'.
  'ragged': the same sort, then jax.lax.ragged_dot per projection (rows routed elsewhere sort past every group).
            XLA:CPU lowers ragged_dot to about the cost of 'dense' (measured), so it is for GPU/TPU backends.
  'gather': gather each row's expert weights ([tokens, top_k, hidden, ffw]) and contract; reads only the routed
            experts, memory grows with tokens*top_k, so it is for decode-sized token counts.
  'dense':  every local expert on every token, weighted by a [tokens, experts] combine matrix (zero where not
            routed). Cost ~ tokens * local experts; the simplest reference.
  'auto':   'blocked' (measured fastest from 1 token to the prefill chunk on CPU; see AUTO_NOTE).
No all-to-all variant: with routing replicated and decode batches small, sending tokens to their experts' owners
saves nothing over the psum of [tokens, hidden] partial sums, and a no-drop all-to-all needs worst-case
(tokens * top_k per device pair) buffers at static shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from dspark_jax.errors import UsageError
from dspark_jax.layers.params import declare
from dspark_jax.sharding import ShardingRules, logical_to_spec

SCORE_FUNCS = ("softmax", "sqrtsoftplus")
MOE_IMPLS = ("auto", "blocked", "ragged", "gather", "dense")
# AUTO_NOTE: 'auto' is 'blocked'. Measured on a busy 2-core CPU at V4-Flash expert shapes with widths / 8 (256
# experts, top-6, hidden 512, ffw 256; benchmarks/results/2026-12-02_cpu_moe_layer.json), blocked was the fastest at
# every count from 1 token to a 1024-token prefill chunk, by 10x or more over the others from 4 tokens on: gather
# copies one [hidden, ffw] weight per row, dense runs every expert on every token, and XLA:CPU lowers ragged_dot to
# about dense cost. At widths / 16 gather won for a single token (0.8 vs 1.6 ms), a difference too small to branch
# on. Not measured on GPU/TPU, where ragged_dot is a grouped GEMM and the blocked loop's small matmuls cost launches:
# re-run benchmarks/moe_layer.py there before changing the default.
BLOCK_ROWS = 16  # rows per block of the 'blocked' variant

EXPERT_AXES = ("experts", "embed", "ffw")  # gate_proj / up_proj [experts, hidden, ffw]
EXPERT_DOWN_AXES = ("experts", "ffw", "embed")  # down_proj [experts, ffw, hidden]


class RoutingTable(nnx.Variable):
    """A fixed token -> experts table (V4 hash layers' tid2eid, i32[vocab, top_k]): loaded, never trained."""


def check_moe_fields(num_experts: int, top_k: int, score_func: str, impl: str) -> None:
    """One-line UsageErrors for MoE fields (config construction calls this)."""
    if score_func not in SCORE_FUNCS:
        raise UsageError(f"scoring_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if impl not in MOE_IMPLS:
        raise UsageError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
    for name, value in (("num_experts", num_experts), ("num_experts_per_tok", top_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UsageError(f"{name} must be a positive integer, got {value!r}")
    if top_k > num_experts:
        raise UsageError(f"num_experts_per_tok must be <= num_experts ({num_experts}), got {top_k}")


def route(
    logits: jax.Array,
    *,
    top_k: int,
    score_func: str = "softmax",
    norm_topk_prob: bool = False,
    routed_scaling_factor: float = 1.0,
    norm_eps: float = 0.0,
    bias: jax.Array | None = None,
    hash_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Pick each token's experts and their combine weights, in f32.

    scores = softmax(logits) ('softmax', Qwen3-MoE) or sqrt(softplus(logits)) ('sqrtsoftplus', V4 §2.8);
    ids = top_k(scores + bias) (the bias only selects: weights use the raw scores), or `hash_ids` when given
    (V4 hash layers: tid2eid[token], the router still gives the weights);
    weights = scores[ids], divided by (their sum + norm_eps) when `norm_topk_prob`, times routed_scaling_factor.

    Args:
      logits: [tokens, experts] router outputs (cast to f32 here).
      bias: optional f32[experts] selection bias (V4 e_score_correction_bias); hash_ids: optional i32[tokens, top_k].
    Returns:
      weights f32[tokens, top_k], ids i32[tokens, top_k] (top-k order: best first; hash order as given).
    """
    logits = logits.astype(jnp.float32)
    if score_func == "softmax":
        scores = jax.nn.softmax(logits, axis=-1)
    elif score_func == "sqrtsoftplus":
        scores = jnp.sqrt(jax.nn.softplus(logits))
    else:
        raise UsageError(f"scoring_func must be one of {SCORE_FUNCS}, got {score_func!r}")
    if hash_ids is not None:
        ids = hash_ids.astype(jnp.int32)
    else:
        select = scores if bias is None else scores + bias.astype(jnp.float32)
        _, ids = jax.lax.top_k(select, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if norm_topk_prob:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + norm_eps)
    return weights * routed_scaling_factor, ids.astype(jnp.int32)


def swiglu(gate: jax.Array, up: jax.Array, limit: float | None = None) -> jax.Array:
    """silu(gate) * up; with `limit` (V4 swiglu_limit) gate is clamped above at limit and up into [-limit, limit]."""
    if limit is not None:
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
    return jax.nn.silu(gate) * up


# ----------------------------------------------------------------------------------- per-device dispatch and combine
# Each takes the full token set and this device's slice of the experts: x [tokens, hidden]; weights f32[tokens, k];
# ids i32[tokens, k] (global expert ids); gate/up [local_experts, hidden, ffw_local]; down [local_experts,
# ffw_local, hidden]; first = the global id of local expert 0. Returns f32[tokens, hidden]: this device's partial sum.


def _local_dense(x, weights, ids, gate, up, down, first, limit):
    n = gate.shape[0]
    local = ids - first
    combine = jnp.sum(jax.nn.one_hot(local, n, dtype=jnp.float32) * weights[..., None], axis=1)  # [t, e]
    h = swiglu(jnp.einsum("td,edf->tef", x, gate), jnp.einsum("td,edf->tef", x, up), limit)
    y = jnp.einsum("tef,efd->ted", h, down, preferred_element_type=jnp.float32)
    return jnp.einsum("te,ted->td", combine, y)


def _local_gather(x, weights, ids, gate, up, down, first, limit):
    n = gate.shape[0]
    local = ids - first
    here = (local >= 0) & (local < n)
    idx = jnp.clip(local, 0, n - 1)
    g = jnp.einsum("td,tkdf->tkf", x, gate[idx])  # gate[idx]: [t, k, d, f]
    u = jnp.einsum("td,tkdf->tkf", x, up[idx])
    y = jnp.einsum("tkf,tkfd->tkd", swiglu(g, u, limit), down[idx], preferred_element_type=jnp.float32)
    return jnp.einsum("tk,tkd->td", jnp.where(here, weights, 0.0), y)


def _local_ragged(x, weights, ids, gate, up, down, first, limit):
    n = gate.shape[0]
    t, k = ids.shape
    local = ids.reshape(-1) - first  # [t*k] rows, row r = (token r // k, choice r % k)
    group = jnp.where((local >= 0) & (local < n), local, n)  # rows routed elsewhere -> group n (sorted last)
    order = jnp.argsort(group, stable=True)
    sizes = jnp.bincount(group, length=n + 1)[:n].astype(jnp.int32)  # rows per local expert
    token = order // k
    rows = x[token]  # [t*k, d], grouped by local expert
    h = swiglu(jax.lax.ragged_dot(rows, gate, sizes), jax.lax.ragged_dot(rows, up, sizes), limit)
    y = jax.lax.ragged_dot(h, down, sizes, preferred_element_type=jnp.float32)  # [t*k, d]; rows past the groups: 0
    w = jnp.where(group[order] < n, weights.reshape(-1)[order], 0.0)
    return jnp.zeros((t, x.shape[-1]), jnp.float32).at[token].add(jnp.where(w[:, None] != 0, y * w[:, None], 0.0))


def _local_blocked(x, weights, ids, gate, up, down, first, limit, block=None):
    n = gate.shape[0]
    t, k = ids.shape
    d = x.shape[-1]
    block = block or BLOCK_ROWS
    rows_total = -(-(t * k) // block) * block  # padded to whole blocks
    local = ids.reshape(-1) - first
    group = jnp.where((local >= 0) & (local < n), local, n)
    order = jnp.argsort(group, stable=True)
    pad = rows_total - t * k
    groups = jnp.pad(group[order], (0, pad), constant_values=n)  # nondecreasing; n = not here / padding
    token = order // k
    rows = jnp.pad(x[token], ((0, pad), (0, 0)))  # [rows_total, d] grouped by local expert
    w = jnp.pad(jnp.where(group[order] < n, weights.reshape(-1)[order], 0.0), (0, pad))
    num_blocks = -(-jnp.sum(groups < n) // block)  # blocks holding rows routed here (data-dependent trip count)

    def one_block(b, y):
        xb = jax.lax.dynamic_slice_in_dim(rows, b * block, block)  # [block, d]
        gb = jax.lax.dynamic_slice_in_dim(groups, b * block, block)
        # The distinct experts of this block, in order (gb is sorted): the first row of each run.
        starts = (gb < n) & jnp.concatenate([jnp.ones(1, bool), gb[1:] != gb[:-1]])
        present = jnp.sort(jnp.where(starts, gb, n))

        def one_expert(i, acc):  # each expert present in the block runs on the whole block, masked to its rows
            e = present[i]
            h = swiglu(xb @ gate[e], xb @ up[e], limit)
            out = jnp.dot(h, down[e], preferred_element_type=jnp.float32)
            return acc + jnp.where((gb == e)[:, None], out, 0.0)

        acc = jax.lax.fori_loop(0, jnp.sum(starts), one_expert, jnp.zeros((block, d), jnp.float32))
        return jax.lax.dynamic_update_slice_in_dim(y, acc, b * block, 0)

    y = jax.lax.fori_loop(0, num_blocks, one_block, jnp.zeros((rows_total, d), jnp.float32))
    return jnp.zeros((t, d), jnp.float32).at[token].add(y[: t * k] * w[: t * k, None])


_LOCAL = {"dense": _local_dense, "gather": _local_gather, "ragged": _local_ragged, "blocked": _local_blocked}


def resolve_impl(impl: str, rows: int) -> str:
    """The dispatch variant for `rows` = tokens * top_k routed rows: 'auto' -> 'blocked' at every size measured so
    far (AUTO_NOTE); `rows` is the key a per-size or per-backend table would use."""
    if impl not in MOE_IMPLS:
        raise UsageError(f"moe_impl must be one of {MOE_IMPLS}, got {impl!r}")
    return "blocked" if impl == "auto" else impl


def experts_ffn(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    gate_proj: jax.Array,
    up_proj: jax.Array,
    down_proj: jax.Array,
    *,
    dtype,
    swiglu_limit: float | None = None,
    impl: str = "auto",
    mesh: Mesh | None = None,
    rules: ShardingRules = ShardingRules(),
) -> jax.Array:
    """sum_i weights[:, i] * expert_{ids[:, i]}(x) over routed experts, exact (no token dropped).

    Args:
      x: [tokens, hidden]; weights: f32[tokens, top_k]; ids: i32[tokens, top_k] global expert ids.
      gate_proj, up_proj: [experts, hidden, ffw]; down_proj: [experts, ffw, hidden] (x @ W layout).
      dtype: compute dtype of the expert matmuls (accumulation and the weighted sum are f32).
      impl: see the module docstring. mesh: when given, experts are split over its `expert` axis and ffw over its
        `model` axis (per `rules`) inside shard_map, and partial sums are psum-ed; x, weights and ids must be the
        same on every device (they enter replicated).
    Returns:
      f32[tokens, hidden].
    """
    impl = resolve_impl(impl, ids.shape[0] * ids.shape[1])
    x = x.astype(dtype)
    gate_proj, up_proj, down_proj = (w.astype(dtype) for w in (gate_proj, up_proj, down_proj))
    local = functools.partial(_LOCAL[impl], limit=swiglu_limit)
    if mesh is None:
        return local(x, weights, ids, gate_proj, up_proj, down_proj, 0)
    w_spec = logical_to_spec(EXPERT_AXES, rules)
    down_spec = logical_to_spec(EXPERT_DOWN_AXES, rules)
    expert_axis = w_spec[0]
    reduce_axes = tuple(a for a in (w_spec[0], w_spec[2]) if a is not None)
    num_experts = gate_proj.shape[0]
    if expert_axis is not None and num_experts % mesh.shape[expert_axis]:
        raise UsageError(
            f"num_experts ({num_experts}) must be divisible by the mesh axis {expert_axis}={mesh.shape[expert_axis]}"
        )

    def body(x, weights, ids, gate, up, down):
        first = 0 if expert_axis is None else jax.lax.axis_index(expert_axis) * gate.shape[0]
        out = local(x, weights, ids, gate, up, down, first)
        return jax.lax.psum(out, reduce_axes) if reduce_axes else out

    rep = PartitionSpec()
    return jax.shard_map(
        body, mesh=mesh, in_specs=(rep, rep, rep, w_spec, w_spec, down_spec), out_specs=rep, check_vma=False
    )(x, weights, ids, gate_proj, up_proj, down_proj)


class SharedExpert(nnx.Module):
    """A gated MLP down(swiglu(x gate, x up)) with optional V4 clamps; V4's shared expert (weight 1 in the sum).

    Params: gate_proj, up_proj [hidden, ffw]; down_proj [ffw, hidden] (x @ W layout; ffw sharded over `model`).
    """

    def __init__(
        self,
        hidden: int,
        ffw: int,
        *,
        swiglu_limit: float | None = None,
        dtype: str,
        param_dtype: str,
        rngs: nnx.Rngs | None,
    ):
        self.dtype = dtype
        self.swiglu_limit = swiglu_limit
        self.gate_proj = declare(rngs, (hidden, ffw), ("embed", "ffw"), param_dtype)
        self.up_proj = declare(rngs, (hidden, ffw), ("embed", "ffw"), param_dtype)
        self.down_proj = declare(rngs, (ffw, hidden), ("ffw", "embed"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., hidden] -> [..., hidden] in the compute dtype."""
        x = x.astype(self.dtype)
        g = jnp.einsum("...d,df->...f", x, self.gate_proj[...].astype(self.dtype))
        u = jnp.einsum("...d,df->...f", x, self.up_proj[...].astype(self.dtype))
        return jnp.einsum("...f,fd->...d", swiglu(g, u, self.swiglu_limit), self.down_proj[...].astype(self.dtype))


class MoE(nnx.Module):
    """Routed experts (+ optional shared expert). Router and tables replicated; experts stacked on `expert`.

    Params:
      gate: [hidden, experts] router (x @ W layout; replicated so every device routes identically).
      gate_bias: f32[experts] selection-only bias (when `use_bias`; V4 top-k layers).
      tid2eid: RoutingTable i32[vocab, top_k] (when `hash_vocab` is set; V4 hash layers).
      gate_proj, up_proj: [experts, hidden, ffw]; down_proj: [experts, ffw, hidden] (`experts` -> mesh `expert`).
      shared_expert: SharedExpert of width `shared_ffw` (when given).
    `mesh` (static) is the mesh the params live on; None runs the experts without shard_map (one device).
    """

    def __init__(
        self,
        hidden: int,
        ffw: int,
        num_experts: int,
        top_k: int,
        *,
        score_func: str = "softmax",
        norm_topk_prob: bool = False,
        routed_scaling_factor: float = 1.0,
        norm_eps: float = 0.0,
        use_bias: bool = False,
        hash_vocab: int | None = None,
        swiglu_limit: float | None = None,
        shared_ffw: int | None = None,
        impl: str = "auto",
        mesh: Mesh | None = None,
        dtype: str,
        param_dtype: str,
        rngs: nnx.Rngs | None,
    ):
        check_moe_fields(num_experts, top_k, score_func, impl)
        self.dtype = dtype
        self.top_k = top_k
        self.score_func = score_func
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_eps = norm_eps
        self.swiglu_limit = swiglu_limit
        self.impl = impl
        self.mesh = mesh
        self.gate = declare(rngs, (hidden, num_experts), ("embed", None), param_dtype)
        if use_bias:
            self.gate_bias = declare(rngs, (num_experts,), (None,), "float32", init="zeros")
        if hash_vocab is not None:
            self.tid2eid = RoutingTable(
                jnp.zeros((hash_vocab, top_k), jnp.int32) + jnp.arange(top_k, dtype=jnp.int32),
                logical_axes=(None, None),
            )
        self.gate_proj = declare(rngs, (num_experts, hidden, ffw), EXPERT_AXES, param_dtype)
        self.up_proj = declare(rngs, (num_experts, hidden, ffw), EXPERT_AXES, param_dtype)
        self.down_proj = declare(rngs, (num_experts, ffw, hidden), EXPERT_DOWN_AXES, param_dtype)
        if shared_ffw is not None:
            self.shared_expert = SharedExpert(
                hidden, shared_ffw, swiglu_limit=swiglu_limit, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

    def router_logits(self, x: jax.Array) -> jax.Array:
        """x: [tokens, hidden] -> f32[tokens, experts]."""
        return jnp.einsum(
            "td,de->te", x.astype(self.dtype), self.gate[...].astype(self.dtype), preferred_element_type=jnp.float32
        )

    def routing(self, x: jax.Array, tokens: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x: [n, hidden] (flattened tokens); tokens: i32[n] ids (hash layers need them) -> (weights, ids)."""
        hash_ids = None
        if hasattr(self, "tid2eid"):
            if tokens is None:
                raise AssertionError("a hash-routed MoE layer needs the token ids")
            hash_ids = jnp.take(self.tid2eid[...], tokens, axis=0)
        bias = self.gate_bias[...] if hasattr(self, "gate_bias") else None
        return route(
            self.router_logits(x),
            top_k=self.top_k,
            score_func=self.score_func,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            norm_eps=self.norm_eps,
            bias=bias,
            hash_ids=hash_ids,
        )

    def __call__(self, x: jax.Array, tokens: jax.Array | None = None) -> jax.Array:
        """x: [batch, t, hidden]; tokens: i32[batch, t] (hash layers only) -> [batch, t, hidden] in the compute
        dtype."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d)
        weights, ids = self.routing(flat, None if tokens is None else tokens.reshape(-1))
        out = experts_ffn(
            flat,
            weights,
            ids,
            self.gate_proj[...],
            self.up_proj[...],
            self.down_proj[...],
            dtype=self.dtype,
            swiglu_limit=self.swiglu_limit,
            impl=self.impl,
            mesh=self.mesh,
        )
        out = out.reshape(b, t, d).astype(self.dtype)
        if hasattr(self, "shared_expert"):
            out = out + self.shared_expert(x)
        return out


__all__ = [
    "BLOCK_ROWS",
    "MOE_IMPLS",
    "SCORE_FUNCS",
    "MoE",
    "RoutingTable",
    "SharedExpert",
    "check_moe_fields",
    "experts_ffn",
    "resolve_impl",
    "route",
    "swiglu",
]
