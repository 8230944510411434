"""DeepSeek-V4 target keys -> DeepseekV4 param tree paths (V4 §3), plus the source view that stacks experts.

Spellings accepted by the one table: the native layout (`layers.N.attn.wq_a.weight`, `embed.weight`, `hc_head_fn`)
and transformers' on-disk layout of `save_pretrained` (5.24: the native sub-names under `model.`, with
`model.embed_tokens.weight`, `model.hc_head.hc_fn`, unprefixed `head.weight`, and the main attention's `kv_norm`
written as `attn.norm.weight`); transformers' in-memory names (a saved `state_dict()`) are renamed to the native
ones by the source view. Quantised tensors (FP8 / packed FP4 with `.scale` siblings) are dequantised by the
engine (conversion.quant); per-expert tensors are stacked by `DeepseekV4Source`, which also dequantises each expert
through conversion.quant, so native FP4 experts go through the same view. `mtp.*` (draft / legacy MTP) is skipped.
"""

from __future__ import annotations

import re
from collections import defaultdict

import numpy as np

from conversion import quant
from conversion.reader import TensorSpec
from dspark_jax.errors import DSparkError

_L = r"(?:model\.)?layers\.(\d+)\."


def _layer_rows(src_prefix: str = _L, dst_prefix: str = "layers.{0}.") -> tuple[tuple[str, str, str], ...]:
    rows = (
        ("attn_norm.weight", "attn_norm.weight", "identity"),
        ("ffn_norm.weight", "ffn_norm.weight", "identity"),
        ("hc_attn_fn", "hc_attn.fn", "transpose"),
        ("hc_attn_base", "hc_attn.base", "identity"),
        ("hc_attn_scale", "hc_attn.scale", "identity"),
        ("hc_ffn_fn", "hc_ffn.fn", "transpose"),
        ("hc_ffn_base", "hc_ffn.base", "identity"),
        ("hc_ffn_scale", "hc_ffn.scale", "identity"),
        ("attn.attn_sink", "attn.attn_sink", "identity"),
        ("attn.wq_a.weight", "attn.wq_a", "transpose"),
        ("attn.q_norm.weight", "attn.q_norm.weight", "identity"),
        ("attn.wq_b.weight", "attn.wq_b", "heads_in"),
        ("attn.wkv.weight", "attn.wkv", "transpose"),
        ("attn.wo_a.weight", "attn.wo_a", "transpose"),
        ("attn.wo_b.weight", "attn.wo_b", "transpose"),
        ("attn.indexer.wq_b.weight", "attn.indexer.wq_b", "heads_in"),
        ("attn.indexer.weights_proj.weight", "attn.indexer.weights_proj", "transpose"),
        ("ffn.gate.weight", "ffn.gate", "transpose"),
        ("ffn.gate.bias", "ffn.gate_bias", "identity"),
        ("ffn.gate.tid2eid", "ffn.tid2eid", "identity"),  # int ids, cast to the param's int32 by the engine
        ("ffn.experts.w1", "ffn.gate_proj", "identity"),  # stacked by the view, already [E, hidden, ffw]
        ("ffn.experts.w3", "ffn.up_proj", "identity"),
        ("ffn.experts.w2", "ffn.down_proj", "identity"),  # [E, ffw, hidden]
        ("ffn.shared_experts.w1.weight", "ffn.shared_expert.gate_proj", "transpose"),
        ("ffn.shared_experts.w3.weight", "ffn.shared_expert.up_proj", "transpose"),
        ("ffn.shared_experts.w2.weight", "ffn.shared_expert.down_proj", "transpose"),
    )
    layer = dst_prefix  # the draft stages reuse these rows under mtp.S.
    out = [(src_prefix + re.escape(src), layer + dst, fn) for src, dst, fn in rows]
    # The main attention's kv_norm: `attn.kv_norm` natively, `attn.norm` in transformers 5.24's on-disk files.
    out.append((src_prefix + r"attn\.(?:kv_)?norm\.weight", layer + "attn.kv_norm.weight", "identity"))
    for comp in ("attn.compressor", "attn.indexer.compressor"):
        out += [
            (src_prefix + re.escape(f"{comp}.wkv.weight"), layer + comp + ".wkv", "transpose"),
            (src_prefix + re.escape(f"{comp}.wgate.weight"), layer + comp + ".wgate", "transpose"),
            (src_prefix + re.escape(f"{comp}.ape"), layer + comp + ".ape", "identity"),
            (src_prefix + re.escape(f"{comp}.norm.weight"), layer + comp + ".norm.weight", "identity"),
        ]
    return tuple(out)


