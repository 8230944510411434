"""Tests for models/heads.py: the vanilla, gated and RNN sequential heads and the confidence head against the
formulas of spec §4.7-§4.8, written out in numpy (the golden tests in test_draft.py cover vanilla and RNN end to
end; the gated head has no goldens)."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx

from dspark_jax.models.heads import ConfidenceHead, MarkovHead

VOCAB, HIDDEN, RANK = 32, 12, 6


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def make_head(kind: str) -> tuple[MarkovHead, dict]:
    """A head whose params are redrawn at unit scale (so every term matters), plus the numpy copies."""
    head = MarkovHead(VOCAB, HIDDEN, RANK, kind, param_dtype="float32", rngs=nnx.Rngs(0))
    rng = np.random.default_rng({"vanilla": 0, "gated": 1, "rnn": 2}[kind])
    flat = list(nnx.state(head).flat_state())
    params = {".".join(map(str, path)): rng.normal(size=var.get_value().shape).astype(np.float32) for path, var in flat}
    nnx.update(
        head,
        nnx.State.from_flat_path(
            [(path, var.replace(jnp.asarray(params[".".join(map(str, path))]))) for path, var in flat]
        ),
    )
    return head, params


def inputs(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n, HIDDEN)).astype(np.float32),
        rng.integers(0, VOCAB, size=n),
        rng.normal(size=(n, RANK)).astype(np.float32),
    )


def test_vanilla_bias_is_e2_of_e1_row():
    head, p = make_head("vanilla")
    h, prev, state = inputs(5)
    beta, new_state = head.bias(jnp.asarray(h), head.embed_prev(jnp.asarray(prev)), jnp.asarray(state))
    want = p["markov_w1"][prev] @ p["markov_w2"]  # E1[x_{j-1}] mapped to vocab by E2, no bias
    assert rel_err(beta, want) <= 1e-6
    np.testing.assert_array_equal(np.asarray(new_state), state)  # no state for the vanilla head
    # Depends on the previous token only.
    beta2, _ = head.bias(jnp.asarray(h[::-1]), head.embed_prev(jnp.asarray(prev)), jnp.asarray(state))
    np.testing.assert_array_equal(np.asarray(beta), np.asarray(beta2))


def test_gated_bias_depends_on_hidden_and_previous_token():
    head, p = make_head("gated")
    h, prev, state = inputs(4)
    e1 = p["markov_w1"][prev]
    gate = sigmoid(np.concatenate([h, e1], -1) @ p["gate_proj.weight"] + p["gate_proj.bias"])
    beta, _ = head.bias(jnp.asarray(h), head.embed_prev(jnp.asarray(prev)), jnp.asarray(state))
    assert rel_err(beta, (gate * e1) @ p["markov_w2"]) <= 1e-6
    # Same previous token, other hidden state -> other bias; same hidden state, other token -> other bias.
    same_prev = np.array([prev[0], prev[0]])
    b_h, _ = head.bias(jnp.asarray(h[:2]), head.embed_prev(jnp.asarray(same_prev)), jnp.asarray(state[:2]))
    assert np.abs(np.asarray(b_h[0] - b_h[1])).max() > 1e-3
    other_prev = np.array([prev[0], (prev[0] + 1) % VOCAB])
    b_x, _ = head.bias(jnp.asarray(h[[0, 0]]), head.embed_prev(jnp.asarray(other_prev)), jnp.asarray(state[:2]))
    assert np.abs(np.asarray(b_x[0] - b_x[1])).max() > 1e-3


def test_rnn_recurrence_and_row_order():
    """v = [s; E1[x]; h] -> rows gate, candidate, output; s' = sig(g) s + (1 - sig(g)) tanh(c); beta = E2 tanh(o)."""
    head, p = make_head("rnn")
    h, prev, _ = inputs(3, seed=1)
    state = np.zeros((1, RANK), np.float32)
    jstate = head.init_state((1,))
    np.testing.assert_array_equal(np.asarray(jstate), state)
    for j in range(3):  # three slots of one block, left to right
        e1 = p["markov_w1"][prev[j : j + 1]]
        x = np.concatenate([state, e1, h[j : j + 1]], -1) @ p["joint_proj.weight"] + p["joint_proj.bias"]
        g, c, o = np.split(x, 3, -1)
        state = sigmoid(g) * state + (1 - sigmoid(g)) * np.tanh(c)
        want = np.tanh(o) @ p["markov_w2"]
        beta, jstate = head.bias(jnp.asarray(h[j : j + 1]), head.embed_prev(jnp.asarray(prev[j : j + 1])), jstate)
        assert rel_err(beta, want) <= 1e-5 and rel_err(jstate, state) <= 1e-5


@pytest.mark.parametrize("with_markov", [True, False])
def test_confidence_logit(with_markov):
    n_in = HIDDEN + (RANK if with_markov else 0)
    head = ConfidenceHead(n_in, param_dtype="float32", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(3)
    w, b = rng.normal(size=(n_in, 1)).astype(np.float32), rng.normal(size=(1,)).astype(np.float32)
    head.proj.weight[...] = jnp.asarray(w)
    head.proj.bias[...] = jnp.asarray(b)
    h, _, e = inputs(4)
    got = head(jnp.asarray(h), jnp.asarray(e) if with_markov else None)
    x = np.concatenate([h, e], -1) if with_markov else h  # first H columns multiply h_j, last r the E1 row
    assert got.shape == (4,) and rel_err(got, (x @ w)[:, 0] + b[0]) <= 1e-6
    assert got.dtype == jnp.float32
