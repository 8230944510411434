"""Gemma4 flavour of the DSpark draft layer (spec §4.5): sandwich norms, scale-1 attention with q/k/v norms,
optional key-equals-value attention, proportional RoPE (§4.3), gated MLP with the target's activation.

These pieces are what the draft needs, checked against transformers' Gemma4 text decoder layer in
tests/test_gemma4_draft.py; the Gemma4 target (models/gemma4_target.py) is built from them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.configs import DraftConfig
from dspark_jax.layers.attention import Attention, dense_context
from dspark_jax.layers.linear import project
from dspark_jax.layers.norms import rms_normalize
from dspark_jax.layers.params import Frozen, declare
from dspark_jax.layers.rope import apply_rope

# transformers ACT2FN names -> jax functions (gated MLP activations a Gemma4 text config may name).
ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


class LayerScalar(Frozen):
    """Gemma4's per-layer output multiplier: a checkpoint buffer (value 1.0, spec §4.5), never trained."""


def gemma4_rope_frequencies(
    head_dim: int, theta: float, rope_type: str, partial_rotary_factor: float, factor: float
) -> jax.Array:
    """f32[head_dim // 2] inverse frequencies of the target's full-attention RoPE (spec §4.3).

    'proportional': the first floor(partial_rotary_factor * head_dim / 2) pairs rotate at theta^(-2i/head_dim) / factor,
    the rest get frequency 0 (identity). Exponents use the full head_dim, not the rotated width. 'default': all pairs
    rotate, no factor (transformers ignores both fields for that type).
    """
    inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if rope_type == "default":
        return inv
    assert rope_type == "proportional", f"unsupported Gemma4 rope type {rope_type!r}"
    rotated = int(partial_rotary_factor * head_dim // 2)  # same rounding as transformers
    return jnp.where(jnp.arange(head_dim // 2) < rotated, inv / factor, 0.0)


def embed_scale(hidden_size: int, param_dtype: str) -> jax.Array:
    """Gemma's embedding multiplier sqrt(hidden), rounded to the table's dtype first (spec §4.2; 3072: 55.43 -> 55.5
    in bf16)."""
    return jnp.asarray(hidden_size**0.5, dtype=param_dtype)


def soft_cap(logits: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(logits / cap) (spec §4.5, §4.6); identity when the target has no final-logit soft-cap."""
    if cap is None:
        return logits
    return cap * jnp.tanh(logits / cap)


class Gemma4RMSNorm(nnx.Module):
    """Gemma4 RMSNorm: normalise and multiply by `weight` (not 1 + weight), both in f32, then cast.

    `with_scale=False` is the scale-free value norm.
    """

    def __init__(
        self,
        size: int,
        eps: float,
        *,
        dtype: str,
        param_dtype: str,
        rngs: nnx.Rngs | None,
        axis_name: str | None = "embed",
        with_scale: bool = True,
    ):
        self.eps = eps
        self.dtype = dtype
        self.with_scale = with_scale
        if with_scale:
            self.weight = declare(rngs, (size,), (axis_name,), param_dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        y = rms_normalize(x, self.eps)
        if self.with_scale:
            y = y * self.weight[...].astype(jnp.float32)
        return y.astype(self.dtype)


class Gemma4Attention(Attention):
    """Draft attention with Gemma4 conventions: per-head q/k norms (scaled) and v norm (scale-free), scale 1.

    With `k_eq_v` there is no v_proj: values are the raw key projections, value-normed (spec §4.5).
    `queries` and `output` are Attention's; the params, RoPE table and values differ.
    """

    def __init__(
        self,
        hidden: int,
        q_heads: int,
        kv_heads: int,
        head_dim: int,
        eps: float,
        rope: tuple,
        k_eq_v: bool,
        *,
        dtype: str,
        param_dtype: str,
        rngs: nnx.Rngs | None,
    ):
        self.dtype = dtype
        self.head_dim = head_dim
        self.k_eq_v = k_eq_v
        self.rope = rope  # (theta, rope_type, partial_rotary_factor, factor): static, the table is recomputed
        self.q_proj = declare(rngs, (hidden, q_heads, head_dim), ("embed", "q_heads", "head_dim"), param_dtype)
        self.k_proj = declare(rngs, (hidden, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        if not k_eq_v:
            self.v_proj = declare(rngs, (hidden, kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = declare(rngs, (q_heads, head_dim, hidden), ("q_heads", "head_dim", "embed"), param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, axis_name="head_dim")
        self.q_norm = Gemma4RMSNorm(head_dim, eps, **kw)
        self.k_norm = Gemma4RMSNorm(head_dim, eps, **kw)
        self.v_norm = Gemma4RMSNorm(head_dim, eps, **kw, with_scale=False)

    @property
    def inv_freq(self) -> jax.Array:
        return gemma4_rope_frequencies(self.head_dim, *self.rope)

    def keys_values(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [batch, t, hidden] -> roped, normed k and normed v, each [batch, t, kv_heads, head_dim]."""
        x = x.astype(self.dtype)
        k = project("btd,dkh->btkh", x, self.k_proj[...])
        v = k if self.k_eq_v else project("btd,dkh->btkh", x, self.v_proj[...])
        return apply_rope(self.k_norm(k), positions, self.inv_freq), self.v_norm(v)


class Gemma4MLP(nnx.Module):
    """Gated MLP: down(act(gate x) * up x) with the target's configured activation."""

    def __init__(self, hidden: int, ffw: int, activation: str, *, dtype: str, param_dtype: str, rngs: nnx.Rngs | None):
        self.dtype = dtype
        self.activation = activation
        self.gate_proj = declare(rngs, (hidden, ffw), ("embed", "ffw"), param_dtype)
        self.up_proj = declare(rngs, (hidden, ffw), ("embed", "ffw"), param_dtype)
        self.down_proj = declare(rngs, (ffw, hidden), ("ffw", "embed"), param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, seq, hidden] -> [batch, seq, hidden]."""
        x = x.astype(self.dtype)
        gate = project("btd,df->btf", x, self.gate_proj[...])
        up = project("btd,df->btf", x, self.up_proj[...])
        return project("btf,fd->btd", ACTIVATIONS[self.activation](gate) * up, self.down_proj[...])


class Gemma4DecoderLayer(nnx.Module):
    """One Gemma4-flavour draft layer (spec §4.5). Params are named as in the checkpoint (spec §5.2)."""

    def __init__(self, config: DraftConfig, *, rngs: nnx.Rngs | None):
        c, g = config.model, config.gemma4
        assert g is not None, "Gemma4DecoderLayer needs a DraftConfig with gemma4 geometry"
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.dtype = c.dtype
        self.input_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.self_attn = Gemma4Attention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.rms_norm_eps,
            (c.rope_theta, g.rope_type, g.partial_rotary_factor, g.rope_factor),
            g.attention_k_eq_v,
            **kw,
        )
        self.post_attention_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.pre_feedforward_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.mlp = Gemma4MLP(c.hidden_size, c.intermediate_size, g.hidden_activation, **kw)
        self.post_feedforward_layernorm = Gemma4RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.layer_scalar = declare(rngs, (1,), (None,), c.param_dtype, init="ones", kind=LayerScalar)

    def draft_step(
        self, z: jax.Array, positions: jax.Array, ctx_k: jax.Array, ctx_v: jax.Array, mask: jax.Array
    ) -> jax.Array:
        """One layer over block rows with injected context keys/values (spec §4.4 dataflow, §4.5 conventions).

        z: [batch, t, hidden] block rows; positions i32[batch, t]; ctx_k, ctx_v: [batch, s, kv_heads, head_dim]
        (roped / normed by `self_attn.keys_values`); mask: bool[batch, t, s + t]. Returns [batch, t, hidden].
        """
        s = ctx_k.shape[1]
        return self.block_step(z, positions, dense_context(ctx_k, ctx_v, mask[:, :, :s]), mask[:, :, s:])

    def block_step(self, z: jax.Array, positions: jax.Array, context, own_mask: jax.Array) -> jax.Array:
        """`draft_step` with the context keys as a function (qg, scale) -> Partial (layers.attention:
        dense_context / cached_context) and own_mask: bool[batch, t, t] over the block's own keys."""
        attn = self.self_attn
        a = attn.block(self.input_layernorm(z), positions, context, own_mask, 1.0)  # scale 1
        z = z + self.post_attention_layernorm(a)
        z = z + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(z)))
        return z * self.layer_scalar[...].astype(self.dtype)
