"""The speculative decoding loop (spec §6-§7): lossless greedy, goldens, T = 1 replay, statistics, no retrace.

Compilation dominates the cost on CPU (one loop per distinct batch, prompt bucket, block size, sampling and stop
set), so the tests share one tiny target, one prompt set and one `MAX_NEW` wherever they can.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDENS, golden_arrays, golden_folder, hlo_instructions, rel_err, tiny_qwen3_hf
from draft_factory import bigram_draft, bigram_table, linear_round_seconds

import dspark_jax as dj
from dspark_jax import ops
from dspark_jax.configs import SamplingConfig
from dspark_jax.decoding import loop
from dspark_jax.sampling import probabilities, residual
from pallas_kernels.verify import verify

MAX_NEW = 40
PROMPT_LENS = (1, 16, 7, 12, 5, 9, 14, 3)  # ragged, all in the 16-token bucket
VARIANTS = ("markov", "rnn", "dflash")
# Block sizes: 1 (a one-draft chain: the smallest verify width), 2 and 4 (small even widths), 7 (the released
# drafts' size and the goldens'); odd and even widths both reach the padding of the [anchor, drafts] block.
BLOCK_SIZES = (1, 2, 4, 7)


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    """(our target, the transformers model it was saved from)."""
    folder, hf = tiny_qwen3_hf(tmp_path_factory.mktemp("loop_target"), vocab=128, hidden=64, layers=2, seed=3)
    return dj.load_target(str(folder), dtype="float32"), hf


@pytest.fixture(scope="module")
def tiny(tiny_pair):
    return tiny_pair[0]


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 127, n).tolist() for n in PROMPT_LENS]


@pytest.fixture(scope="module")
def plain(tiny, prompts):
    """Plain greedy decoding of all prompts in one batch: the reference every speculative run must reproduce."""
    return dj.generate(tiny, None, prompts, max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def table(prompts, plain):
    return bigram_table([p + t for p, t in zip(prompts, plain.tokens)])


@pytest.fixture(scope="module")
def bigram_drafts(tiny, table):
    """block size -> a draft that follows the plain path wherever it is bigram-predictable (mixed acceptance).
    All have a confidence head, so every `threshold:X` run shares one compiled loop (and `full` runs another)."""
    return {b: bigram_draft(tiny, table, block_size=b, seed=b, confidence=True) for b in BLOCK_SIZES}


@pytest.fixture(scope="module")
def base4(tiny, prompts, bigram_drafts):
    """Block-4 speculative run of all prompts (no stop tokens); several tests read its round structure."""
    return dj.generate(tiny, bigram_drafts[4], prompts, max_new_tokens=MAX_NEW)


def golden_target(variant="markov"):
    return dj.load_target(str(golden_folder(variant, "target")), dtype="float32")


@pytest.fixture(scope="module")
def gtarget():
    return golden_target()


# -------------------------------------------------------------------------------------------------- helpers


def hf_greedy(hf, prompt, n):
    """transformers' own greedy continuation (an implementation independent of ours)."""
    import torch

    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def assert_target_greedy(target, prompts, outputs):
    """Independent check of greedy output: one full causal forward (no cache) over prompt + output; every new
    token must be the argmax of the logits before it (up to a 1e-5 tie)."""
    full = [p + t for p, t in zip(prompts, outputs)]
    width = max(map(len, full))
    padded = np.zeros((len(full), width), np.int32)
    for i, f in enumerate(full):
        padded[i, : len(f)] = f
    logits, _ = target.forward(padded)
    logits = np.asarray(logits)
    for i, (p, t) in enumerate(zip(prompts, outputs)):
        rows = logits[i, len(p) - 1 : len(p) - 1 + len(t)]
        chosen = rows[np.arange(len(t)), t]
        assert np.all(chosen >= rows.max(-1) - 1e-5), f"row {i}: output is not the target's greedy path"


def truncate_at_stop(tokens, stops):
    for j, t in enumerate(tokens):
        if t in stops:
            return tokens[: j + 1]
    return tokens


