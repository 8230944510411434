"""Qwen3 target: tokens -> final hidden states, tapped layer outputs and the updated KV cache; logits on demand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.cache import KVCache
from dspark_jax.configs import Qwen3Config
from dspark_jax.layers.attention import Attention
from dspark_jax.layers.linear import compact, dense, out_major, take_rows
from dspark_jax.layers.mlp import MLP
from dspark_jax.layers.norms import RMSNorm
from dspark_jax.layers.params import declare


class DecoderLayer(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). Also the draft's layer (spec §4.4)."""

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs | None):
        kw = self._attention_block(config, rngs)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, **kw)

    def _attention_block(self, c, rngs: nnx.Rngs | None) -> dict:
        """Build the norms and the attention (shared with the MoE layer); returns the keyword arguments of the
        layer's modules."""
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.self_attn = Attention(
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.rms_norm_eps,
            c.rope_theta,
            c.rope_scaling,
            **kw,
        )
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        return kw

    def __call__(self, x, positions, kv=None, layer: int = 0, mask=None):
        a, kv = self.self_attn(self.input_layernorm(x), positions, kv, layer, mask=mask)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Qwen3(nnx.Module):
    """Qwen3ForCausalLM. Params: embed_tokens [vocab, hidden], layers, norm, lm_head [hidden, vocab] (untied)."""

    out_major = False  # True once the head is stored [vocab, hidden] (the CPU decode copy, layers/linear.py)

    def __init__(self, config: Qwen3Config, *, rngs: nnx.Rngs | None):
        c = self.config = config
        self.embed_tokens = declare(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype)
        self.layers = nnx.List([DecoderLayer(c, rngs=rngs) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        if not c.tie_word_embeddings:
            self.lm_head = declare(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype)

    def to_out_major(self) -> None:
        """Store the head out-major and `compact`, in place (for a decode copy; the layers convert themselves). A
        tied head is the embedding, out-major already: compacting it also serves the lookups (exact either way)."""
        if self.config.tie_word_embeddings:
            self.embed_tokens.value = compact(self.embed_tokens[...])
        else:
            self.lm_head.value = compact(out_major(self.lm_head[...], 1))
        self.out_major = True

    def embed(self, tokens: jax.Array) -> jax.Array:
        """i32[batch, t] -> [batch, t, hidden] in the compute dtype."""
        return take_rows(self.embed_tokens[...], tokens).astype(self.config.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [..., hidden] -> f32[..., vocab]."""
        c = self.config
        x = hidden.astype(c.dtype)
        if c.tie_word_embeddings:
            # The embedding is the head, out-major as it stands: no `.T` (inside nested decode loops XLA:CPU copied a
            # transposed [hidden, vocab] table every round, ~8 MB a round in the scheduler's inner loops).
            return dense(x, self.embed_tokens[...], True, preferred_element_type=jnp.float32)
        return dense(x, self.lm_head[...], self.out_major, preferred_element_type=jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: KVCache | None = None,
        tap_layer_ids: tuple[int, ...] = (),
        mask: jax.Array | None = None,
    ):
        """Run the stack over a chunk.

        Args:
          tokens: i32[batch, t]; positions: i32[batch, t], consecutive per row.
          cache: optional KVCache; the chunk's k/v are written at positions[:, 0] and queries see every earlier
            slot. Its `lengths` are left to the caller (rollback and commit are decoding's business).
          tap_layer_ids: decoder layers whose raw (pre-final-norm) outputs to return; -1 = the embedding output.
          mask: optional bool[batch, t, cache_len] visibility replacing the causal rule (tree verification,
            `cache.tree_mask`); positions may then repeat.
        Returns:
          hidden: [batch, t, hidden] after the final norm; taps: [batch, t, taps * hidden] in tap order (None when
          no taps); the cache with this chunk written (None without a cache).
        """
        x = self.embed(tokens)
        outputs = {-1: x}
        kv = None if cache is None else (cache.k, cache.v)
        wanted = set(tap_layer_ids)
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, positions, kv, i) if mask is None else layer(x, positions, kv, i, mask=mask)
            if i in wanted:
                outputs[i] = x
        taps = jnp.concatenate([outputs[i] for i in tap_layer_ids], axis=-1) if tap_layer_ids else None
        new_cache = None if cache is None else KVCache(kv[0], kv[1], cache.lengths)
        return self.norm(x), taps, new_cache

    def init_cache(self, batch: int, cache_len: int) -> KVCache:
        c = self.config
        return KVCache.zeros(c.num_hidden_layers, batch, cache_len, c.num_key_value_heads, c.head_dim, c.dtype)
