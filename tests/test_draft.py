"""Tests for the DSpark / DFlash draft: golden parity of every draft stage per round (models/draft.py, heads,
decoding/propose.py), loading and one-line errors for bad drafts or mismatched targets, full-size key layouts, batch
and cache properties, and the research API `DraftHandle.propose`."""

import dataclasses
import functools
import json
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import GOLDENS, golden_arrays, golden_folder, rel_err
from flax import nnx

import dspark_jax as dj
from conversion.convert import plan
from conversion.keymaps import KEYMAPS
from conversion.keymaps.dspark import DRAFT_KEYMAP
from conversion.reader import DTYPES, load_manifest, open_checkpoint, save_safetensors
from dspark_jax.cache import KVCache
from dspark_jax.configs import DraftConfig, Qwen3Config, SamplingConfig
from dspark_jax.decoding.propose import propose, sample_slots
from dspark_jax.errors import DSparkError, UsageError
from dspark_jax.layers.params import Frozen
from dspark_jax.models import Draft, Qwen3
from dspark_jax.sampling import probabilities

VARIANTS = ("markov", "rnn", "dflash")
TENSOR_COUNTS = {"markov": 31, "rnn": 33, "dflash": 27}  # goldens README §2.2
WIDTH = 24  # context rows per call, zero-padded, so one compiled round serves every round of a variant
CACHE_LEN = 128  # > the last anchor position of every exported round plus WIDTH
OBSERVED: dict[str, float] = {}  # largest relative error per golden array suffix (read by the report)


# ------------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def goldens():
    return {v: golden_arrays(v) for v in VARIANTS}


@pytest.fixture(scope="module")
def target():
    # All variants share target/ (same seed, README §1); load it once.
    return dj.load_target(str(golden_folder("markov", "target")), dtype="float32")


@pytest.fixture(scope="module")
def drafts(target):
    return {
        (v, w): dj.load_draft(str(GOLDENS / v / w), target=target)
        for v in VARIANTS
        for w in ("draft", "draft_distilled")
    }


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _round(graphdef, state, cache, features, num_rows, anchors, anchor_positions, forced_tokens):
    """One draft round: push context, block forward, greedy slots; plus the same slots teacher-forced."""
    draft = nnx.merge(graphdef, state)
    greedy = SamplingConfig(0.0)
    proposal, cache = propose(draft, cache, features, num_rows, anchors, anchor_positions, greedy, None)
    forced = sample_slots(draft, proposal.hidden, anchors, greedy, None, forced_tokens)
    return proposal, forced, draft.project_context(features), cache


def new_cache(handle, batch: int) -> KVCache:
    c = handle.config.model
    return KVCache.zeros(c.num_hidden_layers, batch, CACHE_LEN, c.num_key_value_heads, c.head_dim, c.dtype)


def run_round(handle, cache, rows, anchors, anchor_positions, forced=None):
    """rows: per batch row, the raw features [t_b, taps * hidden] of positions cache.lengths[b] .. + t_b."""
    width = handle.config.num_taps * handle.config.model.hidden_size
    feats = np.zeros((len(rows), WIDTH, width), np.float32)
    for i, r in enumerate(rows):
        feats[i, : len(r)] = r
    num = np.array([len(r) for r in rows], np.int32)
    if forced is None:
        forced = np.zeros((len(rows), handle.config.block_size), np.int32)
    return _round(
        handle.graphdef,
        handle.state,
        cache,
        jnp.asarray(feats),
        jnp.asarray(num),
        jnp.asarray(anchors, jnp.int32),
        jnp.asarray(anchor_positions, jnp.int32),
        jnp.asarray(forced, jnp.int32),
    )


