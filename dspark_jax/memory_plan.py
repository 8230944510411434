"""Bytes per device of a model's parameters and decoding caches on a mesh, checked before anything is loaded.

Qwen3 targets are planned from their abstract param tree (exact shapes and logical axes); DeepSeek-V4 from the
shapes of V4 §3.1 / §4.2 computed from its config.json alone, so the plan needs no model class. A param's bytes on
one device are its full bytes divided by the sizes of the mesh axes its logical axes map to (dspark_jax.sharding),
where that size divides the dimension (otherwise loading refuses the mesh anyway).
"""

from __future__ import annotations

import dataclasses
import math
import os

from dspark_jax.errors import UsageError
from dspark_jax.sharding import MESH_AXES, ShardingRules

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4}
HEADROOM = 0.9  # share of a device's memory the plan may fill: XLA needs scratch space for activations and compiles
GiB = 1024**3
CLI_CONTEXT = 8192  # positions the CLIs' pre-load check plans caches for (see check_memory)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes on the fullest device of `mesh` ({axis: size}); `device_bytes` None when unknown."""

    model: str
    mesh: dict
    dtype: str
    context: int
    batch: int
    param_bytes: int
    cache_bytes: int
    device_bytes: int | None

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.cache_bytes

    @property
    def fits(self) -> bool:
        return self.device_bytes is None or self.total_bytes <= HEADROOM * self.device_bytes

    def describe(self) -> str:
        """One line: what goes on each device."""
        mesh = ",".join(f"{a}={self.mesh.get(a, 1)}" for a in MESH_AXES)
        have = "unknown" if self.device_bytes is None else f"{self.device_bytes / GiB:.1f} GiB"
        return (
            f"memory plan {self.model} ({self.dtype}, context {self.context}, batch {self.batch}, mesh {mesh}): "
            f"params {self.param_bytes / GiB:.2f} GiB + cache {self.cache_bytes / GiB:.2f} GiB = "
            f"{self.total_bytes / GiB:.2f} GiB per device, device memory {have}"
        )

    def check(self) -> None:
        """UsageError (one line) when the plan does not fit in HEADROOM of a device."""
        if not self.fits:
            devices = math.prod(self.mesh.get(a, 1) for a in MESH_AXES)
            raise UsageError(
                f"{self.model} does not fit on mesh {self.mesh} ({devices} device(s)): needs "
                f"{self.total_bytes / GiB:.1f} GiB per device (params {self.param_bytes / GiB:.1f} + cache "
                f"{self.cache_bytes / GiB:.1f}), {HEADROOM:.0%} of {self.device_bytes / GiB:.1f} GiB is available; "
                "use more devices, bfloat16 or a shorter context"
            )


def per_device(shape: tuple[int, ...], axes, mesh: dict, itemsize: int, rules: ShardingRules = ShardingRules()) -> int:
    """Bytes of one device's shard of an array of `shape` with logical `axes` on a mesh of sizes `mesh`."""
    n = math.prod(shape) * itemsize
    for size, logical in zip(shape, axes or (None,) * len(shape)):
        axis = rules.mesh_axis(logical)
        k = mesh.get(axis, 1) if axis is not None else 1
        if k > 1 and size % k == 0:
            n //= k
    return n


# ------------------------------------------------------------------------------------------------------------ Qwen3


def qwen3_param_bytes(abstract_state, mesh: dict) -> int:
    """Per-device param bytes of an abstract nnx.State (from nnx.eval_shape), from each Variable's logical axes."""
    total = 0
    for _, var in abstract_state.flat_state():
        value = var.get_value()
        total += per_device(value.shape, var.get_metadata().get("logical_axes"), mesh, value.dtype.itemsize)
    return total


def kv_cache_bytes(
    layers: int, kv_heads: int, head_dim: int, context: int, batch: int, mesh: dict, itemsize: int
) -> int:
    """K and V of `layers` layers: [batch, context, kv_heads, head_dim] each, batch on data, kv_heads on model."""
    one = per_device((batch, context, kv_heads, head_dim), ("batch", None, "kv_heads", "head_dim"), mesh, itemsize)
    return 2 * layers * one


