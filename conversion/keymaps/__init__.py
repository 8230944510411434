"""Key maps: ordered tables of (source regex, tree path template, transform name), one per checkpoint family."""

from conversion.keymaps.dspark import DRAFT_KEYMAP, GEMMA4_DRAFT_KEYMAP
from conversion.keymaps.qwen3 import QWEN3_KEYMAP

KEYMAPS = {
    "qwen3": QWEN3_KEYMAP,
    "dspark": DRAFT_KEYMAP,
    "dflash": DRAFT_KEYMAP,
    "dspark_gemma4": GEMMA4_DRAFT_KEYMAP,
    "dflash_gemma4": GEMMA4_DRAFT_KEYMAP,
}
