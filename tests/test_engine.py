"""The engine around the round: sampling settings are per-row data, batch and cache lengths come from buckets (one
compilation per bucket), the prompt bucket is capped at the context, bad request shapes are one-line errors, and
the scheduler's gate turns the draft off when plain decoding is faster."""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDENS, tiny_qwen3_hf
from draft_factory import random_draft

import dspark_jax as dj
from dspark_jax.decoding import loop
from dspark_jax.errors import UsageError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, _ = tiny_qwen3_hf(tmp_path_factory.mktemp("bucket_target"), vocab=96, hidden=32, layers=2, seed=5)
    return dj.load_target(str(folder), dtype="float32")


@pytest.fixture(scope="module")
def draft(tiny):
    return random_draft(tiny, block_size=3, num_layers=1, markov_rank=8, seed=1)


def _prompts(rng, n, lo=2, hi=14):
    return [rng.integers(0, 95, int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def test_sweep_compiles_once_per_bucket(tiny, draft, monkeypatch):
    """20 requests mixing temperatures (greedy, sampled, mixed per row), top-p, top-k, lengths and batch sizes:
    one trace of the round per (batch bucket, cache bucket), and greedy rows stay equal to plain greedy."""
    traces = []
    real_round = loop._round

    def counting_round(*args, **kwargs):
        traces.append(args[3].cache_len)
        return real_round(*args, **kwargs)

    monkeypatch.setattr(loop, "_round", counting_round)
    rng = np.random.default_rng(0)
    settings = [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, top_p=0.9),
        dict(temperature=1.2, top_k=5),
        dict(temperature=0.9, top_p=0.8, top_k=40),
    ]
    buckets = set()
    for i in range(20):
        n = (1, 2, 3, 4)[i % 4]
        prompts = _prompts(rng, n)
        kw = dict(settings[i % len(settings)])
        if i % 7 == 3:  # one value per row: greedy next to sampled rows
            kw = dict(temperature=[0.0, 1.0, 0.5, 0.0][:n], top_p=[1.0, 0.9, 1.0, 1.0][:n])
        max_new = (6, 9, 12, 17, 20)[i % 5]
        result = dj.generate(tiny, draft, prompts, max_new_tokens=max_new, seed=i, **kw)
        assert [len(t) for t in result.tokens] == [max_new] * n
        buckets.add((loop.batch_bucket(n), loop.prepare(tiny, draft, prompts, max_new_tokens=max_new).spec.cache_len))
    assert len(buckets) == 3  # batch buckets 1, 2, 4; one cache bucket
    assert len(traces) == len(buckets), traces


def test_greedy_rows_unaffected_by_sampled_neighbours(tiny, draft):
    rng = np.random.default_rng(1)
    prompts = _prompts(rng, 3)
    plain = dj.generate(tiny, None, prompts, max_new_tokens=12)
    mixed = dj.generate(tiny, draft, prompts, max_new_tokens=12, temperature=[0.0, 1.0, 0.0], top_k=[0, 7, 0], seed=3)
    assert mixed.tokens[0] == plain.tokens[0] and mixed.tokens[2] == plain.tokens[2]
    # A sampled row draws from its own stream: alone at the same index it gives the same tokens.
    again = dj.generate(tiny, draft, prompts, max_new_tokens=12, temperature=[1.0, 1.0, 1.0], top_k=[3, 7, 3], seed=3)
    assert again.tokens[1] == mixed.tokens[1]


def test_padding_rows_do_not_leak(tiny, draft):
    rng = np.random.default_rng(2)
    prompts = _prompts(rng, 3)  # batch bucket 4: one padding row
    out = dj.generate(tiny, draft, prompts, max_new_tokens=8)
    assert len(out.tokens) == 3 and len(out.acceptance_lengths) == 3
    singles = [dj.generate(tiny, draft, [p], max_new_tokens=8).tokens[0] for p in prompts]
    assert out.tokens == singles


def test_prompt_bucket_capped_at_context(tmp_path):
    folder, _ = tiny_qwen3_hf(tmp_path, vocab=64, hidden=32, layers=1, seed=7)
    target = dj.load_target(str(folder), dtype="float32")
    context = target.config.max_position_embeddings  # 512
    prompt = [1] * (context // 2 + 10)  # its power-of-two bucket (512) would be the whole context
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prep = loop.prepare(target, None, [prompt], max_new_tokens=1000)
    assert prep.prompts.shape[1] <= context
    assert prep.limits[0] == context - 1
    assert len(caught) == 1 and "capped at" in str(caught[0].message)
    out = dj.generate(target, None, [prompt], max_new_tokens=1000)
    assert len(out.tokens[0]) == context - len(prompt)  # the last token sits at position context - 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=[0.0, 1.0]), "temperature has 2 values for 3 prompts"),
        (dict(temperature=[0.0, -1.0, 0.5]), "temperature must be"),
        (dict(top_p=[1.0, 1.5, 0.9], temperature=1.0), "top_p must be in"),
        (dict(top_k=[0, -2, 1]), "top_k must be"),
    ],
)
def test_bad_per_row_settings(tiny, kwargs, match):
    prompts = [[1, 2], [3], [4, 5, 6]]
    with pytest.raises(UsageError, match=match):
        dj.generate(tiny, None, prompts, max_new_tokens=4, **kwargs)


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((None, [5, 17, 30]), {}, r"prompt 0 is 5, not a list of token ids"),  # was one prompt per token
        ((None, [[True, 2]]), {}, "outside the vocabulary"),
        ((None, ["hello"]), {}, "prompt 0 is 'hello'"),
        ((None, [[1, 2]]), dict(stop_token_ids=5), "stop_token_ids must be a list"),
        ((None, [[1, 2]]), dict(seed=2**70), "64 bits"),
        (("draft_first", [[1, 2]]), {}, r"target must be what dj.load_target returns, got DraftConfig"),
    ],
)
def test_bad_api_arguments_are_one_line(tiny, draft, args, kwargs, match):
    """Arguments of the wrong type raise a one-line UsageError instead of a numpy / jax / attribute error."""
    second, prompts = args
    first, second = (draft, tiny) if second == "draft_first" else (tiny, second)
    with pytest.raises(UsageError, match=match) as info:
        dj.generate(first, second, prompts, max_new_tokens=2, **kwargs)
    assert "\n" not in str(info.value)


