"""Key maps: ordered tables of (source regex, tree path template, transform name), one per checkpoint family."""

from conversion.keymaps.deepseek_v4 import DEEPSEEK_V4_DRAFT_KEYMAP, DEEPSEEK_V4_KEYMAP
from conversion.keymaps.dspark import DRAFT_KEYMAP, GEMMA4_DRAFT_KEYMAP, tied_head_keymap
from conversion.keymaps.gemma4 import GEMMA4_KEYMAP
from conversion.keymaps.qwen3 import QWEN3_KEYMAP
from conversion.keymaps.qwen3_moe import QWEN3_MOE_KEYMAP

KEYMAPS = {
    "qwen3": QWEN3_KEYMAP,
    "qwen3_moe": QWEN3_MOE_KEYMAP,
    "dspark": DRAFT_KEYMAP,
    "dflash": DRAFT_KEYMAP,
    "dspark_gemma4": GEMMA4_DRAFT_KEYMAP,
    "dflash_gemma4": GEMMA4_DRAFT_KEYMAP,
    "gemma4": GEMMA4_KEYMAP,
    "deepseek_v4": DEEPSEEK_V4_KEYMAP,
    "deepseek_v4_draft": DEEPSEEK_V4_DRAFT_KEYMAP,  # mtp.* of a -DSpark folder (V4 §4.2)
}


def keymap_for(kind: str, config) -> tuple:
    """The key map of checkpoint `kind` for a model of `config` (a `tied_head` draft reads its head as stored)."""
    return tied_head_keymap(KEYMAPS[kind]) if getattr(config, "tied_head", False) else KEYMAPS[kind]
