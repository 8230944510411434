"""Block sizes for the verify kernel, keyed by platform and vocabulary size (data only).

Rows are `(min_vocab, block_v, ...)` in ascending `min_vocab`; the row with the largest `min_vocab <= vocab`
applies. The values are starting points chosen from the kernel's structure (one program per batch row,
streaming vocab tiles), not measured optima; `_common.gpu_block` / `_common.tpu_block` round whatever is
chosen to a legal tile, so any entry here is safe.
"""

# GPU (Triton): (min_vocab, block_v, num_warps). block_v is rounded to a power of two and capped at
# next_power_of_2(vocab); 4-16 f32 lanes per thread keeps each tile in registers.
GPU_BLOCKS = (
    (0, 256, 2),
    (2048, 1024, 4),
    (16384, 2048, 8),
    (65536, 4096, 8),
)
GPU_NUM_STAGES = 2

# TPU (Mosaic): (min_vocab, block_v). block_v is a multiple of 128 lanes; the vocab is zero-padded to it.
TPU_BLOCKS = (
    (0, 128),
    (2048, 512),
    (16384, 2048),
)

# Used when a table has no applicable row (cannot happen with a 0 row, kept as the documented fallback).
FALLBACK = {"gpu": (1024, 4), "tpu": (512,)}
