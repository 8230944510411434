"""Regenerate the committed *.json.gz key manifests from the public Qwen3 configs and the DeepSeek-V4 facts of
deepseek-v4.md §1-4 (native layout, quantised dtypes and scale shapes): `python make_manifests.py`.

Each manifest is {"config": HF config dict, "tensors": {key: {"shape": [...], "dtype": "BF16"}}}.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))

# Geometry from the published Qwen3 config.json files.
QWEN3 = {
    "4b": dict(
        hidden_size=2560,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=9728,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=12288,
        tie_word_embeddings=False,
    ),
    "14b": dict(
        hidden_size=5120,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=8,
        intermediate_size=17408,
        tie_word_embeddings=False,
    ),
}
# The 5 target layers whose hidden states feed the draft: spread evenly, starting at layer 1.
TARGET_LAYER_IDS = {"4b": [1, 9, 17, 25, 33], "8b": [1, 9, 17, 25, 33], "14b": [1, 10, 19, 28, 37]}
DRAFT_LAYERS = 5
MARKOV_RANK = 256
BLOCK_SIZE = 7


def qwen3_config(size: str) -> dict[str, Any]:
    """HF Qwen3ForCausalLM config for one size, in transformers 5 spelling (rope_parameters, dtype)."""
    return {
        **QWEN3[size],
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "head_dim": 128,
        "vocab_size": 151936,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960,
        "hidden_act": "silu",
        "attention_bias": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "dtype": "bfloat16",
    }


def _layer(prefix: str, c: dict[str, Any]) -> dict[str, list[int]]:
    """One Qwen3 decoder layer: 11 tensors. q/o use nq*hd, k/v the grouped nkv*hd width."""
    h, i, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    return {
        f"{prefix}input_layernorm.weight": [h],
        f"{prefix}post_attention_layernorm.weight": [h],
        f"{prefix}self_attn.q_proj.weight": [q, h],
        f"{prefix}self_attn.k_proj.weight": [kv, h],
        f"{prefix}self_attn.v_proj.weight": [kv, h],
        f"{prefix}self_attn.o_proj.weight": [h, q],
        f"{prefix}self_attn.q_norm.weight": [hd],
        f"{prefix}self_attn.k_norm.weight": [hd],
        f"{prefix}mlp.gate_proj.weight": [i, h],
        f"{prefix}mlp.up_proj.weight": [i, h],
        f"{prefix}mlp.down_proj.weight": [h, i],
    }


def qwen3_shapes(c: dict[str, Any]) -> dict[str, list[int]]:
    """Target checkpoint keys; lm_head.weight only when untied (tied checkpoints omit it)."""
    v, h = c["vocab_size"], c["hidden_size"]
    shapes = {"model.embed_tokens.weight": [v, h]}
    for n in range(c["num_hidden_layers"]):
        shapes.update(_layer(f"model.layers.{n}.", c))
    shapes["model.norm.weight"] = [h]
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = [v, h]
    return shapes


def draft_config(size: str, markov: bool) -> dict[str, Any]:
    """DSpark (markov=True) or DFlash (markov=False) draft config built on the target's geometry."""
    target = qwen3_config(size)
    c = {
        **target,
        "architectures": ["Qwen3DSparkModel"],
        "num_hidden_layers": DRAFT_LAYERS,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"] * DRAFT_LAYERS,
        "block_size": BLOCK_SIZE,
        "num_target_layers": target["num_hidden_layers"],
        "target_layer_ids": TARGET_LAYER_IDS[size],
        "mask_token_id": 151669,
        "num_anchors": 512,
        "markov_rank": MARKOV_RANK if markov else 0,
        "enable_confidence_head": markov,
    }
    if markov:
        c.update(markov_head_type="vanilla", confidence_head_with_markov=True)
    return c


