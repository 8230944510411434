"""Qwen3-MoE target: the Qwen3 stack (same attention, cache, taps and logits) with routed-expert FFNs."""

from __future__ import annotations

from flax import nnx
from jax.sharding import Mesh

from dspark_jax.configs import Qwen3MoeConfig
from dspark_jax.layers.mlp import MLP
from dspark_jax.layers.moe import MoE
from dspark_jax.layers.norms import RMSNorm
from dspark_jax.layers.params import declare
from dspark_jax.models.qwen3 import DecoderLayer, Qwen3


class MoeDecoderLayer(DecoderLayer):
    """Pre-norm block x + attn(norm(x)), then + ffn(norm(x)); ffn = MoE (softmax top-k experts) or a dense MLP
    (`mlp_only_layers`, `decoder_sparse_step`)."""

    def __init__(self, config: Qwen3MoeConfig, index: int, mesh: Mesh | None, *, rngs: nnx.Rngs | None):
        c = config
        kw = self._attention_block(c, rngs)
        if c.is_moe_layer(index):
            self.mlp = MoE(
                c.hidden_size,
                c.moe_intermediate_size,
                c.num_experts,
                c.num_experts_per_tok,
                score_func="softmax",
                norm_topk_prob=c.norm_topk_prob,
                impl=c.moe_impl,
                mesh=mesh,
                **kw,
            )
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, **kw)


class Qwen3Moe(Qwen3):
    """Qwen3MoeForCausalLM. Params as Qwen3 (embed_tokens, layers, norm, lm_head unless tied); a MoE layer's `mlp`
    holds gate [hidden, experts] and gate_proj / up_proj [experts, hidden, ffw], down_proj [experts, ffw, hidden].

    `mesh`: the mesh the params are placed on (experts split over its `expert` axis, heads and ffw over `model`);
    the MoE layers dispatch inside shard_map over it. None = one device. `__call__`, `embed`, `logits` and
    `init_cache` are Qwen3's: the decode loop drives both the same way.
    """

    def __init__(self, config: Qwen3MoeConfig, *, rngs: nnx.Rngs | None, mesh: Mesh | None = None):
        c = self.config = config
        self.embed_tokens = declare(rngs, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c.param_dtype)
        self.layers = nnx.List([MoeDecoderLayer(c, i, mesh, rngs=rngs) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        if not c.tie_word_embeddings:
            self.lm_head = declare(rngs, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c.param_dtype)