def assert_close(got, ref, name: str, rel: float = 1e-5):
    """Goldens README §5.1: relative L2 and max-abs <= 1e-4 * max(1, max|ref|), both in float64."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} vs {ref.shape}"
    err, mad, allowed = rel_err(got, ref), float(np.abs(got - ref).max()), 1e-4 * max(1.0, float(np.abs(ref).max()))
    suffix = name.split("_", 3)[-1] if name.startswith("dist_") else name.split("_", 2)[-1]
    OBSERVED[suffix] = max(OBSERVED.get(suffix, 0.0), err)
    assert err <= rel and mad <= allowed, f"{name}: rel L2 {err:.2e}, max abs {mad:.2e} (allowed {allowed:.2e})"


def round_prefixes(z, series: str) -> list[str]:
    if series == "dist":
        return [f"dist_t0_r{k}_" for k in range(int(z["dist_num_full_rounds"]))]
    return [f"{series}_r0_", f"{series}_r1_"]


# -------------------------------------------------------------------------------------------- golden parity (§5.3)


@pytest.mark.parametrize("series", ["t0", "t1", "dist"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_rounds_match_goldens(drafts, goldens, variant, series):
    """Every draft-side array of each exported round; rounds chain one draft cache (spec §6.3, §6.7).

    T = 0 rounds run free (greedy, the sequential head fed with its own drafts); T = 1 rounds replay the recorded
    drafts through the sequential head (README §5.4). The recorded ctx_features are fed, never our target's.
    """
    z = goldens[variant]
    handle = drafts[variant, "draft_distilled" if series == "dist" else "draft"]
    cache = new_cache(handle, 1)
    for p in round_prefixes(z, series):
        q, pos, feats = int(z[p + "draft_cache_len_before"]), int(z[p + "anchor_pos"]), z[p + "ctx_features"]
        assert int(cache.lengths[0]) == q, f"{p}: cache holds {int(cache.lengths[0])} rows, recorded Q = {q}"
        np.testing.assert_array_equal(z[p + "ctx_positions"], np.arange(q, q + len(feats)))
        np.testing.assert_array_equal(z[p + "block_positions"], np.arange(pos, pos + 7))
        recorded = z[p + "draft_tokens"]
        free, forced, projected, cache = run_round(
            handle, cache, [feats], [int(z[p + "anchor_token"])], [pos], forced=recorded[None]
        )
        assert_close(projected[0, : len(feats)], z[p + "ctx_projected"], p + "ctx_projected")
        assert_close(free.hidden[0], z[p + "block_hidden"], p + "block_hidden")
        assert_close(free.base_logits[0], z[p + "base_logits"], p + "base_logits")
        assert int(cache.lengths[0]) == int(z[p + "draft_cache_len_after"]) == pos
        if series == "t1":
            got = forced  # teacher-forced: previous token of slot j = recorded draft j-1, slot 0 = anchor
            probs = probabilities(forced.logits[0], SamplingConfig(1.0))
            assert_close(probs, z[p + "draft_probs"], p + "draft_probs")
        else:
            got = free
            np.testing.assert_array_equal(np.asarray(free.tokens[0]), recorded, err_msg=p + "draft_tokens")
            # Replaying greedy drafts through the head changes nothing.
            np.testing.assert_array_equal(np.asarray(forced.logits), np.asarray(free.logits))
        assert_close(got.logits[0], z[p + "adjusted_logits"], p + "adjusted_logits")
        if variant == "dflash":
            assert p + "confidence_logits" not in z
            np.testing.assert_array_equal(np.asarray(got.logits), np.asarray(got.base_logits))
            np.testing.assert_array_equal(np.asarray(got.confidence_logits), 0.0)
        else:
            assert_close(got.confidence_logits[0], z[p + "confidence_logits"], p + "confidence_logits")


# ------------------------------------------------------------------------------------------------ loading (§5.2)


@pytest.mark.parametrize("weights", ["draft", "draft_distilled"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_load_consumes_every_key(drafts, target, variant, weights):
    handle = drafts[variant, weights]
    _, abstract = nnx.split(nnx.eval_shape(lambda: Draft(handle.config, rngs=nnx.Rngs(0))))
    with open_checkpoint(str(GOLDENS / variant / weights)) as reader:
        found = plan(reader, DRAFT_KEYMAP, abstract, source=variant)
        assert len(reader.keys()) == TENSOR_COUNTS[variant]
        assert sorted(key for key, _ in found.values()) == reader.keys()
        assert set(found) == {path for path, _ in abstract.flat_state()}
        np.testing.assert_array_equal(np.asarray(handle.state["fc"][...]), reader.read("fc.weight").T)
    # Frozen copies (spec §5.3): equal to the target's, and typed so that optimizers skip them.
    draft = handle.module()
    assert isinstance(draft.embed_tokens, Frozen) and isinstance(draft.lm_head, Frozen)
    np.testing.assert_array_equal(np.asarray(draft.embed_tokens[...]), np.asarray(target.state["embed_tokens"][...]))
    np.testing.assert_array_equal(np.asarray(draft.lm_head[...]), np.asarray(target.state["lm_head"][...]))
    assert handle.config.model.dtype == "float32"


def copy_draft(tmp_path, variant="markov", config_edits=None, tensor_edit=None):
    """A copy of a golden draft folder with config.json fields replaced and/or its tensors rewritten."""
    folder = tmp_path / f"{variant}_draft"
    shutil.copytree(GOLDENS / variant / "draft", folder)
    if config_edits:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config_edits)
        (folder / "config.json").write_text(json.dumps(cfg))
    if tensor_edit:
        with open_checkpoint(str(folder)) as reader:
            tensors = {k: reader.read(k) for k in reader.keys()}
        tensor_edit(tensors)
        save_safetensors(str(folder / "model.safetensors"), tensors)
    return folder


def assert_one_line_error(excinfo, *fragments):
    msg = str(excinfo.value)
    assert "\n" not in msg and msg, msg
    for f in fragments:
        assert f in msg, f"{f!r} not in {msg!r}"


def _perturb(key):
    def edit(t):
        t[key] = t[key].copy()
        t[key][3, 5] += 1e-3

    return edit


def _drop(*keys):
    def edit(t):
        for k in keys:
            del t[k]

    return edit


def _reshape(key, shape):
    def edit(t):
        t[key] = np.zeros(shape, t[key].dtype)

    return edit


def _add(key, shape):
    def edit(t):
        t[key] = np.zeros(shape, np.float32)

    return edit


BAD_DRAFTS = {
    "layer_id_out_of_range": (dict(target_layer_ids=[1, 3, 6]), None, ("target_layer_ids", "6")),
    "layer_id_below_embedding": (dict(target_layer_ids=[-2, 3, 4]), None, ("target_layer_ids", "-2")),
    "layer_id_is_last_layer": (dict(target_layer_ids=[1, 3, 5]), None, ("target_layer_ids", "5", "never used")),
    "mask_outside_vocab": (dict(mask_token_id=512), None, ("mask_token_id", "512")),
    "mask_negative": (dict(mask_token_id=-1), None, ("mask_token_id",)),
    "mask_not_int": (dict(mask_token_id=3.5), None, ("mask_token_id",)),
    "unknown_markov_head_type": (dict(markov_head_type="lstm"), None, ("markov_head_type", "lstm")),
    "hidden_size": (dict(hidden_size=32), None, ("hidden_size", "32", "64")),
    "vocab_size": (dict(vocab_size=1024), None, ("vocab_size", "1024", "512")),
    "num_target_layers": (dict(num_target_layers=8), None, ("num_target_layers", "8", "6")),
    "num_attention_heads": (dict(num_attention_heads=8), None, ("num_attention_heads", "8", "4")),
    "num_key_value_heads": (dict(num_key_value_heads=1), None, ("num_key_value_heads", "1", "2")),
    "head_dim": (dict(head_dim=32), None, ("head_dim", "32", "16")),
    "missing_fc": (None, _drop("fc.weight"), ("missing", "fc")),
    "missing_layer_tensor": (None, _drop("layers.1.mlp.up_proj.weight"), ("missing", "layers.1.mlp.up_proj")),
    "missing_markov_table": (None, _drop("markov_head.markov_w2.weight"), ("missing", "markov_head.markov_w2")),
    "wrong_shape_fc": (None, _reshape("fc.weight", (64, 128)), ("fc.weight", "[64, 128]", "[64, 192]")),
    "wrong_shape_k_proj": (
        None,
        _reshape("layers.0.self_attn.k_proj.weight", (64, 64)),
        ("layers.0.self_attn.k_proj.weight", "[64, 64]", "[32, 64]"),
    ),
    "wrong_shape_confidence": (
        None,
        _reshape("confidence_head.proj.weight", (1, 64)),
        ("confidence_head.proj.weight", "[1, 64]", "[1, 80]"),
    ),
    "unknown_tensor": (None, _add("markov_head.gate_proj.weight", (16, 80)), ("unknown", "gate_proj")),
    "embed_differs_from_target": (None, _perturb("embed_tokens.weight"), ("embed_tokens.weight", "target")),
    "lm_head_differs_from_target": (None, _perturb("lm_head.weight"), ("lm_head.weight", "target")),
}


@pytest.mark.parametrize("case", sorted(BAD_DRAFTS))
def test_bad_draft_is_refused(tmp_path, target, case):
    config_edits, tensor_edit, fragments = BAD_DRAFTS[case]
    folder = copy_draft(tmp_path, config_edits=config_edits, tensor_edit=tensor_edit)
    with pytest.raises(DSparkError) as e:
        dj.load_draft(str(folder), target=target)
    assert_one_line_error(e, *fragments)


def test_frozen_copies_may_be_absent(tmp_path, target, drafts):
    """Spec §5.3: a draft without embed_tokens / lm_head binds the target's arrays and runs the same."""
    folder = copy_draft(tmp_path, tensor_edit=_drop("embed_tokens.weight", "lm_head.weight"))
    handle = dj.load_draft(str(folder), target=target)
    full = drafts["markov", "draft"]
    for a, b in zip(jax.tree.leaves(handle.state), jax.tree.leaves(full.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tied_target_lends_its_embedding_as_the_head(tmp_path):
    """A tied target's draft binds the embedding itself as its frozen head ([vocab, hidden], no transposed copy:
    0.78 GB in bf16 at Qwen3-4B): one buffer, the same logits as a draft holding W_lm = E^T, the checkpoint's
    lm_head.weight still compared with it, and exported in the checkpoint's layout."""
    from conftest import tiny_qwen3_hf
    from draft_factory import random_draft

    from conversion.export import export_draft

    folder, _ = tiny_qwen3_hf(tmp_path, tied=True)
    target = dj.load_target(str(folder), dtype="float32")
    own = random_draft(target, markov_rank=8, confidence=True)  # holds its own [hidden, vocab] head
    assert not own.config.tied_head
    export_draft(str(tmp_path / "draft"), own.config, own.state, dtype="float32")
    draft = dj.load_draft(str(tmp_path / "draft"), target)
    embed = target.state["embed_tokens"][...]
    assert draft.config.tied_head and draft.state["lm_head"][...].shape == embed.shape
    for name in ("embed_tokens", "lm_head"):
        assert draft.state[name][...].unsafe_buffer_pointer() == embed.unsafe_buffer_pointer(), name
    hidden = jax.random.normal(jax.random.key(0), (2, 3, target.config.hidden_size))
    want = own.module().base_logits(hidden)
    assert rel_err(draft.module().base_logits(hidden), want) <= 1e-6
    # (The embedded pair's target is tied: every test that decodes with it runs such a draft end to end.)
    export_draft(str(tmp_path / "again"), draft.config, draft.state, dtype="float32")
    with open_checkpoint(str(tmp_path / "draft")) as first, open_checkpoint(str(tmp_path / "again")) as second:
        assert first.keys() == second.keys()
        np.testing.assert_array_equal(second.read("lm_head.weight"), first.read("lm_head.weight"))
    with open_checkpoint(str(tmp_path / "draft")) as reader:
        tensors = {k: reader.read(k) for k in reader.keys()}
    _perturb("lm_head.weight")(tensors)
    save_safetensors(str(tmp_path / "draft" / "model.safetensors"), tensors)
    with pytest.raises(DSparkError) as e:
        dj.load_draft(str(tmp_path / "draft"), target)
    assert_one_line_error(e, "lm_head.weight", "target")


def _other_target(target, **changes):
    """A target of another geometry; abstract weights suffice since check_target refuses before reading them."""
    config = dataclasses.replace(target.config, **changes)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=nnx.Rngs(1))))
    return dj.Target(config, graphdef, state, "other")


