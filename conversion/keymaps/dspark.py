"""DeepSpec DSpark / DFlash draft keys (no model prefix, spec §5.2) -> Draft param tree paths."""

from conversion.keymaps.qwen3 import decoder_layer_entries

DRAFT_KEYMAP = (
    (r"embed_tokens\.weight", "embed_tokens", "identity"),
    *decoder_layer_entries(r"layers\.(\d+)\."),
    (r"norm\.weight", "norm.weight", "identity"),
    (r"fc\.weight", "fc", "transpose"),
    (r"hidden_norm\.weight", "hidden_norm.weight", "identity"),
    (r"lm_head\.weight", "lm_head", "transpose"),
    (r"markov_head\.markov_w1\.weight", "markov_head.markov_w1", "identity"),  # E1 table [vocab, rank]
    (r"markov_head\.markov_w2\.weight", "markov_head.markov_w2", "transpose"),  # E2 as x @ W: [rank, vocab]
    (r"markov_head\.gate_proj\.weight", "markov_head.gate_proj.weight", "transpose"),
    (r"markov_head\.gate_proj\.bias", "markov_head.gate_proj.bias", "identity"),
    (r"markov_head\.joint_proj\.weight", "markov_head.joint_proj.weight", "transpose"),
    (r"markov_head\.joint_proj\.bias", "markov_head.joint_proj.bias", "identity"),
    (r"confidence_head\.proj\.weight", "confidence_head.proj.weight", "transpose"),
    (r"confidence_head\.proj\.bias", "confidence_head.proj.bias", "identity"),
)

# Gemma4 flavour (spec §5.2): the same keys plus the sandwich norms and the layer_scalar buffer; with key-equals-value
# attention the checkpoint and the tree both lack v_proj, so the shared v_proj row simply matches nothing.
GEMMA4_DRAFT_KEYMAP = (
    *DRAFT_KEYMAP,
    (r"layers\.(\d+)\.pre_feedforward_layernorm\.weight", "layers.{0}.pre_feedforward_layernorm.weight", "identity"),
    (r"layers\.(\d+)\.post_feedforward_layernorm\.weight", "layers.{0}.post_feedforward_layernorm.weight", "identity"),
    (r"layers\.(\d+)\.layer_scalar", "layers.{0}.layer_scalar", "identity"),  # [1] buffer, loaded as LayerScalar
)


def tied_head_keymap(keymap: tuple) -> tuple:
    """`keymap` for a draft whose LM head is its tied target's embedding ([vocab, hidden], DraftConfig.tied_head):
    lm_head.weight, stored [vocab, hidden] as well, is read as it is."""
    return tuple((pattern, path, "identity" if path == "lm_head" else fn) for pattern, path, fn in keymap)
