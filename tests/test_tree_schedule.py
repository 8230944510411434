"""verify="scheduler" over trees (trees §6): the pooled greedy's order and stop rule on hand-made scores and cost
tables, the token cost table built from the per-width round times, and the draft gate's Θ."""

import jax.numpy as jnp
import numpy as np

from dspark_jax.decoding.tree_schedule import expected_throughput, forced_nodes, schedule_nodes, token_seconds


def run(s, eligible, live, seconds):
    score = jnp.log(jnp.asarray(s, jnp.float32))  # log 0 = -inf: an invalid node
    out = schedule_nodes(score, jnp.asarray(eligible), jnp.asarray(live), jnp.asarray(seconds, jnp.float32))
    return np.asarray(out)


def test_pooled_order_and_first_non_improvement_stop():
    """Pool (s desc, row, rank): 0.9 (row 0), 0.8, 0.6 (row 1), 0.5 (row 0), 0.2 (row 0). Θ = E / seconds[N_tok]:
    2/1, 2.9/1, 3.7/1, 4.3/1.1 = 3.91, then 4.8/1.5 = 3.2 does not improve: stop there, although the next candidate
    (5.0/1.5 = 3.33) would improve on 3.2 (the walk never resumes)."""
    s = [[0.9, 0.5, 0.2], [0.8, 0.6, 0.0]]
    seconds = [1, 1, 1, 1, 1, 1.1, 1.5, 1.5, 1.5]
    got = run(s, np.ones((2, 3), bool), [True, True], seconds)
    np.testing.assert_array_equal(got, [[True, False, False], [True, True, False]])
    # A flat table takes every node with s > 0 (each adds expected tokens at no cost), never the invalid one.
    got = run(s, np.ones((2, 3), bool), [True, True], np.ones(9))
    np.testing.assert_array_equal(got, [[True, True, True], [True, True, False]])
    # Nothing pays: the first candidate already lowers Θ (2 / 1 -> 2.9 / 1.5).
    got = run(s, np.ones((2, 3), bool), [True, True], [1, 1, 1, 1.5, 2, 2.5, 3, 3.5, 4])
    assert not got.any()


def test_ties_rows_and_eligibility():
    seconds = [1, 1, 1, 1, 2, 2, 2, 2, 2]  # room for one node: 3 tokens cost 1, 4 cost 2
    # Equal s: the lower row goes first.
    np.testing.assert_array_equal(run([[0.5], [0.5]], [[True], [True]], [True, True], seconds[:5]), [[True], [False]])
    # Done rows and ineligible nodes (out of room, failed threshold) are never taken, whatever their s.
    got = run([[0.9, 0.8], [0.3, 0.2]], [[True, True], [False, True]], [False, True], seconds)
    assert not got[0].any() and not got[1, 0]
    # Equal s within a row: score rank decides, so a parent (earlier rank) always precedes its child.
    got = run([[0.5, 0.5, 0.5]], [[True] * 3], [True], [1, 1, 1, 2, 3])
    np.testing.assert_array_equal(got, [[True, False, False]])


def test_token_table_and_gate_throughput():
    """round_seconds[n] interpolates the per-width round times at n = live rows * width."""
    table = np.asarray(token_seconds(jnp.asarray([1, 2, 4]), jnp.asarray([1.0, 2.0, 4.0]), jnp.int32(2), 10))
    np.testing.assert_allclose(table, [1, 1, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4])
    score = jnp.log(jnp.asarray([[0.5, 0.25], [0.9, 0.1]]))
    verified = jnp.asarray([[True, True], [True, False]])
    theta, cost = expected_throughput(score, verified, jnp.asarray([True, True]), jnp.asarray(table, jnp.float32))
    np.testing.assert_allclose(float(theta), (2 + 0.75 + 0.9) / table[5], rtol=1e-6)
    assert float(cost) == table[5]  # 2 anchors + 3 nodes
    # Timing a width: the first w - 1 eligible nodes in score-rank order.
    eligible = jnp.asarray([[True, False, True, True], [True, True, True, True]])
    np.testing.assert_array_equal(
        np.asarray(forced_nodes(eligible, jnp.int32(3))), [[True, False, True, False], [True, True, False, False]]
    )