def assert_stats(result, prompts, block, max_new, context_len=None, stops=()):
    """Round statistics invariants (spec §6.6-§6.7, interfaces.md §3)."""
    total = 0
    for i, (p, toks, acc, prop) in enumerate(
        zip(prompts, result.tokens, result.acceptance_lengths, result.proposal_lengths)
    ):
        assert len(acc) == len(prop)
        assert all(0 <= k <= block for k in prop), (i, prop)
        assert all(1 <= a <= k + 1 for a, k in zip(acc, prop)), (i, acc, prop)
        limit = max_new if context_len is None else min(max_new, context_len - 1 - len(p))
        stopped = bool(toks) and toks[-1] in stops
        if stopped:
            assert 1 + sum(acc) == len(toks), (i, acc, toks)  # the stop ends the row exactly there
        else:
            # The loop runs until the anchor index reaches prompt + limit; the last round may overshoot.
            assert sum(acc) >= limit and (not acc or sum(acc) - acc[-1] < limit), (i, acc, limit)
            assert len(toks) == min(max_new, 1 + sum(acc)), (i, len(toks), acc)
        total += sum(acc)
    rounds = sum(map(len, result.acceptance_lengths))
    assert result.tau == pytest.approx(total / rounds if rounds else 0.0)


def round_kinds(result, row):
    """Per generated token of `row`: ('prefill' | 'draft' | 'extra', round index, slot in the round)."""
    kinds = [("prefill", -1, 0)]
    for r, a in enumerate(result.acceptance_lengths[row]):
        kinds += [("draft", r, s) for s in range(a - 1)] + [("extra", r, a - 1)]
    return kinds[: len(result.tokens[row])]


# --------------------------------------------------------------------------------------- lossless greedy


def test_plain_greedy_is_the_target_argmax(tiny_pair, prompts, plain):
    tiny, hf = tiny_pair
    assert [len(t) for t in plain.tokens] == [MAX_NEW] * len(prompts)
    assert_target_greedy(tiny, prompts, plain.tokens)
    assert [hf_greedy(hf, p, MAX_NEW) for p in prompts[:3]] == plain.tokens[:3]
    assert all(a == [1] * len(a) and set(q) <= {0} for a, q in zip(plain.acceptance_lengths, plain.proposal_lengths))


@pytest.mark.parametrize("block", BLOCK_SIZES)
def test_greedy_lossless_every_block_size(tiny, prompts, plain, bigram_drafts, block, base4):
    result = base4 if block == 4 else dj.generate(tiny, bigram_drafts[block], prompts, max_new_tokens=MAX_NEW)
    assert result.tokens == plain.tokens
    assert_stats(result, prompts, block, MAX_NEW)
    assert all(set(q) == {block} for q in result.proposal_lengths)
    accepted = [a - 1 for acc in result.acceptance_lengths for a in acc]
    # The bigram draft gets some drafts accepted and some rejected: both branches of the rule run.
    assert max(accepted) >= 1 and min(accepted) == 0
    if block > 1:
        assert any(0 < a < block for a in accepted)  # a rejection after an accepted prefix
    if block == 4:
        assert max(accepted) == block  # a fully accepted block (bonus token)
        # Some row reached max_new_tokens in the middle of a block: its last round committed past the limit.
        assert any(sum(acc) > MAX_NEW for acc in result.acceptance_lengths)


def test_greedy_lossless_random_draft(tiny, prompts, plain):
    # An empty table leaves an untrained draft with the same graph as the block-4 bigram draft (no new compile).
    draft = bigram_draft(tiny, {}, block_size=4, seed=11, confidence=True)
    result = dj.generate(tiny, draft, prompts, max_new_tokens=MAX_NEW)
    assert result.tokens == plain.tokens
    assert_stats(result, prompts, 4, MAX_NEW)


@pytest.mark.parametrize("rows", [(1,), (6,), (0, 3, 7)])
def test_greedy_batch_of_n_equals_single_runs(tiny, prompts, plain, bigram_drafts, base4, rows):
    """Batch sizes 1 and 3 reproduce the batch-8 rows (tokens and per-round statistics)."""
    result = dj.generate(tiny, bigram_drafts[4], [prompts[i] for i in rows], max_new_tokens=MAX_NEW)
    assert result.tokens == [plain.tokens[i] for i in rows]
    assert result.acceptance_lengths == [base4.acceptance_lengths[i] for i in rows]
    assert result.proposal_lengths == [base4.proposal_lengths[i] for i in rows]


