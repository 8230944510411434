"""Manifold-constrained hyper-connections (mHC, V4 §2.3): the 4-stream residual of DeepSeek-V4 and its final collapse.

Each sub-layer reads the current streams X [.., n_hc, hidden], derives pre / post / comb from one projection of the
normalised streams (comb made doubly stochastic by Sinkhorn), feeds `sum_j pre_j X_j` to its function F and returns
`post_k F + sum_j comb[j, k] X_j`. Everything that makes the mixing weights runs in f32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.layers.norms import rms_normalize
from dspark_jax.layers.params import declare


def _project(streams: jax.Array, fn: jax.Array, eps: float) -> jax.Array:
    """streams [b, t, n, d] -> f32[b, t, out]: the flattened streams, RMS-normalised without weight, times fn
    [n*d, out]."""
    b, t, n, d = streams.shape
    flat = rms_normalize(streams.reshape(b, t, n * d), eps)  # f32, stream-major vec(X)
    return jnp.einsum("btx,xo->bto", flat, fn.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
    """f32[..., n, n] -> comb: softmax over the last index + eps, a column normalisation, then iters - 1 rounds of
    (rows, columns); the last step normalises columns, so columns sum to 1 (V4 §2.3, order kept)."""
    c = jax.nn.softmax(logits, axis=-1) + eps
    c = c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    def step(_, c):
        c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
        return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

    # A loop, not unrolled: 19 unrolled rounds at each of the 2L mHC sites dominated compile time.
    return jax.lax.fori_loop(0, iters - 1, step, c)


class HyperConnection(nnx.Module):
    """One mHC site (attention or FFN of a block). Params (f32): fn [n*hidden, (2+n)*n] (x @ W layout of the
    checkpoint's [(2+n)*n, n*hidden]), base [(2+n)*n], scale [3] (pre, post, comb)."""

    def __init__(self, hidden: int, n: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float, *, rngs):
        self.n, self.iters, self.hc_eps, self.norm_eps = n, sinkhorn_iters, hc_eps, norm_eps
        width = (2 + n) * n
        self.fn = declare(rngs, (n * hidden, width), ("embed", None), "float32")
        self.base = declare(rngs, (width,), (None,), "float32", init="zeros")
        self.scale = declare(rngs, (3,), (None,), "float32", init="ones")

    def weights(self, streams: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """streams [b, t, n, d] -> (pre f32[b, t, n], post f32[b, t, n], comb f32[b, t, n, n])."""
        n = self.n
        mu = _project(streams, self.fn[...], self.norm_eps)
        base, scale = self.base[...], self.scale[...]
        pre = jax.nn.sigmoid(mu[..., :n] * scale[0] + base[:n]) + self.hc_eps
        post = 2.0 * jax.nn.sigmoid(mu[..., n : 2 * n] * scale[1] + base[n : 2 * n])
        comb_logits = (mu[..., 2 * n :] * scale[2] + base[2 * n :]).reshape(*mu.shape[:-1], n, n)
        return pre, post, sinkhorn(comb_logits, self.iters, self.hc_eps)

    def collapse(self, streams: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """streams [b, t, n, d] -> (sub-layer input sum_j pre_j X_j [b, t, d] in the streams' dtype, post, comb)."""
        pre, post, comb = self.weights(streams)
        y = jnp.einsum("btn,btnd->btd", pre, streams.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return y.astype(streams.dtype), post, comb

    @staticmethod
    def expand(streams: jax.Array, out: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
        """X'_k = post_k * F + sum_j comb[j, k] X_j (comb applied transposed), in the streams' dtype.

        streams [b, t, n, d]; out = F(y) [b, t, d]; post [b, t, n]; comb [b, t, n, n]."""
        dtype = streams.dtype
        mixed = jnp.einsum("btjk,btjd->btkd", comb.astype(dtype), streams)
        return post.astype(dtype)[..., None] * out.astype(dtype)[:, :, None, :] + mixed


class HyperHead(nnx.Module):
    """Final collapse of the streams (V4 §2.3 `hc_head`): z = sum_j pre_j X_j with pre = sigmoid(mu * s + b) + eps;
    no Sinkhorn, no post. Params (f32): fn [n*hidden, n], base [n], scale [1]."""

    def __init__(self, hidden: int, n: int, hc_eps: float, norm_eps: float, *, rngs):
        self.hc_eps, self.norm_eps = hc_eps, norm_eps
        self.fn = declare(rngs, (n * hidden, n), ("embed", None), "float32")
        self.base = declare(rngs, (n,), (None,), "float32", init="zeros")
        self.scale = declare(rngs, (1,), (None,), "float32", init="ones")

    def __call__(self, streams: jax.Array) -> jax.Array:
        """streams [b, t, n, d] -> [b, t, d] in the streams' dtype."""
        mu = _project(streams, self.fn[...], self.norm_eps)
        pre = jax.nn.sigmoid(mu * self.scale[...][0] + self.base[...]) + self.hc_eps
        y = jnp.einsum("btn,btnd->btd", pre, streams.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return y.astype(streams.dtype)
