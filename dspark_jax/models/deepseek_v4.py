"""DeepSeek-V4 target (V4 §2): tokens -> final hidden states, tapped block outputs and the updated decoding state;
logits on demand. Same protocol as models/qwen3.py, with a `DeepseekV4Cache` (cache.py) as the cache.

Block l:  X <- mHC_attn(X, Attn_l . RMSNorm_attn);  X <- mHC_ffn(X, MoE_l . RMSNorm_ffn)   on 4 residual streams.
Taps (V4 §4.3) are block outputs averaged over the streams, before hc_head and the final norm.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.cache import DeepseekV4Cache
from dspark_jax.configs import DeepseekV4Config
from dspark_jax.layers.linear import dense, take_rows
from dspark_jax.layers.mhc import HyperConnection, HyperHead
from dspark_jax.layers.moe import MoE
from dspark_jax.layers.params import declare
from dspark_jax.layers.v4_attention import AttentionShape, V4Attention, V4Norm, v4_inv_freq

# transformers adds this to the sum of the k routing weights before dividing (V4 §5 Q10).
ROUTER_EPS = 1e-20


def attention_shape(c: DeepseekV4Config, layer: int) -> AttentionShape:
    ratio = c.compress_ratios[layer]
    # Ratio-0 layers use the main RoPE (no YaRN); ratio>0 layers the compress one for everything (V4 §2.2).
    inv_freq = (
        v4_inv_freq(c.qk_rope_head_dim, c.rope_theta)
        if ratio == 0
        else v4_inv_freq(c.qk_rope_head_dim, c.compress_rope_theta, c.rope_scaling)
    )
    return AttentionShape(
        hidden=c.hidden_size,
        heads=c.num_attention_heads,
        head_dim=c.head_dim,
        rope_dim=c.qk_rope_head_dim,
        q_lora_rank=c.q_lora_rank,
        o_groups=c.o_groups,
        o_lora_rank=c.o_lora_rank,
        window=c.sliding_window,
        ratio=ratio,
        index_heads=c.index_n_heads,
        index_head_dim=c.index_head_dim,
        index_topk=c.index_topk,
        eps=c.rms_norm_eps,
        inv_freq=inv_freq,
    )


class Block(nnx.Module):
    """One V4 block: attention and MoE sub-layers, each wrapped in its own mHC site (V4 §2.1)."""

    def __init__(self, config: DeepseekV4Config, layer: int, *, rngs: nnx.Rngs | None, mesh=None):
        c = config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        hc = (c.hidden_size, c.hc_mult, c.hc_sinkhorn_iters, c.hc_eps, c.rms_norm_eps)
        self.hc_attn = HyperConnection(*hc, rngs=rngs)
        self.attn_norm = V4Norm(c.hidden_size, c.rms_norm_eps, axis_name="embed", **kw)
        self.attn = V4Attention(attention_shape(c, layer), **kw)
        self.hc_ffn = HyperConnection(*hc, rngs=rngs)
        self.ffn_norm = V4Norm(c.hidden_size, c.rms_norm_eps, axis_name="embed", **kw)
        hashed = c.is_hash_layer(layer)
        self.ffn = MoE(
            c.hidden_size,
            c.moe_intermediate_size,
            c.n_routed_experts,
            c.num_experts_per_tok,
            score_func=c.scoring_func,
            norm_topk_prob=True,  # transformers always renormalises the k weights (V4 §1.2)
            routed_scaling_factor=c.routed_scaling_factor,
            norm_eps=ROUTER_EPS,
            use_bias=not hashed,
            hash_vocab=c.vocab_size if hashed else None,
            swiglu_limit=c.swiglu_limit,
            shared_ffw=c.moe_intermediate_size,  # transformers: always one shared expert of width I
            impl=c.moe_impl,
            mesh=mesh,
            **kw,
        )

    def __call__(self, streams, tokens, positions, cache):
        """streams [b, t, n_hc, hidden]; tokens / positions i32[b, t] -> (streams, layer cache)."""
        y, post, comb = self.hc_attn.collapse(streams)
        a, cache = self.attn(self.attn_norm(y), positions, cache)
        streams = HyperConnection.expand(streams, a, post, comb)
        y, post, comb = self.hc_ffn.collapse(streams)
        f = self.ffn(self.ffn_norm(y), tokens)
        return HyperConnection.expand(streams, f, post, comb), cache


class DeepseekV4(nnx.Module):
    """DeepseekV4ForCausalLM. Params: embed [vocab, hidden], layers, hc_head, norm, head [hidden, vocab].

    `mesh` (static, optional) is where the params live; the MoE then runs its experts in shard_map over `expert`.
    """

    def __init__(self, config: DeepseekV4Config, *, rngs: nnx.Rngs | None, mesh=None):
        c = self.config = config
        self.embed = declare(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype)
        self.layers = nnx.List([Block(c, i, rngs=rngs, mesh=mesh) for i in range(c.num_hidden_layers)])
        self.hc_head = HyperHead(c.hidden_size, c.hc_mult, c.hc_eps, c.rms_norm_eps, rngs=rngs)
        self.norm = V4Norm(c.hidden_size, c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        if not c.tie_word_embeddings:
            self.head = declare(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden [..., hidden] -> f32[..., vocab]."""
        c = self.config
        tied = c.tie_word_embeddings  # the embedding, out-major as it stands (no `.T`: see Gemma4.logits)
        w = self.embed[...] if tied else self.head[...]
        return dense(hidden.astype(c.dtype), w, tied, preferred_element_type=jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        cache: DeepseekV4Cache | None = None,
        tap_layer_ids: tuple[int, ...] = (),
    ):
        """Run the stack over a chunk.

        Args:
          tokens: i32[batch, t] (hash layers route by them); positions: i32[batch, t], consecutive per row.
          cache: optional DeepseekV4Cache; the chunk is written at positions[:, 0] and sees every earlier position
            below it. Its `lengths` are left to the caller (rollback and commit are decoding's business). Without a
            cache the chunk is the whole sequence (positions must start at 0).
          tap_layer_ids: blocks whose outputs, averaged over the hc streams, to return (-1 = the embedding).
        Returns:
          hidden: [batch, t, hidden] = RMSNorm_final(hc_head(X)); taps [batch, t, taps * hidden] in tap order (None
          without taps); the cache with this chunk written (None without a cache).
        """
        c = self.config
        b, t = tokens.shape
        layer_caches = (self.init_cache(b, t) if cache is None else cache).layers
        e = take_rows(self.embed[...], tokens).astype(c.dtype)
        streams = jnp.broadcast_to(e[:, :, None, :], (b, t, c.hc_mult, c.hidden_size))
        outputs = {-1: e}
        wanted = set(tap_layer_ids)
        new_layers = []
        for i, layer in enumerate(self.layers):
            streams, lc = layer(streams, tokens, positions, layer_caches[i])
            new_layers.append(lc)
            if i in wanted:
                outputs[i] = jnp.mean(streams.astype(jnp.float32), axis=2).astype(c.dtype)
        taps = jnp.concatenate([outputs[i] for i in tap_layer_ids], axis=-1) if tap_layer_ids else None
        hidden = self.norm(self.hc_head(streams))
        new_cache = None if cache is None else DeepseekV4Cache(tuple(new_layers), cache.lengths)
        return hidden, taps, new_cache

    def init_cache(self, batch: int, cache_len: int) -> DeepseekV4Cache:
        layers = tuple(layer.attn.init_cache(batch, cache_len) for layer in self.layers)
        return DeepseekV4Cache(layers, jnp.zeros((batch,), jnp.int32))