def test_greedy_lossless_threshold(tiny, prompts, plain, bigram_drafts):
    result = dj.generate(tiny, bigram_drafts[4], prompts, max_new_tokens=MAX_NEW, verify="threshold:0.5")
    assert result.tokens == plain.tokens
    assert_stats(result, prompts, 4, MAX_NEW)
    proposed = {k for q in result.proposal_lengths for k in q}
    assert 0 in proposed and 4 in proposed and proposed & {1, 2, 3}, proposed  # k varies per round, k = 0 too


def test_recorded_confidences_explain_the_threshold_cuts(tiny, prompts, bigram_drafts):
    result = dj.generate(tiny, bigram_drafts[4], prompts, max_new_tokens=MAX_NEW, verify="threshold:0.5")
    for conf, proposed in zip(result.confidence_logits, result.proposal_lengths):
        assert len(conf) == len(proposed) and all(len(z) == 4 for z in conf)
        for z, k in zip(conf, proposed):
            below = 1 / (1 + np.exp(-np.asarray(z))) < 0.5
            want = int(np.argmax(below)) if below.any() else 4
            assert k == want or k < want and len(z) == 4  # a context-window cap can only shorten the cut


def test_greedy_lossless_scheduler(tiny, prompts, plain, bigram_drafts, monkeypatch):
    """The prefix scheduler (spec §11) with this machine's measured cost table, then with sharp confidences and a
    fixed table (each extra position of the batch costs half a pass) under which it must cut blocks."""
    draft = bigram_drafts[4]
    result = dj.generate(tiny, draft, prompts, max_new_tokens=MAX_NEW, verify="scheduler")
    assert result.tokens == plain.tokens
    assert_stats(result, prompts, 4, MAX_NEW)
    prep = loop.prepare(tiny, draft, prompts, max_new_tokens=MAX_NEW, verify="scheduler")
    assert prep.width_seconds.shape == (len(prep.spec.widths),) and np.all(prep.width_seconds > 0)
    assert prep.plain_seconds > 0
    # The first round's plan: the table's widest timing run's mean prefix confidences (non-increasing, in [0, 1]).
    assert prep.prior.shape == (4,) and np.all(np.diff(prep.prior) <= 1e-6)
    assert 0.0 <= prep.prior.min() and prep.prior.max() <= 1.0
    cold = dataclasses.replace(draft, calibration=np.full(4, 0.25, np.float32))  # confidences pushed to 0 / 1
    monkeypatch.setattr(loop, "round_seconds_table", linear_round_seconds)
    result = dj.generate(tiny, cold, prompts, max_new_tokens=MAX_NEW, verify="scheduler")
    assert result.tokens == plain.tokens
    assert {k for q in result.proposal_lengths for k in q} - {4}, "sharper confidences never cut a block"


def test_stop_tokens(tiny, prompts, plain, bigram_drafts, base4):
    """Stops as an accepted draft inside a block, as the extra token and as the prefill token; output ends right
    after the stop, includes it, and equals plain greedy cut there."""
    kinds = [round_kinds(base4, i) for i in range(len(prompts))]

    def first_kinds(stops):
        out = {}
        for i, toks in enumerate(base4.tokens):
            j = next((j for j, t in enumerate(toks) if t in stops), None)
            if j is not None:
                out[i] = (j,) + kinds[i][j]
        return out

    # A token whose first appearance is an accepted draft with more drafts accepted after it in the same round.
    stops = None
    for i, toks in enumerate(base4.tokens):
        for j, (kind, r, slot) in enumerate(kinds[i]):
            if kind == "draft" and slot + 1 < base4.acceptance_lengths[i][r] - 1 and toks.index(toks[j]) == j:
                stops = (toks[j],)
                break
        if stops:
            break
    assert stops, "no accepted draft to use as a stop token"
    for cand in [t[0] for t in base4.tokens] + [t for toks in base4.tokens for t in toks[1:8]]:
        trial = stops + (cand,)
        have = {k[1] for k in first_kinds(stops).values()}
        if cand not in stops and {k[1] for k in first_kinds(trial).values()} > have:
            stops = trial
    found = first_kinds(stops)
    assert {k[1] for k in found.values()} >= {"draft", "extra"}, found

    result = dj.generate(tiny, bigram_drafts[4], prompts, max_new_tokens=MAX_NEW, stop_token_ids=stops)
    assert result.tokens == [truncate_at_stop(t, stops) for t in plain.tokens]
    assert_stats(result, prompts, 4, MAX_NEW, stops=stops)
    for i, (j, kind, r, slot) in found.items():
        acc, prop = result.acceptance_lengths[i], result.proposal_lengths[i]
        assert len(acc) == r + 1  # the row ends with the round that met the stop (no rounds after the prefill's)
        if kind == "draft":
            assert acc[-1] == prop[-1] == slot + 1  # terminal round: drafts up to the stop, no extra token