DEEPSEEK_V4_KEYMAP = (
    (r"(?:model\.embed_tokens|embed)\.weight", "embed", "identity"),
    (r"(?:lm_head|head)\.weight", "head", "transpose"),
    (r"(?:model\.)?norm\.weight", "norm.weight", "identity"),
    (r"(?:model\.hc_head\.hc_|hc_head_)fn", "hc_head.fn", "transpose"),
    (r"(?:model\.hc_head\.hc_|hc_head_)base", "hc_head.base", "identity"),
    (r"(?:model\.hc_head\.hc_|hc_head_)scale", "hc_head.scale", "identity"),
    *_layer_rows(),
)

# Draft stages / legacy MTP (V4 §3.1, §4.2) are not part of the target.
DEEPSEEK_V4_SKIP = (r"mtp\..*",)

# The DSpark draft of a -DSpark checkpoint (V4 §4.2): stage S = a ratio-0 V4 block under `mtp.S.` (models/
# deepseek_v4_draft.py keeps the names, tree `mtp.S.*`), plus stage 0's context projection and the last stage's
# collapse, norm and heads. `markov_head.embed` / `.head` are accepted aliases of markov_w1 / markov_w2. The target's
# keys are skipped; embed / head are bound to the target's arrays by the caller.
_M = r"(?:model\.)?mtp\."
DEEPSEEK_V4_DRAFT_KEYMAP = (
    (_M + r"0\.main_proj\.weight", "main_proj", "transpose"),
    (_M + r"0\.main_norm\.weight", "main_norm.weight", "identity"),
    (_M + r"\d+\.norm\.weight", "norm.weight", "identity"),
    (_M + r"\d+\.hc_head_fn", "hc_head.fn", "transpose"),
    (_M + r"\d+\.hc_head_base", "hc_head.base", "identity"),
    (_M + r"\d+\.hc_head_scale", "hc_head.scale", "identity"),
    (_M + r"\d+\.markov_head\.(?:markov_w1|embed)\.weight", "markov_head.markov_w1", "identity"),  # E1 [V, r]
    (_M + r"\d+\.markov_head\.(?:markov_w2|head)\.weight", "markov_head.markov_w2", "transpose"),  # [V, r] -> [r, V]
    (_M + r"\d+\.confidence_head\.proj\.weight", "confidence_head.weight", "transpose"),  # [1, H + r], no bias
    *_layer_rows(_M + r"(\d+)\.", "mtp.{0}."),
)
DEEPSEEK_V4_DRAFT_SKIP = (r"(?!(?:model\.)?mtp\.).*",)

_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(w[123])\.weight")

# transformers' in-memory names (a `state_dict()` saved as is, V4 §3.3) back to the native ones, applied in order.
_IN_MEMORY = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"\.input_layernorm\.", ".attn_norm."),
        (r"\.post_attention_layernorm\.", ".ffn_norm."),
        (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
        (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
        (r"\.self_attn\.sinks$", ".attn.attn_sink"),
        (r"\.self_attn\.compressor\.indexer\.scorer\.weights_proj\.", ".attn.indexer.weights_proj."),
        (r"\.self_attn\.compressor\.indexer\.q_b_proj\.", ".attn.indexer.wq_b."),
        (r"\.self_attn\.compressor\.indexer\.", ".attn.indexer.compressor."),
        (r"\.self_attn\.", ".attn."),
        (r"\.compressor\.kv_proj\.", ".compressor.wkv."),
        (r"\.compressor\.gate_proj\.", ".compressor.wgate."),
        (r"\.compressor\.position_bias$", ".compressor.ape"),
        (r"\.compressor\.kv_norm\.", ".compressor.norm."),
        (r"\.attn\.q_a_proj\.", ".attn.wq_a."),
        (r"\.attn\.q_a_norm\.", ".attn.q_norm."),
        (r"\.attn\.q_b_proj\.", ".attn.wq_b."),
        (r"\.attn\.kv_proj\.", ".attn.wkv."),
        (r"\.attn\.o_a_proj\.", ".attn.wo_a."),
        (r"\.attn\.o_b_proj\.", ".attn.wo_b."),
        (r"\.mlp\.gate\.e_score_correction_bias$", ".ffn.gate.bias"),
        (r"\.mlp\.shared_experts\.gate_proj\.", ".ffn.shared_experts.w1."),
        (r"\.mlp\.shared_experts\.up_proj\.", ".ffn.shared_experts.w3."),
        (r"\.mlp\.shared_experts\.down_proj\.", ".ffn.shared_experts.w2."),
        (r"\.mlp\.", ".ffn."),
    )
)
_FUSED = re.compile(r"(.*\.ffn\.experts)\.(gate_up_proj|down_proj)")