def draft_shapes(c: dict[str, Any]) -> dict[str, list[int]]:
    """Draft keys (no prefix). fc maps the m concatenated target hidden states [m*H] back to H."""
    v, h, r = c["vocab_size"], c["hidden_size"], c["markov_rank"]
    shapes = {"embed_tokens.weight": [v, h]}
    for n in range(c["num_hidden_layers"]):
        shapes.update(_layer(f"layers.{n}.", c))
    shapes.update(
        {
            "norm.weight": [h],
            "fc.weight": [h, len(c["target_layer_ids"]) * h],
            "hidden_norm.weight": [h],
            "lm_head.weight": [v, h],
        }
    )
    if r:
        shapes.update({"markov_head.markov_w1.weight": [v, r], "markov_head.markov_w2.weight": [v, r]})
    if c["enable_confidence_head"]:
        # The confidence head reads the hidden state concatenated with the rank-r Markov features.
        width = h + (r if c.get("confidence_head_with_markov") else 0)
        shapes.update({"confidence_head.proj.weight": [1, width], "confidence_head.proj.bias": [1]})
    return shapes


# ------------------------------------------------------------------------------------------- DeepSeek-V4 (V4 §1-4)

# config.json fields in the native dialect (V4 §1.2); the -DSpark variants add the §4.1 fields.
V4_COMMON = {
    "architectures": ["DeepseekV4ForCausalLM"],
    "model_type": "deepseek_v4",
    "num_key_value_heads": 1,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "sliding_window": 128,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 16,
        "original_max_position_embeddings": 65536,
        "beta_fast": 32,
        "beta_slow": 1,
    },
    "index_n_heads": 64,
    "index_head_dim": 128,
    "n_shared_experts": 1,
    "num_experts_per_tok": 6,
    "scoring_func": "sqrtsoftplus",
    "topk_method": "noaux_tc",
    "norm_topk_prob": True,
    "num_hash_layers": 3,
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "expert_dtype": "fp4",
    "quantization_config": {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "scale_fmt": "ue8m0",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    },
    "max_position_embeddings": 1048576,
    "vocab_size": 129280,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
V4 = {
    "flash": dict(
        hidden_size=4096,
        num_hidden_layers=43,
        num_attention_heads=64,
        q_lora_rank=1024,
        o_groups=8,
        o_lora_rank=1024,
        compress_ratios=[0, 0] + [4, 128] * 20 + [4] + [0],
        index_topk=512,
        n_routed_experts=256,
        moe_intermediate_size=2048,
        routed_scaling_factor=1.5,
    ),
    "pro": dict(
        hidden_size=7168,
        num_hidden_layers=61,
        num_attention_heads=128,
        q_lora_rank=1536,
        o_groups=16,
        o_lora_rank=1024,
        compress_ratios=[128, 128] + [4, 128] * 29 + [4] + [0],
        index_topk=1024,
        n_routed_experts=384,
        moe_intermediate_size=3072,
        routed_scaling_factor=2.5,
    ),
}
# DSpark fields (V4 §4.1); Pro-DSpark's are derived from its config only (V4 §5 Q8).
V4_DSPARK = {
    "flash": dict(dspark_target_layer_ids=[40, 41, 42], dspark_markov_rank=256),
    "pro": dict(dspark_target_layer_ids=[58, 59, 60], dspark_markov_rank=512),
}
V4_BLOCK = 128  # FP8 scale tile
V4_FP4_BLOCK = 32  # FP4 scale run along the input dimension


def v4_config(size: str, dspark: bool) -> dict[str, Any]:
    c = {**V4_COMMON, **V4[size]}
    if dspark:
        c.update(V4_DSPARK[size], dspark_block_size=5, dspark_noise_token_id=128799)
        # The three draft stages are SWA-only: three more zeros (46 entries for Flash, 64 for Pro).
        c["compress_ratios"] = c["compress_ratios"] + [0, 0]
    return c


