"""HF Qwen3ForCausalLM safetensors keys -> Qwen3 param tree paths."""


def decoder_layer_entries(prefix: str) -> tuple[tuple[str, str, str], ...]:
    """Entries for one Qwen3 decoder layer under the regex `prefix` (which captures the layer index)."""
    rows = (
        ("input_layernorm.weight", "input_layernorm.weight", "identity"),
        ("post_attention_layernorm.weight", "post_attention_layernorm.weight", "identity"),
        ("self_attn.q_proj.weight", "self_attn.q_proj", "heads_in"),
        ("self_attn.k_proj.weight", "self_attn.k_proj", "heads_in"),
        ("self_attn.v_proj.weight", "self_attn.v_proj", "heads_in"),
        ("self_attn.o_proj.weight", "self_attn.o_proj", "heads_out"),
        ("self_attn.q_norm.weight", "self_attn.q_norm.weight", "identity"),
        ("self_attn.k_norm.weight", "self_attn.k_norm.weight", "identity"),
        ("mlp.gate_proj.weight", "mlp.gate_proj", "transpose"),
        ("mlp.up_proj.weight", "mlp.up_proj", "transpose"),
        ("mlp.down_proj.weight", "mlp.down_proj", "transpose"),
    )
    return tuple((prefix + src.replace(".", r"\."), "layers.{0}." + dst, fn) for src, dst, fn in rows)


QWEN3_KEYMAP = (
    (r"model\.embed_tokens\.weight", "embed_tokens", "identity"),
    *decoder_layer_entries(r"model\.layers\.(\d+)\."),
    (r"model\.norm\.weight", "norm.weight", "identity"),
    (r"lm_head\.weight", "lm_head", "transpose"),
)
