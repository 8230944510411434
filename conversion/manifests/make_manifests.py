"""Regenerate the committed *.json.gz key manifests from the public Qwen3 configs: `python make_manifests.py`.

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


def build_all() -> dict[str, dict[str, Any]]:
    """{manifest name: manifest} for every committed file."""
    out = {}
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