def test_cache_nearly_full(tiny_pair, bigram_drafts):
    """Prompts of context - 1, context - 2 and context - 9 tokens: proposals shrink to the room left and the
    output stops at the last position (max_position_embeddings - 1), equal to greedy decoding."""
    tiny, hf = tiny_pair
    ctx = tiny.config.max_position_embeddings
    rng = np.random.default_rng(1)
    long = [rng.integers(0, 127, n).tolist() for n in (ctx - 1, ctx - 2, ctx - 9)]
    spec = dj.generate(tiny, bigram_drafts[4], long, max_new_tokens=MAX_NEW)
    # transformers' greedy stands in for plain decoding here (one compile fewer); plain == transformers is
    # checked on the short prompts.
    assert spec.tokens == [hf_greedy(hf, p, ctx - len(p)) for p in long]
    assert [len(t) for t in spec.tokens] == [ctx - len(p) for p in long]
    assert_target_greedy(tiny, long, spec.tokens)
    assert_stats(spec, long, 4, MAX_NEW, context_len=ctx)
    assert spec.acceptance_lengths[0] == []  # context - 1: only the prefill token fits
    for p, acc, prop in zip(long, spec.acceptance_lengths, spec.proposal_lengths):
        anchor = len(p)
        for a, k in zip(acc, prop):
            assert k <= ctx - 2 - anchor, (anchor, k)  # never verify a draft whose successor would not fit
            anchor += a


# ------------------------------------------------------------------------------------------------- goldens


def _check_golden_loop(g, prefix, result, row=0):
    acc = result.acceptance_lengths[row]
    assert result.tokens[row] == g[prefix + "new_ids"].tolist(), prefix
    assert acc == g[prefix + "acceptance_lengths"].tolist(), prefix
    assert result.proposal_lengths[row] == g[prefix + "proposal_lengths"].tolist(), prefix
    assert [a - 1 for a in acc] == g[prefix + "accepted_draft_lengths"].tolist()
    anchors = len(g["prompt_ids"]) + np.concatenate([[0], np.cumsum(acc)[:-1]])
    assert anchors.tolist() == g[prefix + "round_anchor_pos"].tolist()


@pytest.mark.parametrize("variant", ("rnn", "dflash"))
def test_goldens_e2e(variant):
    """Batch 1: the random and the distilled draft reproduce the reference's loops (goldens README §4.3)."""
    g = golden_arrays(variant)
    prompt = g["prompt_ids"].tolist()
    target = golden_target(variant)
    plain = dj.generate(target, None, [prompt], max_new_tokens=48)
    assert plain.tokens[0] == g["target_greedy_new_ids"].tolist()
    for folder, prefix in (("draft", "e2e_"), ("draft_distilled", "dist_e2e_")):
        result = dj.generate(
            target, dj.load_draft(str(GOLDENS / variant / folder), target), [prompt], max_new_tokens=48
        )
        _check_golden_loop(g, prefix, result)
        assert result.tau == pytest.approx(np.mean(g[prefix + "acceptance_lengths"]))


def test_goldens_e2e_markov_ragged_batch(gtarget):
    """The markov pairs at batch 3 with ragged prompts: row 0 reproduces the golden loops, the other rows are the
    target's greedy path."""
    g = golden_arrays("markov")
    prompt = g["prompt_ids"].tolist()
    batch = [prompt, prompt[:17], prompt[5:] + prompt[:3]]
    for folder, prefix in (("draft", "e2e_"), ("draft_distilled", "dist_e2e_")):
        result = dj.generate(
            gtarget, dj.load_draft(str(GOLDENS / "markov" / folder), gtarget), batch, max_new_tokens=48
        )
        _check_golden_loop(g, prefix, result)
        assert_target_greedy(gtarget, batch, result.tokens)
        assert_stats(result, batch, 7, 48)