def test_prompts_as_arrays(tiny):
    """A 2-D array of prompts, or 1-D numpy / jax arrays as prompts, are the same prompts as lists."""
    want = dj.generate(tiny, None, [[1, 2, 3], [4, 5, 6]], max_new_tokens=3).tokens
    assert dj.generate(tiny, None, np.array([[1, 2, 3], [4, 5, 6]]), max_new_tokens=3).tokens == want
    assert dj.generate(tiny, None, [np.array([1, 2, 3]), jnp.array([4, 5, 6])], max_new_tokens=3).tokens == want


def test_load_draft_needs_a_loaded_target(tiny):
    with pytest.raises(UsageError, match="load_draft needs target="):
        dj.load_draft(str(GOLDENS / "markov" / "draft"), target=None)


def test_batch_beyond_largest_bucket(tiny):
    with pytest.raises(UsageError, match="largest batch bucket is 4096"):
        loop.batch_bucket(4097)


@pytest.mark.parametrize("plain_seconds", [0.1, 100.0])
def test_scheduler_gate(tiny, monkeypatch, plain_seconds):
    """A cost table where plain decoding is far faster than any drafting round, even one whose drafts are all
    accepted: the draft never runs (and the output stays plain greedy); where plain decoding is far slower, every
    round drafts. (The probe intervals are tested on hand-made tables in test_schedule.)"""
    draft = random_draft(tiny, block_size=3, num_layers=1, markov_rank=8, confidence=True, seed=2)

    def table(target, draft, prep):
        return 1.0 + 0.5 * np.asarray(prep.spec.widths, np.float32), plain_seconds

    monkeypatch.setattr(loop, "round_seconds_table", table)
    prompts = _prompts(np.random.default_rng(4), 2)
    plain = dj.generate(tiny, None, prompts, max_new_tokens=60)
    out = dj.generate(tiny, draft, prompts, max_new_tokens=60, verify="scheduler")
    assert out.tokens == plain.tokens
    for confidences in out.confidence_logits:
        drafted = [i for i, z in enumerate(confidences) if any(z)]  # skipped rounds record zero confidences
        if plain_seconds < 1:
            assert drafted == []
        else:
            assert drafted == list(range(len(confidences)))


