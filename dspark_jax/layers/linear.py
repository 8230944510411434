"""Dense projections, in the declared in-major layout ([in, out]) or out-major ([out, in], the CPU decode layout).

Why two layouts: XLA:CPU multiplies a few rows (a verify pass, a draft block: 2-32 rows) by a weight matrix that is
not in cache far below the bandwidth it reaches for one row. Measured on a 2-core AVX2 EPYC, 12 f32 matrices of
[1024, 1024] (48 MB): one row 3.2 ms, 8 rows 14.5 ms as a dot. Written as a multiply + reduce over the minor axis
of an out-major weight, 8 rows take 5.8 ms (16 rows 6.2, 32 rows 11.0; from 64 rows on the dot is as fast): XLA
hands that product to a library kernel that streams the weight once. It does so only while the product is
compiled on its own: fused with the norm, activation or residual around it (XLA fuses greedily), it ran slower than
the dot (and 30x slower at 2 rows). A conditional whose two branches are that same product keeps it apart: XLA
does not fuse across a branch, and a data-dependent predicate is not folded away. The decode loop on CPU runs a copy
of the target and draft whose dense kernels are out-major (`to_out_major`, `loading.Target.decode_parts`); one row
and many rows take a plain dot in either layout.

Compact kernels: a bf16 checkpoint run in f32 holds f32 weights that bf16 represents exactly, so the decode copy
stores them in bf16 (`compact`) and widens them inside the product: the same numbers from half the bytes. In the
products' own sweep (20 kernels of [1536, 512], 63 MB as f32, same AVX2 machine) one row took 4.8-4.9 ms against
5.3 for the f32 dot (so one row of a compact kernel is isolated too), 8 rows 8.6 ms against 9.1 for the f32
multiply-reduce, and the tied LM head's [8, 512] x [4096, 512] 6.0 against 8.5. A bf16 kernel wants the reduction
in [out, rows, in] order from two rows on (in [rows, out, in] order 8 rows took 20 ms) and the [rows, out, in]
order at one row (the other took 37 ms): `_column_product` and `_row_product`. Up to 128 rows (a batch-16
verify pass) a compact kernel stays isolated: 20 such kernels took 15.7 / 31.3 ms at 64 / 128 rows against
15.2 / 34.7 for the dot with the widening in it, but inside the decode loop a dot's widening of a loop-invariant
kernel is hoisted out of the loop by XLA, so every call of the loop widened all 42 target kernels up front (~90 ms at
batch 16, paid even when the scheduler never drafts). From 256 rows on the dot is faster (54 against 78 ms).

A bf16 model (bf16 activations and kernels) takes, from two rows on, one dot of the bf16 operands summed in f32
(`_narrow_dot`), which XLA:CPU (jax 0.10.2) hands to its library kernel on the 16-bit operands as they are. Measured
on a 2-core AVX-512 EPYC (Zen 5, avx512_bf16), a chain of 48 kernels of [1536, 512] (72 MB) as jit parameters in a
loop, per kernel: 2 / 8 / 32 / 128 rows 109 / 110 / 139 / 340 us against 146 / 137 / 238 / 615 us for the isolated
[out, rows, in] multiply-reduce; with a bf16 result the same dot took 335-763 us. One row stays the isolated
[rows, out, in] product: there XLA widened every kernel to f32 first (hoisted out of the loop, paid per call; 149
against 90 us). The embedded pair in bf16 (64 new tokens, one process, old and new compiled in turn): plain
decoding 1.19 / 1.45 / 1.35x faster at batch 4 / 16 / 64, `full` 1.15 / 1.43 / 1.55x at batch 1 / 4 / 16, a
2000-token prefill 442 -> 358 ms (benchmarks/RESULTS.md, 2026-12-05 session 21). Session 18 had measured the bf16
dot slower at 8 rows over that target's 43 products (5.8 against 3.2 ms); that dot was the einsum's, with a bf16
result, most likely the slow form above. Not measured on an AVX2-only CPU (no bf16 instructions there).

One row times a compact kernel (plain decoding's step) has two candidate forms, and which is faster depends on the
CPU: the isolated multiply-reduce above, or a dot over the kernel widened and transposed to [in, out] inside the same
conditional (`_transposed_dot`). Each machine times both once per kernel shape (layers/product_forms.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dspark_jax.cache import as_bits, as_values
from dspark_jax.layers import product_forms

ROW_PRODUCT_ROWS = (2, 32)  # CPU row counts that take the isolated multiply-reduce (measured above)
COMPACT_PRODUCT_ROWS = (1, 128)  # ... for a compact kernel under f32 rows, which a dot would widen first (above)
# ... for kernels of at least this many elements (256 KiB in f32): smaller ones stay in cache, where the dot is fast,
# and each isolated product is a conditional more to compile (the test suite's tiny models would pay for nothing).
ROW_PRODUCT_MIN_SIZE = 64 * 1024
# Accelerator row counts that take a plain multiply-reduce instead of the dot (in either layout): empty until measured
# on a device (benchmarks/gpu_step.py compares both); (1, 1) would be the one-row step of plain decoding.
ACCEL_REDUCE_ROWS = (1, 0)


def _row_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [m, k], w [n, k] -> f32[m, n]: the product as one multiply + reduce over k (w's minor axis)."""
    return jnp.sum(w[None, :, :].astype(jnp.float32) * x[:, None, :].astype(jnp.float32), axis=-1)


