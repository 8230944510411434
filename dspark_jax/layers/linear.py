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
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ROW_PRODUCT_ROWS = (2, 32)  # CPU row counts that take the isolated multiply-reduce (measured above)
# ... for kernels of at least this many bytes: smaller ones stay in cache, where the dot is fast, and each isolated
# product is a conditional more to compile (the test suite's tiny models would pay that for nothing).
ROW_PRODUCT_MIN_BYTES = 256 * 1024


def _row_product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [m, k], w [n, k] -> f32[m, n]: the product as one multiply + reduce over k (w's minor axis)."""
    return jnp.sum(w[None, :, :].astype(jnp.float32) * x[:, None, :].astype(jnp.float32), axis=-1)


def dense(x: jax.Array, w: jax.Array, out_major: bool, preferred_element_type=None) -> jax.Array:
    """x [..., k] times a 2-D kernel: w [k, n] (in-major) or [n, k] (out_major) -> [..., n].

    The result has `preferred_element_type` (default x's dtype). In-major is a plain einsum. Out-major on CPU with
    2-32 rows (the product of x's leading dims) and a kernel of at least ROW_PRODUCT_MIN_BYTES is the isolated
    multiply-reduce described above, in f32; otherwise an einsum over w's minor axis.
    """
    out_dtype = preferred_element_type or x.dtype
    if not out_major:
        return jnp.einsum("...k,kn->...n", x, w, preferred_element_type=preferred_element_type)
    rows = math.prod(x.shape[:-1])
    isolate = ROW_PRODUCT_ROWS[0] <= rows <= ROW_PRODUCT_ROWS[1] and w.size * w.dtype.itemsize >= ROW_PRODUCT_MIN_BYTES
    if jax.default_backend() != "cpu" or not isolate:
        return jnp.einsum("...k,nk->...n", x, w, preferred_element_type=preferred_element_type)
    x2 = x.reshape(rows, x.shape[-1])
    # Both branches are the same product: the predicate only has to be data (never folded), its value is irrelevant.
    y = jax.lax.cond(x2[0, 0] > 0, _row_product, _row_product, x2, w)
    return y.astype(out_dtype).reshape(*x.shape[:-1], w.shape[0])


def out_major(w: jax.Array, in_axes: int) -> jax.Array:
    """A declared kernel whose first `in_axes` axes are inputs -> its 2-D out-major form [out, in]."""
    k = math.prod(w.shape[:in_axes])
    return w.reshape(k, -1).T
