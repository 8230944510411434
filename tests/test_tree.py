"""Tree decoding (trees §8.1-§8.3): builder invariants, the masked tree pass against chain passes, K/V compaction,
and greedy tree decoding through `generate(tree=...)` equal to plain greedy decoding.

One tiny random target (vocab 128) and bigram drafts that follow its greedy path where it is bigram-predictable,
so trees accept varied paths; compilation dominates, so runs share prompts, MAX_NEW and compiled loops.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_qwen3_hf
from draft_factory import bigram_draft, bigram_table, random_draft

import dspark_jax as dj
from dspark_jax.cache import compact_path, tree_mask
from dspark_jax.configs import SamplingConfig
from dspark_jax.decoding.propose import sample_slots
from dspark_jax.decoding.tree import TreeConfig, build_tree
from dspark_jax.decoding.verify import target_pass
from dspark_jax.errors import UsageError
from dspark_jax.sampling import SamplingParams

MAX_NEW = 40
PROMPT_LENS = (1, 16, 7, 12, 5, 9)
BLOCK = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, _ = tiny_qwen3_hf(tmp_path_factory.mktemp("tree_target"), vocab=128, hidden=64, layers=2, seed=3)
    return dj.load_target(str(folder), dtype="float32")


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 127, n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def plain(tiny, prompts):
    return dj.generate(tiny, None, prompts, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def drafts(tiny, prompts, plain):
    table = bigram_table([p + t for p, t in zip(prompts, plain.tokens)])
    return {
        "markov": bigram_draft(tiny, table, block_size=BLOCK, seed=1, confidence=True),
        "rnn": random_draft(tiny, block_size=BLOCK, markov_rank=8, markov_head_type="rnn", seed=2, confidence=True),
        "dflash": random_draft(tiny, block_size=BLOCK, seed=3),
    }


# ---------------------------------------------------------------------------------------------------- builder


def built(draft, tree, sampling=SamplingConfig(), batch=3, seed=0, room=None):
    module = draft.module()
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(batch, BLOCK, module.config.model.hidden_size)), jnp.float32)
    anchors = jnp.asarray(rng.integers(0, 128, batch), jnp.int32)
    params = SamplingParams.of([sampling] * batch)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(batch))
    room = jnp.full((batch,), BLOCK if room is None else room, jnp.int32)
    fn = jax.jit(lambda h, a, k, r: build_tree(module, h, a, params, k, tree, r))
    return fn(hidden, anchors, keys, room), module, hidden, anchors


def check_invariants(t, branch):
    parents, depth, rank = (np.asarray(x) for x in (t.parents, t.depth, t.rank))
    nv = np.asarray(t.num_verify)
    score = np.asarray(t.score)
    for b in range(parents.shape[0]):
        n = nv[b]
        for j in range(n):
            p = parents[b, j]
            assert p < j
            assert depth[b, j] == (0 if p < 0 else depth[b, p] + 1)
            if rank[b, j] > 0:  # siblings contiguous, in rank order, earlier ones present
                assert j > 0 and parents[b, j - 1] == p and rank[b, j - 1] == rank[b, j] - 1
            assert np.isfinite(score[b, j])
        assert list(depth[b, :n]) == sorted(depth[b, :n])  # depth-major
        assert (rank[b] < branch).all()


@pytest.mark.parametrize(
    "variant,mode", [("markov", "topk"), ("markov", "swor"), ("markov", "iid"), ("rnn", "swor"), ("dflash", "topk")]
)
def test_builder_invariants(drafts, variant, mode):
    draft = drafts[variant]
    sampling = SamplingConfig() if mode == "topk" else SamplingConfig(1.0)
    t, module, hidden, anchors = built(draft, TreeConfig(15, 4, 3, mode), sampling)
    check_invariants(t, 4)
    assert (np.asarray(t.num_verify) == 15).all()
    # Node logits = u_d + beta(x_parent): a node's token is drawable under its parent's law (its row puts mass on it).
    rows = np.asarray(t.rows())
    toks = np.asarray(t.tokens)
    assert (np.take_along_axis(rows, toks[:, :, None], axis=2)[..., 0] > 0).all()
    np.testing.assert_allclose(rows.sum(-1), 1.0, atol=1e-5)
    if mode == "swor":  # rows vanish on earlier siblings' tokens
        parents = np.asarray(t.parents)
        for b in range(toks.shape[0]):
            for j in range(15):
                for i in range(j):
                    if parents[b, i] == parents[b, j]:
                        assert rows[b, j, toks[b, i]] == 0
    if mode == "topk":  # the chain's argmax is every rank-0 child of the anchor; logits recomputed by hand
        want = sample_slots(module, hidden, anchors, SamplingConfig(), None)
        np.testing.assert_array_equal(np.asarray(t.tokens[:, 0]), np.asarray(want.tokens[:, 0]))


def test_chain_shaped_tree_and_room(drafts):
    t, module, hidden, anchors = built(drafts["markov"], TreeConfig(BLOCK, 1, 1, "topk"))
    np.testing.assert_array_equal(np.asarray(t.parents[0]), np.arange(BLOCK) - 1)
    chain = sample_slots(module, hidden, anchors, SamplingConfig(), None)
    np.testing.assert_array_equal(np.asarray(t.tokens), np.asarray(chain.tokens))
    t2, *_ = built(drafts["markov"], TreeConfig(15, 4, 4, "topk"), room=2)
    assert (np.asarray(t2.depth)[np.arange(15)[None] < np.asarray(t2.num_verify)[:, None]] < 2).all()
    assert (np.asarray(t2.num_verify) < 15).all()


def test_invalid_nodes_are_never_verified(drafts):
    """top_k = 1: one token per node has mass, so only a chain of B nodes is valid (the rest score -inf)."""
    t, *_ = built(drafts["markov"], TreeConfig(15, 4, 4, "swor"), SamplingConfig(1.0, 1.0, 1))
    check_invariants(t, 4)
    nv = np.asarray(t.num_verify)
    assert (nv == BLOCK).all()
    assert np.isinf(np.asarray(t.score))[np.arange(15)[None] >= nv[:, None]].all()


def test_tree_config_errors():
    for bad in [dict(nodes=0), dict(beam=5, branch=4), dict(mode="x"), dict(mode="swor", score="prob")]:
        with pytest.raises(UsageError):
            TreeConfig(**bad)
    with pytest.raises(UsageError):
        TreeConfig.parse("a,b")
    assert TreeConfig.parse("15,4,4") == TreeConfig(15, 4, 4)


# ------------------------------------------------------------------------------------- tree pass, compaction


def test_tree_pass_equals_chain_passes_and_compaction(tiny, drafts):
    target = tiny.module()
    prompt = jnp.asarray([[5, 17, 99, 3, 42, 7, 8]], jnp.int32)
    n_prompt = prompt.shape[1]
    cache_len = 64
    cache = target.init_cache(1, cache_len)
    positions = jnp.arange(n_prompt, dtype=jnp.int32)[None]
    _, _, cache = target(prompt[:, :-1], positions[:, :-1], cache)  # prefix [0, P); the anchor is the last token
    anchor_pos = jnp.asarray([n_prompt - 1], jnp.int32)
    t, *_ = built(drafts["markov"], TreeConfig(15, 4, 4, "topk"), batch=1)
    toks = jnp.concatenate([prompt[:, -1:], t.tokens], axis=1)
    pos = anchor_pos[:, None] + jnp.concatenate([jnp.zeros((1, 1), jnp.int32), 1 + t.depth], axis=1)
    mask = tree_mask(t.parents, anchor_pos, cache_len, BLOCK)
    logits, _, tree_cache = target_pass(target, cache, toks, anchor_pos, (), pos, mask)
    parents = np.asarray(t.parents[0])

    def root_path(j):
        path = []
        while j >= 0:
            path.append(j)
            j = parents[j]
        return path[::-1]

    for j in range(15):
        seq = jnp.concatenate([prompt, t.tokens[:, root_path(j)]], axis=1)
        hidden, _, _ = target(seq, jnp.arange(seq.shape[1], dtype=jnp.int32)[None])
        want = target.logits(hidden[:, -1])
        np.testing.assert_allclose(np.asarray(logits[0, 1 + j]), np.asarray(want[0]), rtol=1e-4, atol=1e-4)
    # Compaction: accept the root path of the deepest node; slots [0, P + A] then equal a chain pass's cache.
    deepest = int(np.argmax(np.asarray(t.depth[0])))
    path = root_path(deepest)
    acc = jnp.asarray([path + [-1] * (BLOCK - len(path))], jnp.int32)
    compacted = compact_path(tree_cache, acc, anchor_pos)
    seq = jnp.concatenate([prompt, t.tokens[:, path]], axis=1)
    chain_cache = target.init_cache(1, cache_len)
    _, _, chain_cache = target(seq, jnp.arange(seq.shape[1], dtype=jnp.int32)[None], chain_cache)
    upto = n_prompt + len(path)  # slots [0, P + A]
    for got, want in ((compacted.k, chain_cache.k), (compacted.v, chain_cache.v)):
        np.testing.assert_allclose(np.asarray(got[:, :, :, :upto]), np.asarray(want[:, :, :, :upto]), atol=1e-4)


# ----------------------------------------------------------------------------------------- greedy decoding


def test_one_child_tree_reproduces_the_chain(tiny, drafts, prompts, plain):
    chain = dj.generate(tiny, drafts["markov"], prompts, max_new_tokens=MAX_NEW)
    tree = dj.generate(tiny, drafts["markov"], prompts, max_new_tokens=MAX_NEW, tree=TreeConfig(BLOCK, 1, 1))
    assert tree.tokens == chain.tokens == plain.tokens
    assert tree.acceptance_lengths == chain.acceptance_lengths
    assert tree.tau == chain.tau
    assert all(all(r == 0 for row in p for r in row) for p in tree.accepted_ranks)


@pytest.mark.parametrize("shape", [(7, 2, 2), (15, 4, 4), pytest.param((31, 4, 4), marks=pytest.mark.slow)])
def test_greedy_tree_equals_plain(tiny, drafts, prompts, plain, shape):
    res = dj.generate(tiny, drafts["markov"], prompts, max_new_tokens=MAX_NEW, tree=TreeConfig(*shape))
    assert res.tokens == plain.tokens
    assert len(res.nodes_verified) == len(prompts) == len(res.accepted_ranks)
    for nv, acc, ranks in zip(res.nodes_verified, res.acceptance_lengths, res.accepted_ranks):
        assert len(nv) == len(acc) == len(ranks)
        assert all(len(r) < a for r, a in zip(ranks, acc))  # accepted nodes + the extra token
    assert all(all(n == shape[0] for n in row) for row in res.nodes_verified[1:])  # room never binds here
    ranks = [r for p in res.accepted_ranks for row in p for r in row]
    assert max(ranks) >= 1 or shape[1] == 1  # some rounds left the rank-0 chain


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rnn", "dflash"])
def test_greedy_tree_rnn_and_dflash(tiny, drafts, prompts, plain, name):
    res = dj.generate(tiny, drafts[name], prompts, max_new_tokens=MAX_NEW, tree="7,2,2")
    assert res.tokens == plain.tokens, name


def test_greedy_tree_threshold_and_stops(tiny, drafts, prompts, plain):
    thr = dj.generate(tiny, drafts["markov"], prompts, max_new_tokens=MAX_NEW, tree="7,2,2", verify="threshold:0.5")
    assert thr.tokens == plain.tokens
    assert len({n for row in thr.nodes_verified for n in row}) >= 2  # the threshold cut trees at several sizes
    stop = plain.tokens[2][5]
    res = dj.generate(tiny, drafts["markov"], prompts, max_new_tokens=MAX_NEW, tree="7,2,2", stop_token_ids=[stop])
    for got, want in zip(res.tokens, plain.tokens):
        cut = want.index(stop) + 1 if stop in want else len(want)
        assert got == want[:cut]


def cheap_round_seconds(target, draft, prep):
    """A fixed stand-in for `loop.round_seconds_table`: a round at width w costs 1 + 0.1 (w - 1), a round without
    the draft 1.2, so drafting pays and the scheduler verifies a node iff its s is worth about a tenth of a round."""
    return 1.0 + 0.1 * (np.asarray(prep.spec.widths, np.float32) - 1), 1.2


def test_greedy_tree_scheduler(tiny, drafts, prompts, plain, monkeypatch):
    """verify="scheduler" with trees (trees §6) on a ragged batch and a fixed cost table: output equals plain greedy,
    and the pooled greedy cut trees at several sizes (confidence scores, 0.5^r rank factors)."""
    from dspark_jax.decoding import loop

    monkeypatch.setattr(loop, "round_seconds_table", cheap_round_seconds)
    tree = TreeConfig(7, 2, 2, score="conf")
    res = dj.generate(tiny, drafts["markov"], prompts, max_new_tokens=MAX_NEW, tree=tree, verify="scheduler")
    assert res.tokens == plain.tokens
    sizes = {n for row in res.nodes_verified for n in row}
    assert len(sizes) >= 3, sizes


@pytest.mark.slow
def test_greedy_tree_near_a_full_context(tiny, drafts):
    """A prompt 6 positions short of the context: trees are cut by the room left, output equals plain."""
    rng = np.random.default_rng(4)
    prompt = [rng.integers(0, 127, 506).tolist()]
    with pytest.warns(UserWarning):
        want = dj.generate(tiny, None, prompt, max_new_tokens=20)
    with pytest.warns(UserWarning):
        got = dj.generate(tiny, drafts["markov"], prompt, max_new_tokens=20, tree="15,4,4")
    assert got.tokens == want.tokens


def test_tree_needs_a_draft(tiny, prompts):
    with pytest.raises(UsageError):
        dj.generate(tiny, None, prompts, tree="7")


def test_cli_tree_flags_are_checked(capsys):
    from dspark_jax.generate import main

    for argv in (["--tree", "0,2"], ["--tree", "7", "--tree-mode", "beam"], ["--tree", "7", "--no-draft"]):
        assert main(argv + ["--prompt-ids", "1,2", "--json"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "tree" in err


def test_trees_refused_for_targets_without_tree_attention():
    """A DeepSeek-V4 or Gemma4 target: one line naming the reason, before anything compiles."""
    from dspark_jax.configs import VerifyPolicy
    from dspark_jax.decoding import loop

    class DeepseekV4Config:  # only the type's name matters to the check
        pass

    with pytest.raises(UsageError, match="DeepseekV4Config target: its compressors consume tokens in sequence"):
        loop._check_tree("7,2,2", None, VerifyPolicy.parse("full"), DeepseekV4Config())
