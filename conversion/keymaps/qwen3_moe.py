"""HF Qwen3MoeForCausalLM safetensors keys -> Qwen3Moe param tree paths, and the reader view that stacks the hub's
per-expert tensors (`...mlp.experts.<e>.<proj>.weight`) into one [experts, in, out] tensor per layer and projection.

The view checks the expert keys first and reports every missing, duplicate or unexpected one in one UsageError; the
engine then sees one stacked key per (layer, projection) and checks its shape against the model like any other.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from conversion.keymaps.qwen3 import decoder_layer_entries
from conversion.reader import TensorSpec
from dspark_jax.errors import UsageError

EXPERT_KEY = re.compile(r"(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")
_PROJS = ("gate_proj", "up_proj", "down_proj")

QWEN3_MOE_KEYMAP = (
    (r"model\.embed_tokens\.weight", "embed_tokens", "identity"),
    # Attention, norms and the dense MLP of mlp_only_layers: Qwen3's rows. A dense key in a MoE layer lands on the
    # stacked [E, ...] param and fails the engine's shape check (and collides with the stacked key).
    *decoder_layer_entries(r"model\.layers\.(\d+)\."),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", "layers.{0}.mlp.gate", "transpose"),  # router [E, H] -> [H, E]
    # Stacked by StackedExperts below, already in x @ W layout: gate/up [E, H, I], down [E, I, H].
    (r"model\.layers\.(\d+)\.mlp\.experts\.(gate_proj|up_proj|down_proj)", "layers.{0}.mlp.{1}", "identity"),
    (r"model\.norm\.weight", "norm.weight", "identity"),
    (r"lm_head\.weight", "lm_head", "transpose"),
)


class StackedExperts:
    """A reader view: every other key passes through; per-expert keys become one stacked, transposed key each.

    `reader` is a SafetensorsReader (keys / spec / read); `num_experts` the config's expert count. Stacked key
    `<prefix>.experts.<proj>` holds [num_experts, in, out] (torch's [out, in] per expert, transposed), read one
    expert at a time; with a mesh the engine reads each shard's experts only (`sliceable` / `read_slice`).
    """

    def __init__(self, reader, num_experts: int, source: str):
        self._reader = reader
        groups: dict[str, dict[int, list[str]]] = {}
        self._passthrough = []
        for key in reader.keys():
            m = EXPERT_KEY.fullmatch(key)
            if m is None:
                self._passthrough.append(key)
                continue
            stacked = f"{m['prefix']}.{m['proj']}"
            groups.setdefault(stacked, {}).setdefault(int(m["expert"]), []).append(key)
        missing, duplicate, unexpected = [], [], []
        for stacked, experts in groups.items():
            missing += [f"{stacked.rsplit('.', 1)[0]}.{e}.{stacked.rsplit('.', 1)[1]}" for e in range(num_experts)
                        if e not in experts]  # fmt: skip
            duplicate += [" = ".join(keys) for keys in experts.values() if len(keys) > 1]
            unexpected += [keys[0] for e, keys in experts.items() if e >= num_experts]
        # A layer with some projections but not others: name the absent projection of every expert once.
        layers = {s.rsplit(".", 1)[0] for s in groups}
        missing += [f"{layer}.*.{p}" for layer in sorted(layers) for p in _PROJS if f"{layer}.{p}" not in groups]
        problems = []
        for label, items in (("missing", missing), ("duplicate", duplicate), ("unexpected", unexpected)):
            if items:
                more = " ..." if len(items) > 6 else ""
                problems.append(f"{len(items)} {label} expert key(s): {', '.join(sorted(items)[:6])}{more}")
        if problems:
            raise UsageError(
                f"checkpoint {source!r} expert keys do not match num_experts={num_experts}: " + "; ".join(problems)
            )
        self._stacked = {s: [experts[e][0] for e in range(num_experts)] for s, experts in groups.items()}
        self._specs = {s: self._stacked_spec(s, keys) for s, keys in self._stacked.items()}

    def _stacked_spec(self, name: str, keys: list[str]) -> TensorSpec:
        specs = [self._reader.spec(k) for k in keys]
        shapes = {(tuple(s.shape), np.dtype(s.dtype)) for s in specs}
        if len(shapes) != 1:
            seen = ", ".join(f"{list(sh)} {dt.name}" for sh, dt in sorted(shapes, key=str))
            raise UsageError(f"experts of {name} differ in shape or dtype ({seen}); every expert must match")
        first = specs[0]
        if len(first.shape) != 2:
            raise UsageError(f"{keys[0]} has shape {list(first.shape)}, expected a 2-D [out, in] weight")
        out_dim, in_dim = first.shape
        shape = (len(keys), in_dim, out_dim)
        return dataclasses.replace(first, name=name, shape=shape, nbytes=sum(s.nbytes for s in specs))

    def keys(self) -> list[str]:
        return sorted([*self._passthrough, *self._stacked])

    def spec(self, key: str) -> TensorSpec:
        return self._specs[key] if key in self._specs else self._reader.spec(key)

    def read(self, key: str) -> np.ndarray:
        if key not in self._stacked:
            return self._reader.read(key)
        spec = self._specs[key]
        out = np.empty(spec.shape, spec.dtype)
        for e, k in enumerate(self._stacked[key]):
            out[e] = self._reader.read(k).T
        return out

    def sliceable(self, key: str) -> bool:
        """True for stacked keys: the engine then asks `read_slice` for each local shard (conversion.engine)."""
        return key in self._stacked

    def read_slice(self, key: str, index: tuple[slice, ...], dtype) -> np.ndarray:
        """stacked[index] in `dtype`, reading only the experts in index[0] (one at a time)."""
        spec = self._specs[key]
        experts = range(*index[0].indices(spec.shape[0]))
        rest = tuple(index[1:])
        return np.stack([self._reader.read(self._stacked[key][e]).T[rest].astype(dtype) for e in experts])

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of dimension 0: experts of a stacked key, source rows of any other key."""
        if key in self._stacked:
            spec = self._specs[key]
            return self.read_slice(key, (slice(start, stop), slice(None), slice(None)), spec.dtype)
        return self._reader.read_rows(key, start, stop)

    def __contains__(self, key: object) -> bool:
        return key in self._stacked or key in self._reader

    def __getattr__(self, name):  # metadata, folder, files, ... of the underlying reader
        return getattr(self._reader, name)
