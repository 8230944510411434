"""Dequantisation of DeepSeek-V4 weights at conversion (V4 §3.2): FP8 e4m3 with 128×128 e8m0 block scales and FP4
e2m1 nibble-packed experts with one e8m0 scale per 32 input columns, computed in f32 and rounded once.

A quantised `X.weight` has its scale in a sibling `X.scale` (native and transformers on-disk names) or
`X.weight_scale_inv` (transformers in-memory names; a multiplier despite the name). The dtype of the weight picks the
format, never the model name: F8_E4M3 → FP8 blocks, I8/U8 → packed FP4.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from dspark_jax.errors import DSparkError, UsageError

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
PACKED_FP4 = (np.dtype(np.int8), np.dtype(np.uint8))
FP8_BLOCK = 128  # rows and columns of one FP8 scale tile
FP4_BLOCK = 32  # input columns sharing one FP4 scale
SCALE_SUFFIXES = (".scale", ".weight_scale_inv")
# E2M1 code -> value: bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa; code 1 is the subnormal 0.5.
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
# Rows dequantised per step: bounds the f32 temporaries to a few MB whatever the tensor size.
_ROWS_PER_STEP = 256


def is_quantized(dtype) -> bool:
    """True for the stored dtypes that need a scale: F8_E4M3 and I8/U8 (packed FP4)."""
    return np.dtype(dtype) == FP8 or np.dtype(dtype) in PACKED_FP4


def scale_key_of(weight_key: str, keys) -> str | None:
    """The sibling scale key of `weight_key` present in `keys` ('a.weight' -> 'a.scale' / 'a.weight_scale_inv')."""
    if not weight_key.endswith(".weight"):
        return None
    stem = weight_key[: -len(".weight")]
    for candidate in (stem + ".scale", weight_key + "_scale_inv"):
        if candidate in keys:
            return candidate
    return None


def scale_siblings(reader) -> dict[str, str]:
    """{quantised weight key: its scale key} for every quantised tensor of `reader` that has a scale."""
    keys = set(reader.keys())
    out = {}
    for key in reader.keys():
        if is_quantized(reader.spec(key).dtype):
            scale = scale_key_of(key, keys)
            if scale is not None:
                out[key] = scale
    return out


def logical_shape(shape: tuple[int, ...], dtype) -> tuple[int, ...]:
    """Shape after dequantisation: packed FP4 holds two values per byte along the last (input) dimension."""
    shape = tuple(shape)
    if np.dtype(dtype) in PACKED_FP4:
        return shape[:-1] + (2 * shape[-1],)
    return shape


def expected_scale_shape(shape: tuple[int, ...], dtype) -> tuple[int, ...]:
    """Scale shape for a stored weight of `shape`/`dtype`: FP8 [ceil(out/128), ceil(in/128)], FP4 [out, in/32]."""
    out_dim, in_dim = logical_shape(shape, dtype)
    if np.dtype(dtype) == FP8:
        return (math.ceil(out_dim / FP8_BLOCK), math.ceil(in_dim / FP8_BLOCK))
    return (out_dim, math.ceil(in_dim / FP4_BLOCK))


def check_pair(key: str, shape, dtype, scale_key: str | None, scale_shape=None, scale_dtype=None) -> str | None:
    """Why the quantised tensor `key` cannot be dequantised (one clause), or None when it can."""
    kind = "F8_E4M3" if np.dtype(dtype) == FP8 else "packed FP4"
    if len(shape) != 2:
        return f"{key} is {kind} with shape {list(shape)}; only 2-D [out, in] matrices are quantised"
    if scale_key is None:
        return f"{key} is {kind} but has no scale ({_scale_name(key)})"
    want = expected_scale_shape(shape, dtype)
    if tuple(scale_shape) != want:
        return f"{scale_key} has shape {list(scale_shape)}, expected {list(want)} for {kind} {key} {list(shape)}"
    if np.dtype(scale_dtype) not in (E8M0, np.dtype(np.float32)):
        return f"{scale_key} has dtype {np.dtype(scale_dtype).name}, expected F8_E8M0 (or F32 powers of two)"
    return None


def _scale_name(weight_key: str) -> str:
    return (weight_key[: -len(".weight")] if weight_key.endswith(".weight") else weight_key) + ".scale"


def check_fp4_target(key: str, unpacked_shape: tuple[int, ...]) -> None:
    """An FP4 tensor packs value pairs along its last dimension, so that dimension must be even."""
    if unpacked_shape and unpacked_shape[-1] % 2:
        raise UsageError(
            f"{key}: packed FP4 needs an even last dimension, got {list(unpacked_shape)}; two values share one byte"
        )


def e8m0_to_f32(scale: np.ndarray, name: str = "scale") -> np.ndarray:
    """F8_E8M0 bytes (or F32 powers of two) -> f32 multipliers 2^(e-127); a NaN byte 0xFF is a DSparkError."""
    if np.dtype(scale.dtype) == E8M0:
        raw = scale.view(np.uint8)
        bad = raw == 0xFF
        # 0xFF would overflow ldexp: mask it (it is refused just below)
        out = np.ldexp(np.float32(1), np.where(bad, 127, raw).astype(np.int32) - 127).astype(np.float32)
    else:
        out = np.asarray(scale, np.float32)
        bad = ~np.isfinite(out)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise DSparkError(
            f"{name} holds a NaN scale (byte 0xFF) at {list(where)}; the checkpoint is corrupt, re-download it"
        )
    return out


def dequant_fp8(weight: np.ndarray, scale: np.ndarray, dtype=np.float32, *, name: str = "weight") -> np.ndarray:
    """W[i, j] = fp8(Wq[i, j]) · 2^(S[i // 128, j // 128] − 127).

    Args:
      weight: float8_e4m3fn[out, in]; scale: float8_e8m0fnu[ceil(out/128), ceil(in/128)].
    Returns:
      dtype[out, in], each element computed in f32 and rounded once to `dtype`.
    """
    out_dim, in_dim = weight.shape
    mult = e8m0_to_f32(scale, f"{name} scale")
    cols = np.repeat(mult, FP8_BLOCK, axis=1)[:, :in_dim]  # f32[ceil(out/128), in]
    out = np.empty((out_dim, in_dim), dtype)
    for start in range(0, out_dim, FP8_BLOCK):
        stop = min(start + FP8_BLOCK, out_dim)
        with np.errstate(over="ignore"):  # 448 · 2^127 is inf in f32, as the formula says
            out[start:stop] = weight[start:stop].astype(np.float32) * cols[start // FP8_BLOCK]
    return out


def dequant_fp4(packed: np.ndarray, scale: np.ndarray, dtype=np.float32, *, name: str = "weight") -> np.ndarray:
    """W[i, j] = E2M1[code(i, j)] · 2^(S[i, j // 32] − 127); low nibble = even column, high nibble = odd column.

    Args:
      packed: int8 or uint8[out, in/2]; scale: float8_e8m0fnu[out, ceil(in/32)].
    Returns:
      dtype[out, in].
    """
    codes = packed.view(np.uint8)  # int8 >> 4 would sign-extend
    out_dim, half = codes.shape
    in_dim = 2 * half
    mult = e8m0_to_f32(scale, f"{name} scale")
    out = np.empty((out_dim, in_dim), dtype)
    for start in range(0, out_dim, _ROWS_PER_STEP):
        stop = min(start + _ROWS_PER_STEP, out_dim)
        chunk = codes[start:stop]
        values = np.empty((stop - start, half, 2), np.float32)
        values[..., 0] = E2M1[chunk & 0x0F]
        values[..., 1] = E2M1[chunk >> 4]
        values = values.reshape(stop - start, in_dim)  # columns (2k, 2k+1) from byte k
        with np.errstate(over="ignore"):
            out[start:stop] = values * np.repeat(mult[start:stop], FP4_BLOCK, axis=1)[:, :in_dim]
    return out


def dequantize(key: str, weight: np.ndarray, scale: np.ndarray | None, dtype=np.float32) -> np.ndarray:
    """Dispatch on the stored dtype: F8_E4M3 → `dequant_fp8`, I8/U8 → `dequant_fp4`; anything else passes through.

    Shapes and the presence of the scale are checked first (one-line UsageError naming `key`).
    """
    if not is_quantized(weight.dtype):
        return weight
    if np.dtype(weight.dtype) in PACKED_FP4 and weight.ndim == 2 and weight.shape[-1] == 0:
        raise UsageError(f"{key}: packed FP4 tensor has an empty last dimension")
    problem = check_pair(
        key,
        weight.shape,
        weight.dtype,
        None if scale is None else _scale_name(key),
        None if scale is None else scale.shape,
        None if scale is None else scale.dtype,
    )
    if problem:
        raise UsageError(problem)
    if np.dtype(weight.dtype) == FP8:
        return dequant_fp8(weight, scale, dtype, name=key)
    return dequant_fp4(weight, scale, dtype, name=key)


def read_dequantized(reader, key: str, scale_key: str | None, dtype=np.float32) -> np.ndarray:
    """Read `key` from `reader`; a quantised tensor comes back dequantised to `dtype` (float32 or bfloat16)."""
    weight = reader.read(key)
    if not is_quantized(weight.dtype):
        return weight
    scale = None if scale_key is None else reader.read(scale_key)
    return dequantize(key, weight, scale, dtype)


def read_dequantized_rows(reader, key: str, scale_key: str | None, start: int, stop: int, dtype=np.float32):
    """Rows [start, stop) of `read_dequantized(reader, key, scale_key, dtype)`, reading only the stored rows they need.

    An FP8 weight is read in whole 128-row tiles (with their scale rows), a packed FP4 one exactly those rows (one
    scale row each), a float one as stored (not cast). Every element is the same f32 product rounded once, so the
    rows are bit-identical to the whole tensor's. A reader without `read_rows` (or a pair that cannot be
    dequantised, which then raises) falls back to the whole read.
    """
    spec = reader.spec(key)
    read_rows = getattr(reader, "read_rows", None)
    if read_rows is None:
        return read_dequantized(reader, key, scale_key, dtype)[start:stop]
    if not is_quantized(spec.dtype):
        return read_rows(key, start, stop)
    if len(spec.shape) != 2 or scale_key is None:
        return read_dequantized(reader, key, scale_key, dtype)[start:stop]  # the one-line error of `dequantize`
    if np.dtype(spec.dtype) == FP8:  # a scale row covers 128 weight rows: read whole tiles, cut after
        lo, hi = start // FP8_BLOCK * FP8_BLOCK, min(-(-stop // FP8_BLOCK) * FP8_BLOCK, spec.shape[0])
        scale = read_rows(scale_key, lo // FP8_BLOCK, -(-hi // FP8_BLOCK))
    else:
        lo, hi = start, stop
        scale = read_rows(scale_key, start, stop)
    rows = dequantize(key, read_rows(key, lo, hi), scale, dtype)
    return rows if (lo, hi) == (start, stop) else np.ascontiguousarray(rows[start - lo : stop - lo])


__all__ = [
    "E2M1",
    "E8M0",
    "FP8",
    "SCALE_SUFFIXES",
    "check_pair",
    "dequant_fp4",
    "dequant_fp8",
    "dequantize",
    "e8m0_to_f32",
    "expected_scale_shape",
    "is_quantized",
    "logical_shape",
    "read_dequantized",
    "read_dequantized_rows",
    "scale_key_of",
    "scale_siblings",
]
