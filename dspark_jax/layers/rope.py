"""Rotary position embedding, rotate-half style (first half of head_dim pairs with the second half)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rope_frequencies(head_dim: int, theta: float, scaling: tuple | None = None) -> jnp.ndarray:
    """f32[head_dim // 2]: theta^(-2i/head_dim), divided by the factor for linear scaling."""
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling:
        params = dict(scaling)
        assert params.get("rope_type") == "linear", f"unsupported rope scaling {params}"
        inv = inv / float(params["factor"])
    return inv


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: jnp.ndarray) -> jnp.ndarray:
    """Rotate x: [batch, seq, heads, head_dim] at positions i32[batch, seq]; angles and rotation in f32."""
    # Highest precision: a bf16 product of a large position and a frequency loses whole radians.
    angles = jnp.einsum("bt,f->btf", positions.astype(jnp.float32), inv_freq, precision=jax.lax.Precision.HIGHEST)[
        :, :, None, :
    ]  # [b, t, 1, h/2]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
