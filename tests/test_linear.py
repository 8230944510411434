"""The out-major CPU decode layout (layers/linear.py): same numbers as the declared layout, a copy that leaves the
loaded model alone, and none under a mesh."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err
from flax import nnx

import dspark_jax as dj
from dspark_jax.generate import ASSETS
from dspark_jax.layers import linear, product_forms
from dspark_jax.layers.linear import (
    COMPACT_PRODUCT_ROWS,
    ROW_PRODUCT_MIN_SIZE,
    ROW_PRODUCT_ROWS,
    compact,
    dense,
    out_major,
    project,
    take_rows,
)
from dspark_jax.loading import _decode_copy


@pytest.mark.parametrize("rows", [1, 2, 7, 8, 32, 33, 64])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dense_layouts_agree(rows, dtype):
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((1, rows, 96)), dtype)
    w = jnp.asarray(rng.standard_normal((96, 1400)) * 0.1, dtype)  # > ROW_PRODUCT_MIN_SIZE
    want = np.asarray(dense(x, w, False, preferred_element_type=jnp.float32))
    got = dense(x, out_major(w, 1), True, preferred_element_type=jnp.float32)
    assert got.shape == (1, rows, 1400) and got.dtype == jnp.float32
    assert rel_err(np.asarray(got), want) <= (1e-6 if dtype == "float32" else 1e-2)
    assert dense(x, out_major(w, 1), True).dtype == x.dtype  # result in x's dtype by default


@pytest.mark.parametrize("rows", [1, 2, 8, 32, 33, 128, 129])
def test_compact_kernel_gives_the_same_products(rows):
    """A bf16-exact f32 kernel is stored in bf16 by `compact` and multiplied in f32: the f32 kernel's numbers."""
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((256, 512)) * 0.1, jnp.bfloat16).astype(jnp.float32)  # a bf16 checkpoint
    packed = compact(out_major(w, 1))
    assert packed.dtype == jnp.bfloat16
    got = dense(x, packed, True)
    assert got.dtype == jnp.float32
    assert rel_err(np.asarray(got), np.asarray(x @ w)) <= 1e-6


@pytest.mark.parametrize("form", ["row", "transposed_dot"])
def test_one_row_forms_give_the_same_products(form, monkeypatch):
    """Either form a one-row product of a compact kernel may take (timed per machine) gives x @ w, in and out of a
    jitted function (the choice is timed while the caller is traced)."""
    monkeypatch.setattr(product_forms, "choose", lambda key, candidates, timer: form)
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 1, 256)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((256, 512)) * 0.1, jnp.bfloat16).astype(jnp.float32)
    packed = compact(out_major(w, 1))
    want = np.asarray(x[0] @ w)
    for got in (dense(x, packed, True), jax.jit(lambda x: dense(x, packed, True))(x)):
        assert rel_err(np.asarray(got[0]), want) <= 1e-6
    assert rel_err(np.asarray(linear._transposed_dot(x[0], packed)), want) <= 1e-6


def test_product_forms_are_timed_once_per_machine(tmp_path, monkeypatch):
    """The fastest candidate is kept in this machine's section of the file (other machines' sections stay), read
    back by the next process without timing; an unreadable file or a stale choice is timed again."""
    store = tmp_path / "forms.json"
    monkeypatch.setenv("DSPARK_PRODUCT_FORMS", str(store))
    monkeypatch.setattr(product_forms, "_chosen", {})
    store.write_text(json.dumps({"another CPU | 2 cores | jax 0": {"k": "slow"}}))
    times = {"slow": 2.0, "fast": 1.0}
    calls = []

    def timer(name):  # each candidate's first run meets a burst of load: only the fastest run counts
        runs = iter([times[name] * 3] + [times[name]] * (product_forms.REPEATS - 1))
        return lambda: calls.append(name) or next(runs)

    assert product_forms.choose("k", ("slow", "fast"), timer) == "fast"
    assert calls == ["slow", "fast"] * product_forms.REPEATS  # the candidates take turns
    data = json.loads(store.read_text())
    assert data[product_forms.machine()] == {"k": "fast"} and data["another CPU | 2 cores | jax 0"] == {"k": "slow"}
    assert [p.name for p in tmp_path.iterdir()] == ["forms.json"]  # no temporary file left

    def untimed(name):
        raise AssertionError("timed again")

    def constant(seconds):
        return lambda name: lambda: seconds[name]

    product_forms._chosen.clear()  # a new process
    assert product_forms.choose("k", ("slow", "fast"), untimed) == "fast"
    assert product_forms.choose("single", ("only",), untimed) == "only"
    product_forms._chosen.clear()
    assert product_forms.choose("k", ("slow", "other"), constant({"slow": 1.0, "other": 3.0})) == "slow"
    product_forms._chosen.clear()
    store.write_text("{not json")
    assert product_forms.choose("k", ("slow", "fast"), constant(times)) == "fast"
    assert json.loads(store.read_text())[product_forms.machine()] == {"k": "fast"}