def _residual_uniform(dist, token):
    """u such that the reference's inverse CDF over `dist` returns `token` (the middle of its CDF step)."""
    cs = np.cumsum(np.asarray(dist, np.float64))
    lo = cs[token - 1] if token else 0.0
    return np.float32((lo + cs[token]) / 2 / cs[-1])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rnd", (0, 1))
def test_goldens_t1_replay(variant, rnd):
    """T = 1 rounds replayed through our sampling maths and the acceptance rule (goldens README §5.4)."""
    g = golden_arrays(variant)
    k = f"t1_r{rnd}_"
    t1 = SamplingConfig(1.0)
    tol = {"rtol": 0, "atol": 1e-5}
    draft_probs = np.asarray(probabilities(jnp.asarray(g[k + "adjusted_logits"]), t1))
    np.testing.assert_allclose(draft_probs, g[k + "draft_probs"], **tol)
    target_probs = np.asarray(probabilities(jnp.asarray(g[k + "verify_target_logits"]), t1))
    np.testing.assert_allclose(target_probs, g[k + "target_probs"], **tol)
    assert rel_err(target_probs, g[k + "target_probs"]) < 1e-5
    x = g[k + "draft_tokens"]
    p = g[k + "draft_probs"]  # the recorded p_j, as the brief of the replay says
    slots = np.arange(len(x))
    accept_probs = np.minimum(1.0, target_probs[slots, x] / np.maximum(p[slots, x], 1e-8))
    np.testing.assert_allclose(accept_probs, g[k + "accept_probs"], **tol)

    a, nxt = int(g[k + "accepted"]), int(g[k + "next_token"])
    block = len(x)
    if a < block:
        res = np.asarray(residual(jnp.asarray(target_probs[a]), jnp.asarray(p[a])))
        if k + "residual_probs" in g:
            np.testing.assert_allclose(res, g[k + "residual_probs"], **tol)
        final = res
    else:
        final = target_probs[block]
    assert final[nxt] > 0, "the recorded extra token has no mass in the distribution it was drawn from"

    # Uniforms that make the rule accept exactly A drafts (U < ratio for i < A, U >= ratio at A).
    u = accept_probs / 2
    if a < block:
        assert accept_probs[a] < 1
        u[a] = (1 + accept_probs[a]) / 2
    args = (
        jnp.asarray(x[None], jnp.int32),
        jnp.asarray([block], jnp.int32),
        jnp.asarray(target_probs[None]),
        jnp.asarray(p[None]),
        jnp.asarray(u[None], jnp.float32),
        jnp.asarray([_residual_uniform(final, nxt)]),
    )
    accepted, next_token = ops.accept_chain(*args)
    assert int(accepted[0]) == a and int(next_token[0]) == nxt
    # The Pallas kernel in interpret mode agrees (once per variant is enough: it is the same rule).
    if rnd == 1:
        parents = ops.chain_parents(1, block)
        out = verify(args[0], parents, *args[1:], impl="pallas", interpret=True)
        assert int(out.accept_len[0]) == a and int(out.next_token[0]) == nxt


# ------------------------------------------------------------------------------------------------ retrace


def test_one_compilation_per_bucket(tiny, prompts, bigram_drafts, monkeypatch):
    """Prompts of different lengths in one bucket (and different limits) reuse one prefill and one loop."""
    traces = []
    real_round = loop._round

    def counting_round(*args, **kwargs):
        traces.append(1)
        return real_round(*args, **kwargs)

    monkeypatch.setattr(loop, "_round", counting_round)
    draft = bigram_drafts[4]
    sizes = (loop.prefill._cache_size(), loop.decode_loop._cache_size())
    for rows in ((0, 3, 7), (1, 2, 4), (5, 6, 0)):
        dj.generate(tiny, draft, [prompts[i] for i in rows], max_new_tokens=MAX_NEW)
    new_entries = (loop.prefill._cache_size() - sizes[0], loop.decode_loop._cache_size() - sizes[1])
    # 0 new entries when an earlier test already compiled this (batch 3, bucket 16, block 4) loop, else exactly 1.
    assert new_entries[0] <= 1 and new_entries[1] <= 1, new_entries
    assert len(traces) == new_entries[1], (len(traces), new_entries)
    assert loop.decode_loop._cache_size() >= 1