@pytest.mark.parametrize(
    "changes, fragments",
    [
        (dict(hidden_size=32), ("hidden_size", "64", "32", "another target")),
        (dict(vocab_size=1024), ("vocab_size", "512", "1024")),
        (dict(num_hidden_layers=8), ("num_target_layers", "6", "8")),
        (dict(num_attention_heads=8), ("num_attention_heads", "4", "8")),
        (dict(num_key_value_heads=4), ("num_key_value_heads", "2", "4")),
        (dict(head_dim=8), ("head_dim", "16", "8")),
    ],
)
def test_draft_for_other_target_is_refused(target, changes, fragments):
    other = _other_target(target, **changes)
    with pytest.raises(UsageError) as e:
        dj.load_draft(str(GOLDENS / "markov" / "draft"), target=other)
    assert_one_line_error(e, *fragments)


def test_draft_same_geometry_other_weights_is_refused(target):
    """Same shapes, different embedding (another target's training run): refused by the §5.3 equality check."""
    state = jax.tree.map(lambda x: x, target.state)
    state["embed_tokens"][...] = state["embed_tokens"][...] * 1.5
    other = dj.Target(target.config, target.graphdef, state, "other")
    with pytest.raises(DSparkError) as e:
        dj.load_draft(str(GOLDENS / "markov" / "draft"), target=other)
    assert_one_line_error(e, "embed_tokens.weight", "another target")