def _column_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """The same product reduced in [n, m, k] order, then transposed: for a bf16 kernel the faster order from 2 rows
    on (and 30x slower at one row)."""
    return jnp.sum(w[:, None, :].astype(jnp.float32) * x[None, :, :].astype(jnp.float32), axis=-1).T


def _narrow_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [m, k] and w [n, k] of one 16-bit dtype -> f32[m, n]: `project`'s product (the 16-bit operands summed in
    f32, which XLA:CPU hands to its library kernel as they are) on the rows flattened to 2-D. The same einsum over
    [batch, t, k] rows, alone the same compiled op, ran the embedded pair's batch-1 `full` rounds at 0.75x this
    speed in the decode loop (RESULTS.md, s. 21)."""
    return project("mk,nk->mn", x, w, jnp.float32)


def _in_major_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [m, k], w [k, n] -> f32[m, n] as one multiply + reduce over k (w's major axis: a column reduction)."""
    return jnp.sum(w[None, :, :].astype(jnp.float32) * x[:, :, None].astype(jnp.float32), axis=1)


def compact(w: jax.Array) -> jax.Array:
    """w, or w in bfloat16 when that holds every value exactly (a bf16 checkpoint run in f32): the decode copy then
    streams half the bytes for the very same products."""
    if w.dtype != jnp.float32:
        return w
    narrow = w.astype(jnp.bfloat16)
    return narrow if bool(jnp.all(narrow.astype(jnp.float32) == w)) else w


def dense(x: jax.Array, w: jax.Array, out_major: bool, preferred_element_type=None) -> jax.Array:
    """x [..., k] times a 2-D kernel: w [k, n] (in-major) or [n, k] (out_major) -> [..., n].

    The result has `preferred_element_type` (default x's dtype); w may be narrower than x (a `compact` kernel) and
    is widened to x's dtype. In-major is an einsum (`project`). Out-major on CPU with a kernel of at least
    ROW_PRODUCT_MIN_SIZE elements: 2-32 rows (the product of x's leading dims; 1-128 for a compact kernel under f32
    rows, one row of a bf16 model) are the isolated multiply-reduce described above, in f32 (one row of a 16-bit
    kernel: that or the isolated `_transposed_dot`, whichever this machine ran faster); a bf16 model's 2 rows and
    more are the dot of its bf16 operands summed in f32 (`_narrow_dot`); otherwise an einsum over w's minor axis.
    On an accelerator, row counts within ACCEL_REDUCE_ROWS (none by default) take a plain multiply-reduce in either
    layout.
    """
    rows = math.prod(x.shape[:-1])
    product = _reduce_form(rows, w, out_major, x.dtype)
    if product is None:
        return project("...k,nk->...n" if out_major else "...k,kn->...n", x, w, preferred_element_type)
    y = product(x.reshape(rows, x.shape[-1]), w)
    return y.astype(preferred_element_type or x.dtype).reshape(*x.shape[:-1], w.shape[0] if out_major else w.shape[1])