@pytest.mark.parametrize("tree", [None, "4,2"])
def test_narrower_passes_write_the_cache_in_place(tiny, prompts, bigram_drafts, tree):
    """A threshold round picks its target-pass width at run time (`switch_in_place`) and copies no cache: as
    branches of a conditional, XLA:CPU copied every layer's K and V each round (embedded pair, f32: batch 16
    threshold rounds 30.0 -> 28.5 ms, batch 4 tree rounds 15.1 -> 13.5 ms without the copies)."""
    draft = bigram_drafts[4]
    prep = loop.prepare(tiny, draft, prompts, 8, 0.0, 1.0, 0, 0, "threshold:0.5", None, tree=tree)
    assert len(prep.spec.widths) > 1
    state = prep.prefill(tiny, draft)
    parts = (*tiny.decode_parts(), *draft.decode_parts())
    hlo = loop.decode_loop.lower(*parts, state, 8, spec=prep.spec).compile().as_text()
    assert hlo_instructions(hlo, "%copy", state.target_cache.k.shape) == []


def test_shut_scheduler_keeps_the_draft_cache_as_bits(tmp_path, prompts, monkeypatch):
    """A bf16 scheduler loop copies neither cache into bf16 and back inside its rounds: the plain rounds' flush
    runs in `switch_in_place` (as a `lax.cond` on the bf16 state, XLA:CPU copied the draft cache and the pending rows
    around it every round, flush or not: 5 bitcast copies a round at batch 16 on the embedded pair)."""
    folder, _ = tiny_qwen3_hf(tmp_path, vocab=128, hidden=64, layers=2, seed=3)
    target = dj.load_target(str(folder), dtype="bfloat16")
    draft = bigram_draft(target, {}, block_size=4, confidence=True)
    monkeypatch.setattr(loop, "round_seconds_table", linear_round_seconds)
    prep = loop.prepare(target, draft, prompts[:3], 8, 0.0, 1.0, 0, 0, "scheduler", None)
    state = prep.prefill(target, draft, drafting=False)
    assert state.draft_cache.k.dtype == jnp.bfloat16
    parts = (*target.decode_parts(), *draft.decode_parts())
    hlo = loop.decode_loop.lower(*parts, state, 8, spec=prep.spec).compile().as_text()
    for shape in (state.target_cache.k.shape, state.draft_cache.k.shape):
        copies = hlo_instructions(hlo, "%wrapped_bitcast-convert", shape)
        assert copies and all(c == "ENTRY" for c, _ in copies), (shape, copies)


def test_bf16_state_is_carried_as_bits(tmp_path, prompts, monkeypatch):
    """On CPU the loop carries a bf16 state's arrays as their uint16 bits: the same tokens and caches as carrying
    bf16, and no copy of a whole cache into its bits and back inside the loop (XLA:CPU made one a round when the
    carry was bf16 and the cache writes scattered bits: 4.5 of 21 ms a step at batch 64 on the embedded target)."""
    folder, _ = tiny_qwen3_hf(tmp_path, vocab=128, hidden=64, layers=2, seed=3)
    target = dj.load_target(str(folder), dtype="bfloat16")
    prep = loop.prepare(target, None, prompts[:3], 8, 0.0, 1.0, 0, 0, "full", None)
    parts = (*target.decode_parts(), None, None)

    def run():
        state = loop.decode_loop(*parts, prep.prefill(target, None), prep.spec.max_rounds, spec=prep.spec)
        return np.asarray(state.tokens), np.asarray(state.target_cache.k.astype(jnp.float32)), state.target_cache.k

    tokens, cache, k = run()
    assert k.dtype == jnp.bfloat16
    hlo = loop.decode_loop.lower(*parts, prep.prefill(target, None), 8, spec=prep.spec).compile().as_text()
    # A copy into bits at the loop's entry and one back at its exit (ENTRY), none in the loop's computations.
    copies = hlo_instructions(hlo, "%wrapped_bitcast-convert", k.shape)
    assert copies and all(c == "ENTRY" for c, _ in copies), copies
    loop.decode_loop.clear_cache()
    monkeypatch.setattr(loop, "as_bits", lambda s: s)
    bf16_tokens, bf16_cache, _ = run()
    np.testing.assert_array_equal(tokens, bf16_tokens)
    np.testing.assert_array_equal(cache, bf16_cache)