# ---------------------------------------------------------------------------------------- full-size layouts (§5.2)


class ManifestReader:
    """The reader interface `plan` uses (keys, spec(key).shape / .dtype), backed by a committed manifest."""

    def __init__(self, manifest):
        self.tensors = manifest["tensors"]

    def keys(self):
        return sorted(self.tensors)

    def spec(self, key):
        t = self.tensors[key]
        return types.SimpleNamespace(shape=tuple(t["shape"]), dtype=DTYPES[t["dtype"]])


TRAINABLE = {"4b": 615e6, "8b": 1.13e9, "14b": 1.86e9}  # spec §3.2


@pytest.mark.parametrize("kind", ["dspark", "dflash"])
@pytest.mark.parametrize("size", ["4b", "8b", "14b"])
def test_full_size_layout(kind, size):
    manifest = load_manifest(f"{kind}-qwen3-{size}-block7")
    config = DraftConfig.from_hf_dict(manifest["config"])
    model = nnx.eval_shape(lambda: Draft(config, rngs=nnx.Rngs(0)))
    _, abstract = nnx.split(model)
    found = plan(ManifestReader(manifest), KEYMAPS[kind], abstract, source=f"{kind}-{size}")
    assert sorted(key for key, _ in found.values()) == sorted(manifest["tensors"])
    assert set(found) == {path for path, _ in abstract.flat_state()}
    c = config.model
    assert (config.block_size, c.num_hidden_layers, config.num_taps) == (7, 5, 5)
    assert config.use_markov == (kind == "dspark") and config.enable_confidence_head == (kind == "dspark")
    trainable = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    frozen = sum(x.size for x in jax.tree.leaves(nnx.state(model, Frozen)))
    assert frozen == 2 * c.vocab_size * c.hidden_size
    if kind == "dspark":
        assert config.markov_rank == 256 and config.confidence_head_with_markov
        assert abs(trainable - TRAINABLE[size]) / TRAINABLE[size] < 0.01, trainable
    # The draft runs only against its own target (spec §3.2).
    own = Qwen3Config.from_hf_dict(load_manifest(f"qwen3-{size}")["config"])
    config.check_target(own)
    other = Qwen3Config.from_hf_dict(load_manifest("qwen3-8b" if size != "8b" else "qwen3-14b")["config"])
    with pytest.raises(UsageError) as e:
        config.check_target(other)
    assert_one_line_error(e, "another target")