def project(spec: str, x: jax.Array, w: jax.Array, preferred_element_type=None) -> jax.Array:
    """jnp.einsum(spec, x, w in x's dtype), in `preferred_element_type` (default x's dtype). On CPU a 16-bit product
    is summed into an f32 result and rounded once: asked for a 16-bit result, XLA:CPU ran the same dot 2-3x slower
    from two rows on (24 bf16 kernel pairs of [512, 1536] in a chain, in-major, 8 rows: 237 against 102 us a kernel;
    the embedded target's bf16 forward over 8 / 256 tokens 23.1 / 55.6 -> 5.0 / 28.3 ms). The sums are the same up
    to their order (1 ulp in ~0.03 % of outputs)."""
    wide = jax.default_backend() == "cpu" and x.dtype.itemsize == 2
    y = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32 if wide else preferred_element_type)
    return y.astype(preferred_element_type or x.dtype)


def _transposed_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [m, k], w [n, k] -> f32[m, n] as a dot over w widened to f32 and transposed to [k, n] (XLA:CPU makes that
    copy inside the product: in a conditional it is not hoisted out of the loop)."""
    return x.astype(jnp.float32) @ w.astype(jnp.float32).T


def _reduce_form(rows: int, w: jax.Array, out_major: bool, x_dtype):
    """The product that `rows` rows of x_dtype times w take instead of the einsum (`dense`), or None for the
    einsum."""
    if w.size < ROW_PRODUCT_MIN_SIZE:
        return None
    if jax.default_backend() != "cpu":
        low, high = ACCEL_REDUCE_ROWS
        return (_row_product if out_major else _in_major_product) if low <= rows <= high else None
    narrow = w.dtype.itemsize < 4  # a 16-bit kernel: `compact` under f32 activations, or a bf16 model's
    if narrow and out_major and x_dtype == w.dtype and rows > 1:
        return _narrow_dot
    low, high = COMPACT_PRODUCT_ROWS if narrow else ROW_PRODUCT_ROWS
    if not out_major or not low <= rows <= high:
        return None
    if narrow and rows > 1:  # a 16-bit kernel wants the [out, rows, in] order from two rows on
        return functools.partial(_isolated, _column_product)
    if narrow:  # one row: the multiply-reduce or the transposed dot, whichever this CPU runs faster (measured)
        forms = {"row": _row_product, "transposed_dot": _transposed_dot}
        key = f"1x{w.shape[0]}x{w.shape[1]} {w.dtype.name} kernel, {jnp.dtype(x_dtype).name} rows"

        def timer(name):
            return product_forms.product_timer(functools.partial(_isolated, forms[name]), 1, w.shape, w.dtype, x_dtype)

        return functools.partial(_isolated, forms[product_forms.choose(key, tuple(forms), timer)])
    return functools.partial(_isolated, _row_product)


def _isolated(product, x2: jax.Array, w: jax.Array) -> jax.Array:
    """product(x2, w) compiled on its own: both branches of the conditional are the same product, the predicate only
    has to be data (never folded) and its value is irrelevant."""
    return jax.lax.cond(x2[0, 0] > 0, product, product, x2, w)


def take_rows(table: jax.Array, ids: jax.Array) -> jax.Array:
    """table[ids] along axis 0, in the table's dtype. A 16-bit table is gathered as its bits: XLA:CPU gathers a bf16
    table through an f32 copy of the whole table, a loop-invariant convert that it hoists out of the decode loop and
    pays on every call (the embedding and the Markov head's E1 of the embedded pair: 2.1 M elements each, in every
    loop; benchmarks/RESULTS.md, 2026-12-04 session 18). XLA:CPU copies the table into its bits once per call
    instead (hoisted; a plain copy). Accelerators gather 16-bit rows natively: the plain gather there."""
    return as_values(jnp.take(as_bits(table), ids, axis=0), table.dtype)


def out_major(w: jax.Array, in_axes: int) -> jax.Array:
    """A declared kernel whose first `in_axes` axes are inputs -> its 2-D out-major form [out, in]."""
    k = math.prod(w.shape[:in_axes])
    return w.reshape(k, -1).T
