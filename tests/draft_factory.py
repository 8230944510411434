"""Random DSpark / DFlash drafts for tests, built in memory against a loaded target (no checkpoint on disk).

`random_draft` gives an untrained draft (std-0.02 weights, like the reference's init): it almost never gets a
draft accepted. `bigram_draft` plants a token -> next-token table in a vanilla Markov head (rank = vocab, E1 = a
scaled identity, E2 = the table), so that blocks follow the target wherever its greedy path is bigram-predictable;
that gives mixed acceptance lengths without any training.
"""

from __future__ import annotations

import dataclasses
import itertools

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dspark_jax.configs import DraftConfig
from dspark_jax.loading import DraftHandle, Target
from dspark_jax.models import Draft


def draft_config(
    target: Target,
    *,
    block_size: int = 4,
    num_layers: int = 2,
    markov_rank: int = 0,
    markov_head_type: str = "vanilla",
    confidence: bool = False,
    confidence_with_markov: bool = True,
    target_layer_ids: tuple[int, ...] | None = None,
    mask_token_id: int | None = None,
) -> DraftConfig:
    t = target.config
    ids = target_layer_ids if target_layer_ids is not None else tuple(range(-1, t.num_hidden_layers - 1))[-3:]
    model = dataclasses.replace(t, num_hidden_layers=num_layers, tie_word_embeddings=False)
    return DraftConfig(
        model=model,
        block_size=block_size,
        num_target_layers=t.num_hidden_layers,
        target_layer_ids=tuple(ids),
        mask_token_id=t.vocab_size - 1 if mask_token_id is None else mask_token_id,
        markov_rank=markov_rank,
        markov_head_type=markov_head_type,
        enable_confidence_head=confidence,
        confidence_head_with_markov=confidence and confidence_with_markov and markov_rank > 0,
    )


def _bind_target(model: Draft, target: Target) -> None:
    """Copy the target's embedding and LM head into the draft's frozen slots (spec §5.3)."""
    ts = target.state
    model.embed_tokens[...] = ts["embed_tokens"][...]
    model.lm_head[...] = ts["embed_tokens"][...].T if target.config.tie_word_embeddings else ts["lm_head"][...]


def random_draft(target: Target, *, seed: int = 0, **config_kwargs) -> DraftHandle:
    """An untrained draft for `target` (keyword arguments: see `draft_config`)."""
    config = draft_config(target, **config_kwargs)
    model = Draft(config, rngs=nnx.Rngs(seed))
    _bind_target(model, target)
    graphdef, state = nnx.split(model)
    return DraftHandle(config, graphdef, state, f"<random draft seed {seed}>")


def bigram_draft(
    target: Target, table: dict[int, int], *, strength: float = 12.0, seed: int = 0, **config_kwargs
) -> DraftHandle:
    """A draft whose vanilla Markov head proposes `table[prev]` after token `prev` (random where absent).

    With rank = vocab the bias is beta(prev) = strength * onehot(table[prev]), which dominates the random base
    logits (|u| ~ 0.2). The confidence head (when enabled) gets an N(0, 1) weight per previous token on its E1
    part, so sigmoid(z_j) spreads over about (0.25, 0.75) and `threshold:0.5` cuts blocks at varying slots.
    """
    vocab = target.config.vocab_size
    config = draft_config(target, markov_rank=vocab, markov_head_type="vanilla", **config_kwargs)
    model = Draft(config, rngs=nnx.Rngs(seed))
    _bind_target(model, target)
    w2 = np.zeros((vocab, vocab), np.float32)
    for prev, nxt in table.items():
        w2[prev, nxt] = strength
    model.markov_head.markov_w1[...] = jnp.eye(vocab, dtype=model.markov_head.markov_w1[...].dtype)
    model.markov_head.markov_w2[...] = jnp.asarray(w2, model.markov_head.markov_w2[...].dtype)
    if config.confidence_head_with_markov:
        w = np.array(model.confidence_head.proj.weight[...], np.float32)  # [hidden + rank, 1]
        w[config.model.hidden_size :, 0] = np.random.default_rng(seed).normal(size=vocab)
        model.confidence_head.proj.weight[...] = jnp.asarray(w, model.confidence_head.proj.weight[...].dtype)
    graphdef, state = nnx.split(model)
    return DraftHandle(config, graphdef, state, f"<bigram draft seed {seed}>")


def bigram_table(sequences) -> dict[int, int]:
    """Most frequent successor of each token over `sequences` (lists of ids)."""
    counts: dict[int, dict[int, int]] = {}
    for seq in sequences:
        for a, b in itertools.pairwise(seq):
            counts.setdefault(a, {}).setdefault(b, 0)
            counts[a][b] += 1
    return {a: max(c, key=lambda k: (c[k], -k)) for a, c in counts.items()}


def linear_round_seconds(target, draft, prep) -> tuple[np.ndarray, float]:
    """A stand-in for `loop.round_seconds_table` (same signature) that does not depend on this machine's timings:
    a round at width w costs 1.5 + 0.5 (w - 1) (drafting costs half a pass), a round without the draft 1, so the
    scheduler's plan varies with the confidences."""
    widths = np.asarray(prep.spec.widths, np.float32)
    return 1.5 + 0.5 * (widths - 1), 1.0