def test_gated_head_layout_and_forward(drafts, goldens):
    """The gated head (reference option, spec §4.7; no goldens): keys per spec §5.2, and a draft using it runs."""
    markov = drafts["markov", "draft"]
    config = dataclasses.replace(markov.config, markov_head_type="gated")
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Draft(config, rngs=nnx.Rngs(0))))
    with open_checkpoint(str(GOLDENS / "markov" / "draft")) as reader:
        tensors = {k: reader.spec(k) for k in reader.keys()}
    r, h = config.markov_rank, config.model.hidden_size
    tensors["markov_head.gate_proj.weight"] = types.SimpleNamespace(shape=(r, h + r), dtype=np.dtype(np.float32))
    tensors["markov_head.gate_proj.bias"] = types.SimpleNamespace(shape=(r,), dtype=np.dtype(np.float32))
    reader = types.SimpleNamespace(keys=lambda: sorted(tensors), spec=tensors.__getitem__)
    found = plan(reader, DRAFT_KEYMAP, state, source="gated")
    assert len(found) == len(tensors) == 33

    # The markov draft's weights plus a random gate (large enough that its output is far from constant).
    rng = np.random.default_rng(0)
    known = dict(markov.state.flat_state())
    gate = {"weight": rng.normal(size=(h + r, r)).astype(np.float32), "bias": rng.normal(size=(r,)).astype(np.float32)}
    state = nnx.State.from_flat_path(
        [
            (path, var.replace(known[path].get_value() if path in known else jnp.asarray(gate[path[-1]])))
            for path, var in state.flat_state()
        ]
    )
    handle = dj.DraftHandle(config, graphdef, state, "gated")
    z = goldens["markov"]
    gated, _ = handle.propose(z["t0_r0_ctx_features"], int(z["t0_r0_anchor_token"]))
    vanilla, _ = markov.propose(z["t0_r0_ctx_features"], int(z["t0_r0_anchor_token"]))
    assert gated.tokens.shape == (1, 7) and np.isfinite(np.asarray(gated.logits)).all()
    np.testing.assert_array_equal(np.asarray(gated.tokens), np.argmax(np.asarray(gated.logits), -1))
    # Same backbone, different sequential bias (the gate scales each E1 row by sigma(...) in (0, 1)).
    np.testing.assert_array_equal(np.asarray(gated.hidden), np.asarray(vanilla.hidden))
    beta_gated = np.asarray(gated.logits - gated.base_logits)
    beta_vanilla = np.asarray(vanilla.logits - vanilla.base_logits)
    assert np.abs(beta_gated).max() > 0 and np.abs(beta_gated - beta_vanilla).max() > 1e-3


