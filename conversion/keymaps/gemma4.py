"""HF Gemma4 safetensors keys -> Gemma4 target param tree paths.

Both layouts load: Gemma4ForCausalLM (`model.layers...`) and the language model of Gemma4ForConditionalGeneration
(`model.language_model.layers...`); the latter's vision / audio towers are skipped. Key-equals-value layers have no
v_proj in the checkpoint nor in the tree, so that row matches nothing there. A tied LM head is not stored.
"""

from conversion.keymaps.qwen3 import decoder_layer_entries

_PREFIX = r"model\.(?:language_model\.)?"

GEMMA4_KEYMAP = (
    (_PREFIX + r"embed_tokens\.weight", "embed_tokens", "identity"),
    *decoder_layer_entries(_PREFIX + r"layers\.(\d+)\."),
    (
        _PREFIX + r"layers\.(\d+)\.pre_feedforward_layernorm\.weight",
        "layers.{0}.pre_feedforward_layernorm.weight",
        "identity",
    ),
    (
        _PREFIX + r"layers\.(\d+)\.post_feedforward_layernorm\.weight",
        "layers.{0}.post_feedforward_layernorm.weight",
        "identity",
    ),
    (_PREFIX + r"layers\.(\d+)\.layer_scalar", "layers.{0}.layer_scalar", "identity"),  # [1] buffer, a LayerScalar
    (_PREFIX + r"norm\.weight", "norm.weight", "identity"),
    (r"lm_head\.weight", "lm_head", "transpose"),
)

# Multimodal parts of a Gemma4ForConditionalGeneration checkpoint: not part of the text target.
GEMMA4_SKIP = (r"model\.(?:vision_tower|embed_vision|audio_tower|embed_audio)\..*",)