def test_scheduler_gate_follows_measured_tokens(tiny, monkeypatch):
    """Confidences that promise every draft (forced to 1) for a random draft whose drafts the target rejects: the
    forecast says a drafting round pays (4 tokens in 3 s against plain's 1 in 1.2 s), the tokens it commits say it
    does not (1 in 3 s), and the gate follows the tokens: after the first round only sparse probes draft."""
    import jax
    import jax.numpy as jnp

    draft = random_draft(tiny, block_size=3, num_layers=1, markov_rank=8, confidence=True, seed=2)
    monkeypatch.setattr(
        loop, "round_seconds_table", lambda t, d, prep: (1.0 + 0.5 * np.asarray(prep.spec.widths, np.float32), 1.2)
    )
    monkeypatch.setattr(loop, "prefix_confidences", lambda z, t: jnp.ones(z.shape, jnp.float32))
    jax.clear_caches()  # the patched forecast must be traced into a fresh loop
    try:
        prompts = _prompts(np.random.default_rng(6), 2)
        plain = dj.generate(tiny, None, prompts, max_new_tokens=64)
        out = dj.generate(tiny, draft, prompts, max_new_tokens=64, verify="scheduler")
    finally:
        jax.clear_caches()
    assert out.tokens == plain.tokens
    for confidences, accepted in zip(out.confidence_logits, out.acceptance_lengths):
        assert np.mean(accepted) < 1.5  # the drafts really are rejected
        drafted = [i for i, z in enumerate(confidences) if any(z)]
        assert drafted[0] == 0 and len(drafted) <= len(confidences) // 6, drafted


@pytest.mark.parametrize("max_new, pushed", [(40, False), (68, False), (100, True)])
def test_shut_gate_pushes_context_only_for_a_probe(tiny, monkeypatch, max_new, pushed):
    """A gate shut from the start (typical confidences of 0: no first round) probes after PRIOR_PROBE_EVERY rounds.
    The draft's context (the prompt at prefill, the rows plain rounds collect) is computed only if that probe leaves
    PROBE_PAYBACK_ROUNDS before the batch is done: with 40 new tokens (no probe) or 68 (one due 4 rounds before the
    end) the draft cache stays empty and nothing drafts, with 100 it is filled and the probe drafts. The output is
    plain greedy either way."""
    import jax

    from dspark_jax.decoding.schedule import PRIOR_PROBE_EVERY

    draft = random_draft(tiny, block_size=3, num_layers=1, markov_rank=8, confidence=True, seed=2)
    # Not hopeless (a width-4 round of 3 s beats 4 plain rounds of 0.9 s), but no round pays on these confidences.
    monkeypatch.setattr(
        loop, "round_seconds_table", lambda t, d, prep: (1.0 + 0.5 * np.asarray(prep.spec.widths, np.float32), 0.9)
    )
    prompts = _prompts(np.random.default_rng(8), 2, lo=6)
    prep = loop.prepare(tiny, draft, prompts, max_new_tokens=max_new, verify="scheduler")
    state = prep.prefill(tiny, draft, prior=np.zeros(3, np.float32), gain=None)
    assert not bool(state.scheduler.drafting) and int(state.scheduler.probe_every) == PRIOR_PROBE_EVERY
    assert bool(np.any(np.asarray(state.draft_cache.k))) == pushed  # the prompt's context rows
    args = (*tiny.decode_parts(), *draft.decode_parts(), state, prep.spec.max_rounds)
    state = jax.block_until_ready(loop.decode_loop(*args, spec=prep.spec))
    tokens = loop._outputs(prep, *jax.device_get((state.tokens, state.lengths)))
    assert tokens == dj.generate(tiny, None, prompts, max_new_tokens=max_new).tokens
    drafted = np.any(np.asarray(state.confidences)[: len(prompts)] != 0, axis=-1)  # plain rounds record zeros
    assert drafted.any() == pushed  # the probe round
    if pushed:  # the probe drafted against every position the plain rounds collected before it
        first = int(np.argmax(drafted[0]))
        assert first == PRIOR_PROBE_EVERY
        k = np.asarray(state.draft_cache.k)[0, 0]  # [kv_heads, cache_len, head_dim] of row 0
        assert np.all(np.any(k[:, : len(prompts[0]) + first] != 0, axis=(0, 2)))


@pytest.mark.parametrize("verify", ["full", "scheduler"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_streaming_gives_the_same_tokens(tiny, verify, temperature):
    """generate(on_tokens=...) runs STREAM_ROUNDS rounds per call of the same compiled loop: the streamed pieces
    add up to the result, and the result equals one call's, greedy and sampled with a fixed seed."""
    draft = random_draft(tiny, block_size=3, num_layers=1, markov_rank=8, confidence=True, seed=2)
    prompts = _prompts(np.random.default_rng(5), 3)
    kw = dict(max_new_tokens=40, temperature=temperature, seed=7, verify=verify)
    whole = dj.generate(tiny, draft, prompts, **kw)
    pieces = []
    streamed = dj.generate(tiny, draft, prompts, on_tokens=pieces.append, **kw)
    assert streamed.tokens == whole.tokens
    assert streamed.acceptance_lengths == whole.acceptance_lengths
    assert len(pieces) > 2
    assert [sum((p[i] for p in pieces), []) for i in range(len(prompts))] == whole.tokens