# --------------------------------------------------------------------------------------------------- properties


def test_batch_equals_rows(drafts, goldens):
    """Rows with different anchors, positions and context lengths in one batch equal the same rows run alone."""
    handle, z = drafts["markov", "draft"], goldens["markov"]
    feats, ids = z["prompt_features"], z["prompt_ids"]
    rounds = [  # per round: (rows, anchors, anchor positions)
        ([feats[:24], feats[:10], feats[:17]], [int(z["t0_r0_anchor_token"]), ids[10], ids[17]], [24, 10, 17]),
        (
            [z["t0_r1_ctx_features"], feats[10:13], feats[17:22]],
            [int(z["t0_r1_anchor_token"]), ids[13], ids[22]],
            [25, 13, 22],
        ),
    ]
    batch_cache, row_caches = new_cache(handle, 3), [new_cache(handle, 1) for _ in range(3)]
    for rows, anchors, positions in rounds:
        batched, _, _, batch_cache = run_round(handle, batch_cache, rows, anchors, positions)
        np.testing.assert_array_equal(np.asarray(batch_cache.lengths), positions)
        for i in range(3):
            alone, _, _, row_caches[i] = run_round(
                handle, row_caches[i], rows[i : i + 1], anchors[i : i + 1], positions[i : i + 1]
            )
            np.testing.assert_array_equal(np.asarray(batched.tokens[i]), np.asarray(alone.tokens[0]))
            for name in ("hidden", "base_logits", "logits", "confidence_logits", "probs"):
                a, b = np.asarray(getattr(batched, name)[i]), np.asarray(getattr(alone, name)[0])
                assert rel_err(a, b) <= 1e-6, name
            n = positions[i]
            assert rel_err(batch_cache.k[:, i, :, :n], row_caches[i].k[:, 0, :, :n]) <= 1e-6
            assert rel_err(batch_cache.v[:, i, :, :n], row_caches[i].v[:, 0, :, :n]) <= 1e-6
    # Row 0 is the exported T = 0 round 1.
    np.testing.assert_array_equal(np.asarray(batched.tokens[0]), z["t0_r1_draft_tokens"])


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _uncached(graphdef, state, features, anchors):
    """All context rows at once, straight into the layers: no cache, every context row visible."""
    draft = nnx.merge(graphdef, state)
    t, slots = features.shape[1], draft.config.block_size
    context_kv = draft.context_kv(features, jnp.arange(t, dtype=jnp.int32)[None])
    block_positions = t + jnp.arange(slots, dtype=jnp.int32)[None]
    mask = jnp.ones((1, slots, t + slots), bool)
    return draft.layers_forward(draft.block_inputs(anchors), block_positions, context_kv, mask), context_kv