def test_product_forms_time_while_a_loop_is_traced(tmp_path, monkeypatch):
    """A one-row product of a compact kernel traced inside a jitted loop times its two forms for real, keeps one
    and gives the same numbers."""
    monkeypatch.setenv("DSPARK_PRODUCT_FORMS", str(tmp_path / "forms.json"))
    monkeypatch.setattr(product_forms, "_chosen", {})
    monkeypatch.setattr(product_forms, "STREAM_BYTES", 1 << 20)
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((256, 384)) * 0.1, jnp.bfloat16).astype(jnp.float32)
    packed = compact(out_major(w, 1))
    x = jnp.asarray(rng.standard_normal((1, 256)), jnp.float32)
    got = jax.jit(lambda x: jax.lax.fori_loop(0, 2, lambda i, y: y + dense(x, packed, True)[:, :256], x))(x)
    want = x + 2 * np.asarray(x @ w)[:, :256]
    assert rel_err(np.asarray(got), np.asarray(want)) <= 1e-6
    section = json.loads((tmp_path / "forms.json").read_text())[product_forms.machine()]
    assert list(section.values()) in (["row"], ["transposed_dot"]), section


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_take_rows_gathers_without_widening_the_table(dtype):
    """take_rows = table[ids] bit for bit; a bf16 table's rows are gathered as bits, so the compiled lookup-and-cast
    holds no f32 copy of the whole table (XLA:CPU widened it, and hoisted that out of the decode loop)."""
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((512, 96)), dtype)
    ids = jnp.asarray([[3, 511, 0], [7, 7, 100]], jnp.int32)
    np.testing.assert_array_equal(np.asarray(take_rows(table, ids).astype(jnp.float32)), np.asarray(table)[ids])
    hlo = jax.jit(lambda t, i: take_rows(t, i).astype(jnp.float32)).lower(table, ids).compile().as_text()
    assert dtype == "float32" or "f32[512,96]" not in hlo


def test_compact_keeps_what_bf16_cannot_hold():
    w = jnp.asarray([[1.0, 1.0 + 2.0**-12]], jnp.float32)
    assert compact(w).dtype == jnp.float32
    assert compact(w.astype(jnp.bfloat16)).dtype == jnp.bfloat16  # already narrow: as it is
    assert compact(jnp.asarray([[1.0, jnp.nan]], jnp.float32)).dtype == jnp.float32  # NaN != NaN: kept