def qwen3_plan(config, abstract_state, mesh: dict, *, context: int | None = None, batch: int = 1, draft=None):
    """MemoryPlan of a Qwen3 target (and its draft's context cache when `draft` (DraftConfig) is given)."""
    context = context or config.max_position_embeddings
    itemsize = BYTES[str(config.param_dtype)]
    params = qwen3_param_bytes(abstract_state, mesh)
    cache = kv_cache_bytes(
        config.num_hidden_layers, config.num_key_value_heads, config.head_dim, context, batch, mesh, itemsize
    )
    if draft is not None:
        m = draft.model
        cache += kv_cache_bytes(m.num_hidden_layers, m.num_key_value_heads, m.head_dim, context, batch, mesh, itemsize)
    return MemoryPlan("qwen3", mesh, str(config.param_dtype), context, batch, params, cache, device_memory())


# ------------------------------------------------------------------------------------------------------ DeepSeek-V4


def _v4_fields(config: dict) -> dict:
    """The V4 §1.2 sizes from a config.json in either dialect (native names or the official inference names)."""

    def get(*names, default=None):
        for n in names:
            if n in config:
                return config[n]
        if default is not None:
            return default
        raise UsageError(f"DeepSeek-V4 config.json lacks {names[0]!r}; accepted: the native or inference dialect")

    layers = get("num_hidden_layers", "n_layers")
    ratios = config.get("compress_ratios")
    if ratios is None and "layer_types" in config:
        by_type = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
        ratios = [by_type[t] for t in config["layer_types"]]
    if ratios is None:
        raise UsageError("DeepSeek-V4 config.json lacks 'compress_ratios' (or 'layer_types'); the plan needs it")
    return dict(
        H=get("hidden_size", "dim"),
        L=layers,
        n_h=get("num_attention_heads", "n_heads"),
        d=get("head_dim", default=512),
        q_lora=get("q_lora_rank"),
        G=get("o_groups"),
        d_g=get("o_lora_rank"),
        E=get("n_routed_experts"),
        I=get("moe_intermediate_size", "moe_inter_dim"),
        k=get("num_experts_per_tok", "n_activated_experts"),
        n_I=get("index_n_heads"),
        d_I=get("index_head_dim"),
        V=get("vocab_size"),
        hash_layers=get("num_hash_layers", "n_hash_layers", default=0),
        hc=get("hc_mult", default=4),
        W=get("sliding_window", "window_size", default=128),
        ratios=list(ratios)[:layers],
        stages=len(config.get("dspark_target_layer_ids") or ()),
        rank=config.get("dspark_markov_rank") or 0,
        context=get("max_position_embeddings", default=1048576),
    )