def native_name(key: str) -> str:
    """A transformers in-memory key in the native spelling (other spellings come back unchanged)."""
    for pattern, replacement in _IN_MEMORY:
        key = pattern.sub(replacement, key)
    return key


class DeepseekV4Source:
    """A reader view over a V4 checkpoint: per-expert tensors `…experts.e.wK.weight` (e = 0..E-1, with their
    scales) appear as one stacked key `…experts.wK` in x @ W layout (w1/w3: [E, hidden, ffw], w2: [E, ffw,
    hidden]), each expert dequantised by conversion.quant when stored FP8/FP4; `tid2eid` keeps its integer dtype
    (the engine casts it to the param's int32, checking the values fit). transformers' in-memory names are renamed
    to the native ones and its fused experts (`gate_up_proj`, `down_proj`) split into the same stacked keys.
    Everything else passes through. `read` of a stacked key reads its experts one at a time; with a mesh the
    engine asks `read_slice` for each local shard instead, which reads and dequantises only that shard's experts
    (and rows), straight into the param dtype; `read_rows` serves the engine's row-sliced reads of other keys.
    """

    def __init__(self, reader):
        self._reader = reader
        keys = set(reader.keys())
        groups: dict[str, dict[int, str]] = defaultdict(dict)
        hidden = set()
        for key in keys:
            m = _EXPERT.fullmatch(key)
            if m:
                groups[f"{m.group(1)}.{m.group(3)}"][int(m.group(2))] = key
                hidden.add(key)
                scale = quant.scale_key_of(key, keys)
                if scale is not None:
                    hidden.add(scale)
        self._stacked: dict[str, list[tuple[str, str | None]]] = {}
        self._specs: dict[str, TensorSpec] = {}
        problems = []
        for name, members in sorted(groups.items()):
            n = max(members) + 1
            missing = [e for e in range(n) if e not in members]
            if missing:
                problems.append(f"{name} lacks experts {missing[:8]}")
                continue
            ordered = [(members[e], quant.scale_key_of(members[e], keys)) for e in range(n)]
            shapes = {quant.logical_shape(reader.spec(k).shape, reader.spec(k).dtype) for k, _ in ordered}
            if len(shapes) != 1:
                problems.append(f"{name} experts have different shapes {sorted(shapes)}")
                continue
            out_dim, in_dim = shapes.pop()
            shape = (n, in_dim, out_dim)
            self._stacked[name] = ordered
            self._specs[name] = TensorSpec(name, shape, np.dtype(np.float32), "", 0, 4 * int(np.prod(shape)))
        if problems:
            raise DSparkError("checkpoint experts do not stack: " + "; ".join(problems))
        self._source: dict[str, str] = {}  # view key -> source key (renamed or fused)
        self._fused: dict[str, str] = {}  # view key -> 'w1' | 'w3' | 'w2' part of a fused expert tensor
        for key in sorted(keys - hidden):
            spec, name = reader.spec(key), native_name(key)
            fused = _FUSED.fullmatch(name)
            if fused:  # in-memory experts: gate_up_proj [E, 2I, H] (w1 rows then w3 rows), down_proj [E, H, I]
                e, rows, cols = quant.logical_shape(spec.shape, spec.dtype)
                parts = ("w1", "w3") if fused.group(2) == "gate_up_proj" else ("w2",)
                for part in parts:
                    shape = (e, cols, rows // len(parts))
                    view = f"{fused.group(1)}.{part}"
                    self._source[view], self._fused[view] = key, part
                    self._specs[view] = TensorSpec(view, shape, np.dtype(np.float32), "", 0, 4 * int(np.prod(shape)))
                continue
            if name in self._specs:
                problems.append(f"{key} and another key both read as {name}")
            self._source[name] = key
            self._specs[name] = TensorSpec(name, spec.shape, spec.dtype, spec.file, spec.offset, spec.nbytes)
        if problems:
            raise DSparkError("checkpoint keys clash: " + "; ".join(problems))

    def keys(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def spec(self, key: str) -> TensorSpec:
        if key not in self._specs:
            return self._reader.spec(key)  # the reader's one-line error
        return self._specs[key]

    def read(self, key: str) -> np.ndarray:
        if key in self._stacked:
            out = np.empty(self._specs[key].shape, np.float32)
            for e, (member, scale) in enumerate(self._stacked[key]):
                out[e] = quant.read_dequantized(self._reader, member, scale, np.float32).astype(np.float32).T
            return out
        source = self._source.get(key, key)
        if key in self._fused:
            full = quant.read_dequantized(self._reader, source, None, np.float32).astype(np.float32)
            part = self._fused[key]
            if part != "w2":
                half = full.shape[1] // 2
                full = full[:, :half] if part == "w1" else full[:, half:]
            return np.ascontiguousarray(full.transpose(0, 2, 1))
        array = self._reader.read(source)
        if key.endswith("tid2eid") and array.size and array.min() < 0:
            raise DSparkError(f"{source}: expert ids must be >= 0, got {array.min()}..{array.max()}")
        return array

    def sliceable(self, key: str) -> bool:
        """True for stacked and fused expert keys: the engine then asks `read_slice` for each local shard."""
        return key in self._stacked or key in self._fused

    def read_slice(self, key: str, index: tuple[slice, ...], dtype) -> np.ndarray:
        """`read(key)[index]` cast to `dtype` (bit-identical), for a stacked or fused expert key [E, in, out],
        reading only the experts in index[0]; of a stacked key's experts (stored [out, in], dequantised one at a
        time) only the stored rows in index[2] (FP8: their 128-row tiles)."""
        shape = self._specs[key].shape
        (e0, e1), (i0, i1), (o0, o1) = (
            (index[d] if d < len(index) else slice(None)).indices(shape[d])[:2] for d in range(3)
        )
        if key in self._fused:  # one in-memory tensor [E, rows, cols]: its experts e0..e1 as `read` gives them
            full = quant.read_dequantized_rows(self._reader, self._source[key], None, e0, e1, np.float32)
            full = full.astype(np.float32, copy=False)
            part = self._fused[key]
            if part != "w2":
                half = full.shape[1] // 2
                full = full[:, :half] if part == "w1" else full[:, half:]
            return np.ascontiguousarray(full.transpose(0, 2, 1)[:, i0:i1, o0:o1]).astype(dtype, copy=False)
        out = np.empty((e1 - e0, i1 - i0, o1 - o0), dtype)
        for e in range(e0, e1):
            member, scale = self._stacked[key][e]
            rows = quant.read_dequantized_rows(self._reader, member, scale, o0, o1, dtype)  # [o1 - o0, in]
            if not quant.is_quantized(self._reader.spec(member).dtype):
                rows = rows.astype(np.float32, copy=False)  # as `read`: a float expert goes through f32
            out[e - e0] = rows[:, i0:i1].T  # f32 -> dtype: the one rounding `read` + the engine's cast make
        return out

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of dimension 0 as `read` gives them (experts of a stacked / fused key), reading only
        those rows where the source allows."""
        if self.sliceable(key):
            return self.read_slice(key, (slice(start, stop),), np.float32)
        source = self._source.get(key, key)
        if key.endswith("tid2eid") or not hasattr(self._reader, "read_rows"):
            return self.read(key)[start:stop]
        return self._reader.read_rows(source, start, stop)

    def close(self) -> None:
        self._reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = [
    "DEEPSEEK_V4_DRAFT_KEYMAP",
    "DEEPSEEK_V4_DRAFT_SKIP",
    "DEEPSEEK_V4_KEYMAP",
    "DEEPSEEK_V4_SKIP",
    "DeepseekV4Source",
]