def test_row_product_is_its_own_computation(monkeypatch):
    """On CPU, 2-32 rows times an f32 kernel too large for cache compile to a conditional (the fusion boundary),
    1-128 rows times a compact (bf16) kernel under f32 activations too ([out, rows, in] order from two rows on); a
    bf16 model's one row as well (widened to f32 inside, [rows, out, in] order), while its 2 rows and more take one
    dot of the bf16 operands summed in f32; other row counts and small kernels a plain dot."""
    monkeypatch.setattr(product_forms, "choose", lambda key, candidates, timer: candidates[0])  # untimed: "row"
    w = jnp.ones((-(-ROW_PRODUCT_MIN_SIZE // 96), 96), jnp.float32)
    bf16 = w.astype(jnp.bfloat16)
    n = w.shape[0]
    cpu = jax.default_backend() == "cpu"
    cases = [(w, "float32", ROW_PRODUCT_ROWS), (bf16, "float32", COMPACT_PRODUCT_ROWS), (bf16, "bfloat16", (1, 1))]
    for kernel, x_dtype, (low, high) in cases:
        for rows in sorted({1, 2, low, high, high + 1, 200}):
            x = jnp.ones((rows, 96), x_dtype)
            hlo = jax.jit(lambda x: dense(x, kernel, True)).lower(x).as_text()
            want = low <= rows <= high and cpu
            assert ("stablehlo.case" in hlo or "stablehlo.if" in hlo) == want, (kernel.dtype, x_dtype, rows)
            if x_dtype == "bfloat16" and cpu:  # the product is summed in f32, then rounds once to bf16
                if rows == 1:
                    assert f"(tensor<1x{n}x96xbf16>) -> tensor<1x{n}x96xf32>" in hlo
                else:
                    assert f"(tensor<{rows}x96xbf16>, tensor<{n}x96xbf16>) -> tensor<{rows}x{n}xf32>" in hlo, rows
                assert f"(tensor<{rows}x{n}xf32>) -> tensor<{rows}x{n}xbf16>" in hlo, rows
    small = jax.jit(lambda x: dense(x, w[:8], True)).lower(jnp.ones((8, 96), jnp.float32)).as_text()
    assert "stablehlo.case" not in small and "stablehlo.if" not in small


def test_sixteen_bit_products_sum_into_f32():
    """On CPU an einsum of bf16 rows and a bf16 kernel (in-major `dense`, Gemma4's projections) asks for an f32 result
    and rounds it once (a bf16-result dot ran 2-3x slower there); the values are the f32 sums rounded to bf16."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (8, 96), jnp.bfloat16)
    w = jax.random.normal(jax.random.fold_in(key, 1), (96, 4, 24), jnp.bfloat16)
    got = project("td,dkh->tkh", x, w)
    assert got.dtype == jnp.bfloat16
    want = jnp.einsum("td,dkh->tkh", x.astype(jnp.float32), w.astype(jnp.float32)).astype(jnp.bfloat16)
    assert rel_err(np.asarray(got, np.float32), np.asarray(want, np.float32)) <= 1e-2
    hlo = jax.jit(lambda x: dense(x, w.reshape(96, 96), False)).lower(x).as_text()
    wide = jax.default_backend() == "cpu"
    assert ("(tensor<8x96xbf16>, tensor<96x96xbf16>) -> tensor<8x96xf32>" in hlo) == wide
    assert project("td,dkh->tkh", x.astype(jnp.float32), w).dtype == jnp.float32  # f32 rows: an f32 product


@pytest.mark.skipif(not os.path.isdir(ASSETS), reason="embedded pair not built")
def test_decode_copy_matches_the_loaded_model():
    target = dj.load_target(os.path.join(ASSETS, "target"), dtype="float32")
    draft = dj.load_draft(os.path.join(ASSETS, "dspark"), target=target)
    before = np.asarray(target.state["layers"][0]["mlp"]["gate_proj"][...]).copy()
    graphdef, state = target.decode_parts()
    assert target.decode_parts()[1] is state  # made once
    if jax.default_backend() == "cpu":
        # gate|up and k|v are one out-major kernel each, gate's (k's) rows first.
        mlp, attn = state["layers"][0]["mlp"], state["layers"][0]["self_attn"]
        assert "gate_proj" not in mlp and "k_proj" not in attn and "v_proj" not in attn
        gate_up = np.asarray(mlp["gate_up_proj"][...], np.float32)
        np.testing.assert_array_equal(gate_up[: before.shape[1]], before.T)
        np.testing.assert_array_equal(
            gate_up[before.shape[1] :], np.asarray(target.state["layers"][0]["mlp"]["up_proj"][...]).T
        )
        k = np.asarray(target.state["layers"][0]["self_attn"]["k_proj"][...])
        np.testing.assert_array_equal(
            np.asarray(attn["kv_proj"][...], np.float32)[: k[0].size], k.reshape(k.shape[0], -1).T
        )
        # The pair's checkpoint is bf16: its f32 kernels (and tied head) are stored compact, the same numbers.
        assert mlp["gate_up_proj"][...].dtype == jnp.bfloat16
        assert state["embed_tokens"][...].dtype == jnp.bfloat16
        assert state["layers"][0]["self_attn"]["o_proj"][...].shape == (512, 512)
        assert draft.decode_parts()[1]["lm_head"][...].shape == (4096, 512)
        # The draft's copy holds the target copy's tables, not a second head (the tied head is the embedding).
        table = state["embed_tokens"][...]
        for name in ("embed_tokens", "lm_head"):
            assert draft.decode_parts()[1][name][...].unsafe_buffer_pointer() == table.unsafe_buffer_pointer(), name
    np.testing.assert_array_equal(np.asarray(target.state["layers"][0]["mlp"]["gate_proj"][...]), before)
    tokens = jnp.asarray([[5, 17, 301, 9, 44, 1020, 7, 3]], jnp.int32)
    positions = jnp.arange(8, dtype=jnp.int32)[None]
    for rows in (1, 8):
        want, want_taps, _ = target.module()(tokens[:, :rows], positions[:, :rows], tap_layer_ids=(1, 3))
        got, got_taps, _ = nnx.merge(graphdef, state)(tokens[:, :rows], positions[:, :rows], tap_layer_ids=(1, 3))
        assert rel_err(np.asarray(got), np.asarray(want)) <= 1e-5
        assert rel_err(np.asarray(got_taps), np.asarray(want_taps)) <= 1e-5
        logits = nnx.merge(graphdef, state).logits(got)  # the tied head: the embedding, out-major as declared
        assert rel_err(np.asarray(logits), np.asarray(target.module().logits(want))) <= 1e-5


def test_no_copy_under_a_mesh():
    target_mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    graphdef, state = object(), object()
    assert _decode_copy(graphdef, state, target_mesh) == (graphdef, state)