def v4_tensors(config: dict) -> list[tuple[tuple[int, ...], tuple, int]]:
    """(shape, logical axes, itemsize or 0 = the param dtype) of every V4 param after conversion (experts stacked).

    Axes follow the port's conventions: heads and ffw on model, experts on expert, vocab on model; mHC, norms and
    routers replicated (V4 §2.8).
    """
    f = _v4_fields(config)
    H, n_h, d, q, G, d_g, E, ffw, n_I, d_I, V = (
        f[x] for x in ("H", "n_h", "d", "q_lora", "G", "d_g", "E", "I", "n_I", "d_I", "V")
    )
    hc = f["hc"]
    mix = 2 * hc + hc * hc  # pre, post and the hc×hc mixing logits: 24 for hc 4 (V4 §2.3)

    def block(ratio: int, hashed: bool) -> list:
        out = [
            ((H,), (None,), 0),
            ((H,), (None,), 0),
            *[((hc * H, mix), ("embed", None), 4), ((mix,), (None,), 4), ((3,), (None,), 4)] * 2,
            ((n_h,), (None,), 4),  # attn_sink
            ((H, q), ("embed", None), 0),
            ((q,), (None,), 0),
            ((q, n_h, d), (None, "q_heads", "head_dim"), 0),
            ((H, d), ("embed", None), 0),
            ((d,), (None,), 0),
            ((G, d_g, n_h * d // G), ("q_heads", None, None), 0),
            ((G * d_g, H), ("q_heads", None), 0),  # wo_b: its input splits with the head groups
            ((H, E), ("embed", None), 0),
            ((E, H, ffw), ("experts", "embed", "ffw"), 0),
            ((E, H, ffw), ("experts", "embed", "ffw"), 0),
            ((E, ffw, H), ("experts", "ffw", "embed"), 0),
            ((H, ffw), ("embed", "ffw"), 0),
            ((H, ffw), ("embed", "ffw"), 0),
            ((ffw, H), ("ffw", "embed"), 0),
        ]
        out.append(((V, f["k"]), (None, None), 4) if hashed else ((E,), (None,), 4))
        if ratio:
            c = 2 if ratio == 4 else 1
            out += [((H, c * d), ("embed", None), 0)] * 2 + [((ratio, c * d), (None, None), 4), ((d,), (None,), 0)]
        if ratio == 4:  # Lightning indexer
            out += [((q, n_I, d_I), (None, None, None), 0), ((H, n_I), ("embed", None), 0)]
            out += [((H, 2 * d_I), ("embed", None), 0)] * 2 + [((4, 2 * d_I), (None, None), 4), ((d_I,), (None,), 0)]
        return out

    tensors = [((V, H), ("vocab", "embed"), 0), ((H, V), ("embed", "vocab"), 0), ((H,), (None,), 0)]
    tensors += [((hc * H, hc), ("embed", None), 4), ((hc,), (None,), 4), ((1,), (None,), 4)]
    for layer, ratio in enumerate(f["ratios"]):
        tensors += block(ratio, layer < f["hash_layers"])
    for _ in range(f["stages"]):  # DSpark stages: ratio-0 blocks with a learned router (V4 §4.2)
        tensors += block(0, False)
    if f["stages"]:
        r = f["rank"]
        tensors += [((f["stages"] * H, H), (None, "embed"), 0), ((H,), (None,), 0), ((H,), (None,), 0)]
        tensors += [((hc * H, hc), ("embed", None), 4), ((hc,), (None,), 4), ((1,), (None,), 4)]
        tensors += [((V, r), ("vocab", "rank"), 0), ((r, V), ("rank", "vocab"), 0), ((H + r, 1), (None, None), 0)]
    return tensors


def v4_cache_bytes(config: dict, context: int, batch: int, mesh: dict, itemsize: int) -> int:
    """Decoding state (V4 §2.9): per layer a W-entry window of 512-d keys, the compressed entries emitted over
    `context` tokens (1 per m tokens; CSA also 128-d indexer keys) and the open compressor windows; DSpark stages
    keep a W-row ring each. One KV head: only the batch splits (over data)."""
    f = _v4_fields(config)
    d, d_I, W = f["d"], f["d_I"], f["W"]
    per_row = 0
    for m in f["ratios"]:
        per_row += W * d
        if m:
            c = 2 if m == 4 else 1
            per_row += (context // m) * d + 2 * m * c * d * 2  # entries + open windows (a, z; CSA keeps two)
        if m == 4:
            per_row += (context // 4) * d_I + 2 * 4 * 2 * d_I * 2
    per_row += f["stages"] * W * d
    data = mesh.get("data", 1)
    rows = batch // data if batch % data == 0 else batch
    return per_row * rows * itemsize


def v4_plan(
    config: dict,
    mesh: dict,
    dtype: str = "bfloat16",
    *,
    context: int | None = None,
    batch: int = 1,
    device_bytes: int | None = -1,
    name: str = "deepseek_v4",
) -> MemoryPlan:
    """MemoryPlan of a DeepSeek-V4 checkpoint (target, plus the DSpark stages when the config has them)."""
    itemsize = BYTES[dtype]
    context = context or _v4_fields(config)["context"]
    params = sum(per_device(s, axes, mesh, size or itemsize) for s, axes, size in v4_tensors(config))
    cache = v4_cache_bytes(config, context, batch, mesh, itemsize)
    device = device_memory() if device_bytes == -1 else device_bytes
    return MemoryPlan(name, mesh, dtype, context, batch, params, cache, device)


def v4_param_count(config: dict) -> int:
    """Parameters of a V4 checkpoint after dequantisation (the §1.1 "total"), target plus any DSpark stages."""
    return sum(math.prod(s) for s, _, _ in v4_tensors(config))


# ------------------------------------------------------------------------------------------------------------ device


def device_memory() -> int | None:
    """Memory of one local device in bytes: the accelerator's limit, or on CPU the host's RAM shared by its
    devices; None when unknown."""
    import jax

    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
        return ram // max(1, jax.local_device_count())
    return None


def min_devices(config: dict, device_bytes: int, dtype: str, context: int, *, batch: int = 1, limit: int = 4096):
    """Smallest power-of-two device count whose V4 plan fits, with the best expert × model split of that count
    (data 1), and that plan; (None, None) when `limit` devices do not suffice."""
    f = _v4_fields(config)
    n = 1
    while n <= limit:
        best = None
        expert = 1
        while expert <= min(n, f["E"]):
            model = n // expert
            if model <= f["n_h"]:
                mesh = {"data": 1, "model": model, "expert": expert}
                plan = v4_plan(config, mesh, dtype, context=context, batch=batch, device_bytes=device_bytes)
                if best is None or plan.total_bytes < best.total_bytes:
                    best = plan
            expert *= 2
        if best is not None and best.fits:
            return n, best
        n *= 2
    return None, None


def plan_checkpoint(
    path: str, mesh, dtype: str, *, context: int | None = None, batch: int = 1, max_context: int | None = None
) -> MemoryPlan | None:
    """MemoryPlan of the target checkpoint at `path` (folder or hub id) for `mesh` (a jax Mesh or None: one device),
    read from its config.json only (no weights); None for architectures other than Qwen3 and DeepSeek-V4.

    The cache is planned for `context` positions (default: the model's), at most `max_context`.
    """
    from dspark_jax.configs import Qwen3Config, read_config_json
    from dspark_jax.hub import resolve

    folder = resolve(path)
    raw = read_config_json(folder)
    sizes = {a: 1 for a in MESH_AXES} if mesh is None else {a: int(mesh.shape.get(a, 1)) for a in MESH_AXES}
    context = context or raw.get("max_position_embeddings")
    if max_context and context:
        context = min(context, max_context)
    if raw.get("model_type") in ("deepseek_v4", "deepseek_v4_text") or "compress_ratios" in raw:
        return v4_plan(raw, sizes, dtype, context=context, batch=batch, name=os.path.basename(folder) or "deepseek_v4")
    if raw.get("model_type") != "qwen3":
        return None
    from flax import nnx

    from dspark_jax.models import Qwen3

    config = Qwen3Config.from_hf_dict(raw, os.path.join(folder, "config.json")).with_dtype(dtype)
    abstract = nnx.state(nnx.eval_shape(lambda: Qwen3(config, rngs=None)))
    plan = qwen3_plan(config, abstract, sizes, context=context, batch=batch)
    return dataclasses.replace(plan, model=os.path.basename(os.path.normpath(folder)) or "qwen3")


def check_memory(
    path: str, mesh, dtype: str, *, context: int | None = None, batch: int = 1, max_context: int = CLI_CONTEXT
) -> MemoryPlan | None:
    """The CLIs' check before loading a target: with a mesh, the plan is printed (stderr, process 0 only); on any
    mesh a plan that cannot fit is a one-line UsageError. Architectures without a plan here pass unchecked.

    The caches of a run are sized by its prompts and --max-new-tokens, not the model's context, so the check plans
    at most `max_context` positions: it refuses what cannot work, not what a full-context run would need.
    """
    import sys

    import jax

    plan = plan_checkpoint(path, mesh, dtype, context=context, batch=batch, max_context=max_context)
    if plan is None:  # an architecture the planner does not know (Gemma4, MoE targets): loading checks the rest
        return None
    if mesh is not None and jax.process_index() == 0:
        print(plan.describe(), file=sys.stderr)
    plan.check()
    return plan


__all__ = [
    "MemoryPlan",
    "check_memory",
    "plan_checkpoint",
    "device_memory",
    "kv_cache_bytes",
    "min_devices",
    "per_device",
    "qwen3_param_bytes",
    "qwen3_plan",
    "v4_cache_bytes",
    "v4_param_count",
    "v4_plan",
    "v4_tensors",
]
