"""Sequential heads (vanilla / gated Markov, RNN; spec §4.7) and the confidence head (spec §4.8).

Everything here computes in f32: the heads' outputs become probabilities.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.layers.linear import take_rows
from dspark_jax.layers.params import declare


class Linear(nnx.Module):
    """x @ weight + bias with weight [in, out] (a torch Linear transposed); used by the small heads."""

    def __init__(self, n_in: int, n_out: int, axes: tuple, *, param_dtype: str, rngs: nnx.Rngs | None):
        self.weight = declare(rngs, (n_in, n_out), axes, param_dtype)
        self.bias = declare(rngs, (n_out,), axes[1:], param_dtype, init="zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.astype(jnp.float32) @ self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)


class MarkovHead(nnx.Module):
    """Bias beta_j in R^vocab from the previous slot's token (and, for gated / rnn, the slot's hidden state).

    markov_w1 (E1): [vocab, rank] table; markov_w2 (E2): [rank, vocab].
    """

    def __init__(self, vocab: int, hidden: int, rank: int, kind: str, *, param_dtype: str, rngs: nnx.Rngs | None):
        self.kind = kind
        self.rank = rank
        self.markov_w1 = declare(rngs, (vocab, rank), ("vocab", "rank"), param_dtype)
        self.markov_w2 = declare(rngs, (rank, vocab), ("rank", "vocab"), param_dtype)
        if kind == "gated":
            self.gate_proj = Linear(hidden + rank, rank, (None, "rank"), param_dtype=param_dtype, rngs=rngs)
        elif kind == "rnn":
            self.joint_proj = Linear(2 * rank + hidden, 3 * rank, (None, "rank"), param_dtype=param_dtype, rngs=rngs)

    def embed_prev(self, prev_tokens: jax.Array) -> jax.Array:
        """i32[...] -> f32[..., rank]: the E1 row of each previous token."""
        return take_rows(self.markov_w1[...], prev_tokens).astype(jnp.float32)

    def init_state(self, batch_shape: tuple[int, ...]) -> jax.Array:
        """The RNN state s_{-1} = 0 (f32[..., rank]); unused by the other kinds but carried uniformly."""
        return jnp.zeros((*batch_shape, self.rank), jnp.float32)

    def bias(self, hidden: jax.Array, prev_embed: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One slot: hidden f32[..., hidden], prev_embed f32[..., rank], state f32[..., rank] -> (beta, state)."""
        hidden = hidden.astype(jnp.float32)
        if self.kind == "vanilla":
            features = prev_embed
        elif self.kind == "gated":
            features = jax.nn.sigmoid(self.gate_proj(jnp.concatenate([hidden, prev_embed], axis=-1))) * prev_embed
        else:  # rnn: rows of joint_proj are ordered gate, candidate, output
            gate, candidate, out = jnp.split(self.joint_proj(jnp.concatenate([state, prev_embed, hidden], -1)), 3, -1)
            keep = jax.nn.sigmoid(gate)
            state = keep * state + (1.0 - keep) * jnp.tanh(candidate)
            features = jnp.tanh(out)
        return features @ self.markov_w2[...].astype(jnp.float32), state


class ConfidenceHead(nnx.Module):
    """Pre-sigmoid confidence w . [h_j ; E1[x_{j-1}]] + b (or w . h_j without Markov features)."""

    def __init__(self, n_in: int, *, param_dtype: str, rngs: nnx.Rngs | None):
        self.proj = Linear(n_in, 1, (None, None), param_dtype=param_dtype, rngs=rngs)

    def __call__(self, hidden: jax.Array, prev_embed: jax.Array | None) -> jax.Array:
        x = hidden.astype(jnp.float32)
        if prev_embed is not None:
            x = jnp.concatenate([x, prev_embed], axis=-1)
        return self.proj(x)[..., 0]