def _fp8(key: str, shape: list[int]) -> dict[str, tuple[list[int], str]]:
    """An FP8 matrix and its e8m0 block scale [ceil(out/128), ceil(in/128)] (V4 §3.2)."""
    scale = [-(-shape[0] // V4_BLOCK), -(-shape[1] // V4_BLOCK)]
    return {f"{key}.weight": (shape, "F8_E4M3"), f"{key}.scale": (scale, "F8_E8M0")}


def _fp4(key: str, shape: list[int]) -> dict[str, tuple[list[int], str]]:
    """A packed FP4 matrix [out, in/2] (I8) and its per-32-column e8m0 scale [out, in/32] (V4 §3.2)."""
    out, inp = shape
    return {f"{key}.weight": ([out, inp // 2], "I8"), f"{key}.scale": ([out, inp // V4_FP4_BLOCK], "F8_E8M0")}


def _hc(prefix: str, rows: int, h: int, hc: int = 4) -> dict[str, tuple[list[int], str]]:
    """mHC parameters `<prefix>_fn/_base/_scale` (F32): 24 rows for a sub-layer, 4 for a head (V4 §2.3)."""
    scale = 3 if rows != hc else 1
    return {
        f"{prefix}_fn": ([rows, hc * h], "F32"),
        f"{prefix}_base": ([rows], "F32"),
        f"{prefix}_scale": ([scale], "F32"),
    }


def v4_block(p: str, c: dict[str, Any], ratio: int, hashed: bool) -> dict[str, tuple[list[int], str]]:
    """One V4 block under prefix `p` (V4 §3.1): attention (+ compressor, + indexer), MoE with FP4 experts."""
    h, nh, d, q = c["hidden_size"], c["num_attention_heads"], c["head_dim"], c["q_lora_rank"]
    g, dg, e, i = c["o_groups"], c["o_lora_rank"], c["n_routed_experts"], c["moe_intermediate_size"]
    ni, di = c["index_n_heads"], c["index_head_dim"]
    t = {f"{p}attn_norm.weight": ([h], "BF16"), f"{p}ffn_norm.weight": ([h], "BF16")}
    t.update(_hc(f"{p}hc_attn", 24, h))
    t.update(_hc(f"{p}hc_ffn", 24, h))
    t[f"{p}attn.attn_sink"] = ([nh], "F32")
    t.update(_fp8(f"{p}attn.wq_a", [q, h]))
    t[f"{p}attn.q_norm.weight"] = ([q], "BF16")
    t.update(_fp8(f"{p}attn.wq_b", [nh * d, q]))
    t.update(_fp8(f"{p}attn.wkv", [d, h]))
    t[f"{p}attn.kv_norm.weight"] = ([d], "BF16")
    t.update(_fp8(f"{p}attn.wo_a", [g * dg, nh * d // g]))
    t.update(_fp8(f"{p}attn.wo_b", [h, g * dg]))
    if ratio:
        width = (2 if ratio == 4 else 1) * d
        for name in ("wkv", "wgate"):
            t[f"{p}attn.compressor.{name}.weight"] = ([width, h], "BF16")
        t[f"{p}attn.compressor.ape"] = ([ratio, width], "F32")
        t[f"{p}attn.compressor.norm.weight"] = ([d], "BF16")
    if ratio == 4:
        t.update(_fp8(f"{p}attn.indexer.wq_b", [ni * di, q]))
        t[f"{p}attn.indexer.weights_proj.weight"] = ([ni, h], "BF16")
        for name in ("wkv", "wgate"):
            t[f"{p}attn.indexer.compressor.{name}.weight"] = ([2 * di, h], "BF16")
        t[f"{p}attn.indexer.compressor.ape"] = ([4, 2 * di], "F32")
        t[f"{p}attn.indexer.compressor.norm.weight"] = ([di], "BF16")
    t[f"{p}ffn.gate.weight"] = ([e, h], "BF16")
    if hashed:
        t[f"{p}ffn.gate.tid2eid"] = ([c["vocab_size"], c["num_experts_per_tok"]], "I64")
    else:
        t[f"{p}ffn.gate.bias"] = ([e], "F32")
    for x in range(e):
        t.update(_fp4(f"{p}ffn.experts.{x}.w1", [i, h]))
        t.update(_fp4(f"{p}ffn.experts.{x}.w3", [i, h]))
        t.update(_fp4(f"{p}ffn.experts.{x}.w2", [h, i]))
    t.update(_fp8(f"{p}ffn.shared_experts.w1", [i, h]))
    t.update(_fp8(f"{p}ffn.shared_experts.w3", [i, h]))
    t.update(_fp8(f"{p}ffn.shared_experts.w2", [h, i]))
    return t


def v4_tensors(c: dict[str, Any]) -> dict[str, tuple[list[int], str]]:
    """Native keys of a V4 checkpoint: target, then either the legacy MTP block `mtp.0` (no DSpark fields; its
    e_proj / h_proj shapes [H, H] are derived, not read from a header) or the three DSpark stages (V4 §4.2)."""
    h, v, layers = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    t = {"embed.weight": ([v, h], "BF16"), "head.weight": ([v, h], "BF16"), "norm.weight": ([h], "BF16")}
    t.update(_hc("hc_head", 4, h))
    for n in range(layers):
        t.update(v4_block(f"layers.{n}.", c, c["compress_ratios"][n], n < c["num_hash_layers"]))
    stages = c.get("dspark_target_layer_ids")
    if not stages:
        t.update(v4_block("mtp.0.", c, 0, False))
        t.update(_fp8("mtp.0.e_proj", [h, h]))
        t.update(_fp8("mtp.0.h_proj", [h, h]))
        t.update({f"mtp.0.{n}.weight": ([h], "BF16") for n in ("enorm", "hnorm", "norm")})
        t.update(_hc("mtp.0.hc_head", 4, h))
        return t
    r, last = c["dspark_markov_rank"], len(stages) - 1
    for s in range(len(stages)):
        t.update(v4_block(f"mtp.{s}.", c, 0, False))
    t.update(_fp8("mtp.0.main_proj", [h, len(stages) * h]))
    t["mtp.0.main_norm.weight"] = ([h], "BF16")
    t[f"mtp.{last}.norm.weight"] = ([h], "BF16")
    t.update(_hc(f"mtp.{last}.hc_head", 4, h))
    t[f"mtp.{last}.markov_head.markov_w1.weight"] = ([v, r], "BF16")
    t[f"mtp.{last}.markov_head.markov_w2.weight"] = ([v, r], "BF16")
    t[f"mtp.{last}.confidence_head.proj.weight"] = ([1, h + r], "BF16")
    return t


def build_all() -> dict[str, dict[str, Any]]:
    """{manifest name: manifest} for every committed file."""
    out = {}
    for size in V4:
        for dspark in (False, True):
            config = v4_config(size, dspark)
            tensors = {k: {"shape": s, "dtype": d} for k, (s, d) in sorted(v4_tensors(config).items())}
            out[f"deepseek-v4-{size}{'-dspark' if dspark else ''}"] = {"config": config, "tensors": tensors}
    for size in QWEN3:
        configs = {
            f"qwen3-{size}": (qwen3_config(size), qwen3_shapes),
            f"dspark-qwen3-{size}-block{BLOCK_SIZE}": (draft_config(size, True), draft_shapes),
            f"dflash-qwen3-{size}-block{BLOCK_SIZE}": (draft_config(size, False), draft_shapes),
        }
        for name, (config, shapes_fn) in configs.items():
            tensors = {k: {"shape": s, "dtype": "BF16"} for k, s in sorted(shapes_fn(config).items())}
            out[name] = {"config": config, "tensors": tensors}
    return out


def encode(manifest: dict[str, Any]) -> bytes:
    """Deterministic gzip bytes (mtime 0, sorted keys) so regenerating leaves git diffs empty."""
    raw = json.dumps(manifest, sort_keys=True, indent=1).encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    return buf.getvalue()


def main() -> None:
    for name, manifest in build_all().items():
        with open(os.path.join(HERE, f"{name}.json.gz"), "wb") as f:
            f.write(encode(manifest))
        print(f"{name}.json.gz: {len(manifest['tensors'])} tensors")


if __name__ == "__main__":
    main()