def test_cached_equals_uncached(drafts, goldens):
    """Context pushed in pieces over several rounds gives the block the same keys as all of it at once."""
    handle, z = drafts["markov", "draft"], goldens["markov"]
    feats, ids = z["t0_r0_ctx_features"], z["prompt_ids"]
    anchor = int(z["t0_r0_anchor_token"])
    cache = new_cache(handle, 1)
    for lo, hi in [(0, 9), (9, 10), (10, 24)]:
        tok = anchor if hi == 24 else int(ids[hi])
        cached, _, _, cache = run_round(handle, cache, [feats[lo:hi]], [tok], [hi])
    hidden, context_kv = _uncached(handle.graphdef, handle.state, jnp.asarray(feats)[None], jnp.array([anchor]))
    assert rel_err(cached.hidden, hidden) <= 1e-6
    for i, (k, v) in enumerate(context_kv):
        # cache [batch, kv_heads, cache_len, head_dim]; context_kv in projection order [batch, t, kv_heads, head_dim]
        k, v = np.swapaxes(k, 1, 2), np.swapaxes(v, 1, 2)
        assert rel_err(cache.k[i, :, :, :24], k) <= 1e-6 and rel_err(cache.v[i, :, :, :24], v) <= 1e-6
    assert_close(hidden[0], z["t0_r0_block_hidden"], "t0_r0_block_hidden")
    np.testing.assert_array_equal(np.asarray(cached.tokens[0]), z["t0_r0_draft_tokens"])


# ------------------------------------------------------------------------------------------------- research API


def test_research_propose(drafts, goldens):
    handle, z = drafts["markov", "draft"], goldens["markov"]
    c = handle.config
    proposal, cache = handle.propose(z["t0_r0_ctx_features"], int(z["t0_r0_anchor_token"]))
    b, j, v, h = 1, c.block_size, c.model.vocab_size, c.model.hidden_size
    assert proposal.tokens.shape == (b, j) and proposal.tokens.dtype == jnp.int32
    for name in ("probs", "base_logits", "logits"):
        assert getattr(proposal, name).shape == (b, j, v) and getattr(proposal, name).dtype == jnp.float32, name
    assert proposal.confidence_logits.shape == (b, j) and proposal.confidence_logits.dtype == jnp.float32
    assert proposal.hidden.shape == (b, j, h)
    np.testing.assert_array_equal(np.asarray(proposal.tokens[0]), z["t0_r0_draft_tokens"])
    assert_close(proposal.logits[0], z["t0_r0_adjusted_logits"], "t0_r0_adjusted_logits")
    assert_close(proposal.confidence_logits[0], z["t0_r0_confidence_logits"], "t0_r0_confidence_logits")
    np.testing.assert_array_equal(np.asarray(cache.lengths), [24])
    # Continue from the returned cache with only the new row (round 1).
    proposal, cache = handle.propose(z["t0_r1_ctx_features"][None], np.array([z["t0_r1_anchor_token"]]), cache=cache)
    np.testing.assert_array_equal(np.asarray(proposal.tokens[0]), z["t0_r1_draft_tokens"])
    assert_close(proposal.hidden[0], z["t0_r1_block_hidden"], "t0_r1_block_hidden")
    np.testing.assert_array_equal(np.asarray(cache.lengths), [25])
    # Bad inputs are refused at the boundary with one line.
    with pytest.raises(UsageError) as e:
        handle.propose(np.zeros((3, 100), np.float32), 1)
    assert_one_line_error(e, "taps", "192")
    with pytest.raises(UsageError) as e:
        handle.propose(np.zeros((1, 3, 192), np.float32), np.array([1, 2]))
    assert_one_line_error(e, "anchor")
    with pytest.raises(UsageError) as e:
        handle.propose(np.zeros((1, cache.cache_len, 192), np.float32), 1, cache=cache)
    assert_one_line_error(e, "cache holds")
