"""FP8 / FP4 dequantisation (V4 §3.2) against an independent bit-level NumPy decoding, and its use by the converter:
quantised tensors with their scales load through the key maps; bad pairs are one-line errors that write nothing."""

import functools
import os

import ml_dtypes
import numpy as np
import pytest

from conversion import quant
from conversion.reader import open_checkpoint, save_safetensors
from dspark_jax.errors import DSparkError, UsageError

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)


# ------------------------------------------------------------------------------- reference decoding, from the bits


def ref_e4m3(byte: int) -> float:
    """1 sign, 4 exponent (bias 7), 3 mantissa bits; 0x7F / 0xFF NaN; exponent 0 is subnormal (m/8)·2^-6."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return float("nan")
    if exp == 0:
        return sign * (man / 8) * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def ref_e8m0(byte: int) -> float:
    return float("nan") if byte == 0xFF else 2.0 ** (byte - 127)


def ref_e2m1(code: int) -> float:
    """bit 3 sign, bits 2..1 exponent (bias 1), bit 0 mantissa; exponent 0 is subnormal m·0.5."""
    sign = -1.0 if code & 0x8 else 1.0
    exp, man = (code >> 1) & 0x3, code & 0x1
    return sign * (man * 0.5 if exp == 0 else (1 + man / 2) * 2.0 ** (exp - 1))


def ref_fp8_matrix(wbytes: np.ndarray, sbytes: np.ndarray) -> np.ndarray:
    """float64[out, in] by the V4 §3.2 formula, one element at a time."""
    out = np.empty(wbytes.shape, np.float64)
    for i in range(wbytes.shape[0]):
        for j in range(wbytes.shape[1]):
            out[i, j] = ref_e4m3(int(wbytes[i, j])) * ref_e8m0(int(sbytes[i // 128, j // 128]))
    return out


def ref_fp4_matrix(packed: np.ndarray, sbytes: np.ndarray) -> np.ndarray:
    """float64[out, 2·half]: low nibble = even column, high nibble = odd column, scale per 32 columns."""
    rows, half = packed.shape
    out = np.empty((rows, 2 * half), np.float64)
    for i in range(rows):
        for k in range(half):
            byte = int(packed[i, k])
            for j, code in ((2 * k, byte & 0xF), (2 * k + 1, byte >> 4)):
                out[i, j] = ref_e2m1(code) * ref_e8m0(int(sbytes[i, j // 32]))
    return out


def same_f32(ours: np.ndarray, ref64: np.ndarray) -> None:
    """Bit-exact against the reference rounded once to f32 (NaN where the reference is NaN, signed zeros kept)."""
    with np.errstate(over="ignore"):  # values past f32's range round to inf, as ours do
        ref = ref64.astype(np.float32)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    ok = ~np.isnan(ref)
    assert np.array_equal(ours[ok].view(np.uint32), ref[ok].view(np.uint32))


# --------------------------------------------------------------------------------------------------------- FP8


def test_e4m3_table_matches_the_bit_formula():
    # ml_dtypes is not the reference here: this pins the byte -> value map the converter relies on.
    ours = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
    ref = np.array([ref_e4m3(b) for b in range(256)], np.float64)
    same_f32(ours, ref)
    assert np.nanmax(ours) == 448.0 and np.isnan(ours[0x7F]) and np.isnan(ours[0xFF])


def test_e8m0_scales_every_byte_and_nan_refused():
    finite = np.arange(255, dtype=np.uint8).view(E8M0)
    same_f32(quant.e8m0_to_f32(finite), np.array([ref_e8m0(b) for b in range(255)]))
    bad = np.array([[127, 127], [0xFF, 3]], np.uint8).view(E8M0)
    with pytest.raises(DSparkError) as e:
        quant.e8m0_to_f32(bad, "layers.0.attn.wq_a.scale")
    msg = str(e.value)
    assert "\n" not in msg and "NaN" in msg and "0xFF" in msg and "[1, 0]" in msg and "wq_a" in msg


def test_fp8_every_byte_and_several_tiles_with_partial_edges():
    rng = np.random.default_rng(0)
    out_dim, in_dim = 300, 260  # 3 × 3 tiles, the last row and column tiles partial
    wbytes = rng.integers(0, 256, (out_dim, in_dim), dtype=np.uint8)
    wbytes.reshape(-1)[:256] = np.arange(256)  # every byte, NaNs included
    sbytes = rng.integers(100, 150, (3, 3), dtype=np.uint8)
    sbytes[0, 0], sbytes[2, 2], sbytes[1, 2] = 0, 254, 127  # smallest, largest (overflows to inf), unit
    ours = quant.dequant_fp8(wbytes.view(E4M3), sbytes.view(E8M0), np.float32)
    ref = ref_fp8_matrix(wbytes, sbytes)
    same_f32(ours, ref)
    assert np.isinf(ours[256:, 256:]).any()  # 2^127 · large values: inf, as the formula says
    # bf16: one rounding of the exact product (no underflow/overflow in this scale range)
    sbytes_mid = rng.integers(110, 140, (3, 3), dtype=np.uint8)
    wbytes[wbytes & 0x7F == 0x7F] = 0x10
    bf = quant.dequant_fp8(wbytes.view(E4M3), sbytes_mid.view(E8M0), ml_dtypes.bfloat16)
    want = ref_fp8_matrix(wbytes, sbytes_mid).astype(ml_dtypes.bfloat16)
    assert bf.dtype == np.dtype(ml_dtypes.bfloat16)
    assert np.array_equal(bf.view(np.uint16), want.view(np.uint16))


def test_fp8_tiles_use_their_own_scale():
    """A matrix of ones with a distinct scale per tile: each 128×128 block equals its own scale exactly."""
    ones = np.full((256, 384), 0x38, np.uint8)  # 0x38 = exponent 7, mantissa 0 = 1.0
    sbytes = (120 + np.arange(6, dtype=np.uint8)).reshape(2, 3)
    ours = quant.dequant_fp8(ones.view(E4M3), sbytes.view(E8M0))
    for r in range(2):
        for c in range(3):
            tile = ours[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128]
            assert np.all(tile == 2.0 ** (int(sbytes[r, c]) - 127))


# --------------------------------------------------------------------------------------------------------- FP4


@pytest.mark.parametrize("stored", [np.int8, np.uint8])
def test_fp4_every_nibble_pair_and_sign(stored):
    rng = np.random.default_rng(1)
    rows, half = 4, 64  # in = 128: four scale blocks per row
    packed = rng.integers(0, 256, (rows, half), dtype=np.uint8)
    packed[:, :] = np.arange(256, dtype=np.uint8).reshape(rows, half)  # all 256 (low, high) pairs, both signs
    sbytes = rng.integers(0, 255, (rows, 4), dtype=np.uint8)
    sbytes[0, :] = [0, 127, 254, 1]  # scale edge cases: 2^-127, 1, 2^127, 2^-126
    ours = quant.dequant_fp4(packed.view(stored), sbytes.view(E8M0), np.float32)
    same_f32(ours, ref_fp4_matrix(packed, sbytes))
    # every code shows up with its sign, -0 included (bit 3 set, value 0)
    unit = quant.dequant_fp4(packed.view(stored), np.full((rows, 4), 127, np.uint8).view(E8M0))
    assert set(np.unique(unit).tolist()) == {-6, -4, -3, -2, -1.5, -1, -0.5, 0, 0.5, 1, 1.5, 2, 3, 4, 6}
    # byte 0 -> columns (0, 1) = (+0, +0); byte 0x80 is element 128 -> row 2, byte 0: high nibble 8 = -0
    assert not np.signbit(unit[0, 0]) and not np.signbit(unit[0, 1])
    assert np.signbit(unit[2, 1]) and unit[2, 1] == 0


def test_fp4_matrix_with_several_scale_blocks():
    rng = np.random.default_rng(2)
    packed = rng.integers(0, 256, (300, 48), dtype=np.uint8).view(np.int8)  # in 96 = 3 blocks; > one row step
    sbytes = rng.integers(100, 160, (300, 3), dtype=np.uint8)
    ours = quant.dequant_fp4(packed, sbytes.view(E8M0))
    same_f32(ours, ref_fp4_matrix(packed.view(np.uint8), sbytes))


# ------------------------------------------------------------------------------------------------ checks, dispatch


def test_dequantize_dispatch_and_bad_pairs():
    rng = np.random.default_rng(3)
    fp8 = rng.integers(0, 0x70, (130, 200), dtype=np.uint8).view(E4M3)
    scale8 = np.full((2, 2), 127, np.uint8).view(E8M0)
    np.testing.assert_array_equal(quant.dequantize("a.weight", fp8, scale8), fp8.astype(np.float32))
    plain = np.ones((3, 3), np.float32)
    assert quant.dequantize("b.weight", plain, None) is plain
    for weight, scale, needles in (
        (fp8, None, ("a.weight", "F8_E4M3", "no scale", "a.scale")),
        (fp8, np.full((1, 2), 127, np.uint8).view(E8M0), ("a.scale", "[1, 2]", "[2, 2]")),
        (rng.integers(0, 256, (8, 16), dtype=np.uint8).view(np.int8), None, ("packed FP4", "no scale")),
        (
            rng.integers(0, 256, (8, 16), dtype=np.uint8).view(np.int8),
            np.full((8, 2), 127, np.uint8).view(E8M0),
            ("[8, 2]", "[8, 1]"),
        ),
    ):
        with pytest.raises(UsageError) as e:
            quant.dequantize("a.weight", weight, scale)
        assert "\n" not in str(e.value)
        for needle in needles:
            assert needle in str(e.value), (needle, str(e.value))
    with pytest.raises(UsageError, match="even last dimension"):
        quant.check_fp4_target("experts.w2", (8, 33))


def test_scale_siblings_names():
    keys = {"a.weight", "a.scale", "b.weight", "b.weight_scale_inv", "c.weight", "layers.0.hc_attn_scale"}
    assert quant.scale_key_of("a.weight", keys) == "a.scale"
    assert quant.scale_key_of("b.weight", keys) == "b.weight_scale_inv"
    assert quant.scale_key_of("c.weight", keys) is None
    assert quant.scale_key_of("layers.0.hc_attn_fn", keys) is None


def test_reader_reads_e8m0_scales(tmp_path):
    import safetensors.numpy

    scale = np.arange(6, dtype=np.uint8).view(E8M0).reshape(2, 3)
    (tmp_path / "ck").mkdir()
    safetensors.numpy.save_file({"x.scale": scale}, str(tmp_path / "ck" / "model.safetensors"))
    with open_checkpoint(str(tmp_path / "ck")) as r:
        assert r.spec("x.scale").safetensors_dtype == "F8_E8M0"
        assert r.read("x.scale").view(np.uint8).tolist() == [[0, 1, 2], [3, 4, 5]]


# ----------------------------------------------------------------------------------- V4 manifests (V4 §3.1, §4.2)

V4_MANIFESTS = ("deepseek-v4-flash", "deepseek-v4-flash-dspark", "deepseek-v4-pro", "deepseek-v4-pro-dspark")


@functools.lru_cache(maxsize=None)
def _specs(name):
    from conversion.reader import load_manifest, manifest_specs

    return manifest_specs(load_manifest(name))


def test_v4_manifest_counts_and_shapes():
    flash, dspark, pro = _specs("deepseek-v4-flash"), _specs("deepseek-v4-flash-dspark"), _specs("deepseek-v4-pro")
    assert (len(flash), len(dspark)) == (69187, 72317)  # V4 §3.1 header counts
    stage = [sum(k.startswith(f"mtp.{s}.") for k in dspark) for s in range(3)]
    assert stage == [1568, 1565, 1572]  # V4 §4.2
    assert sum(".experts." in k for k in dspark if k.startswith("mtp.1.")) == 1536
    assert flash["layers.0.attn.wq_a.scale"] == ((8, 32), "F8_E8M0")
    assert flash["layers.5.ffn.experts.17.w1.weight"] == ((2048, 2048), "I8")
    assert flash["layers.5.ffn.experts.17.w1.scale"] == ((2048, 128), "F8_E8M0")
    assert flash["layers.5.ffn.experts.17.w2.weight"] == ((4096, 1024), "I8")
    assert flash["layers.5.ffn.experts.17.w2.scale"] == ((4096, 64), "F8_E8M0")
    assert flash["layers.5.ffn.shared_experts.w1.scale"] == ((16, 32), "F8_E8M0")
    assert flash["layers.5.ffn.shared_experts.w2.scale"] == ((32, 16), "F8_E8M0")
    assert flash["layers.2.attn.compressor.ape"] == ((4, 1024), "F32")  # layer 2: ratio 4
    assert flash["layers.3.attn.compressor.ape"] == ((128, 512), "F32")  # layer 3: ratio 128
    assert "layers.0.attn.compressor.ape" not in flash and flash["layers.0.ffn.gate.tid2eid"][1] == "I64"
    assert flash["layers.3.ffn.gate.bias"] == ((256,), "F32") and "layers.3.ffn.gate.tid2eid" not in flash
    assert "mtp.0.e_proj.weight" in flash and "mtp.0.e_proj.weight" not in dspark  # legacy MTP vs DSpark
    assert dspark["mtp.0.main_proj.weight"] == ((4096, 12288), "F8_E4M3")
    assert dspark["mtp.0.main_proj.scale"] == ((32, 96), "F8_E8M0")
    assert dspark["mtp.2.confidence_head.proj.weight"] == ((1, 4352), "BF16")
    assert dspark["mtp.2.markov_head.markov_w1.weight"] == ((129280, 256), "BF16")
    assert pro["layers.0.attn.wo_a.weight"] == ((16384, 4096), "F8_E4M3")
    pro_dspark = _specs("deepseek-v4-pro-dspark")
    assert pro_dspark["mtp.0.main_proj.weight"][0] == (7168, 21504)
    assert pro_dspark["mtp.2.confidence_head.proj.weight"][0] == (1, 7680)


@pytest.mark.parametrize("name", V4_MANIFESTS)
def test_v4_manifest_scales_fit_their_weights(name):
    """Every quantised tensor has its scale, of the shape conversion.quant expects, and no scale is orphaned."""
    specs = _specs(name)
    from conversion.reader import DTYPES

    scales = {k for k in specs if k.endswith(".scale")}
    used = set()
    for key, (shape, dtype) in specs.items():
        if quant.is_quantized(DTYPES[dtype]) and not key.endswith("tid2eid"):
            scale = quant.scale_key_of(key, specs)
            scale_shape, scale_dtype = specs[scale] if scale else (None, None)
            problem = quant.check_pair(key, shape, DTYPES[dtype], scale, scale_shape, DTYPES.get(scale_dtype, "f4"))
            assert problem is None, problem
            used.add(scale)
    assert used == scales


def test_v4_manifest_is_covered_by_the_model_at_full_size():
    """Every target key of the Flash manifest maps onto the full-size DeepseekV4 built with nnx.eval_shape."""
    import math

    from flax import nnx

    from conversion.engine import plan
    from conversion.reader import DTYPES, TensorSpec, load_manifest

    try:
        from conversion.keymaps.deepseek_v4 import DEEPSEEK_V4_KEYMAP, DEEPSEEK_V4_SKIP, DeepseekV4Source
        from dspark_jax.configs import DeepseekV4Config
        from dspark_jax.models import DeepseekV4
    except ImportError as e:
        pytest.skip(f"the DeepSeek-V4 model or key map is not in the tree yet: {e}")

    class ManifestReader:
        def __init__(self, m):
            self._specs = {}
            for k, v in m["tensors"].items():
                dtype, shape = DTYPES[v["dtype"]], tuple(v["shape"])
                self._specs[k] = TensorSpec(k, shape, dtype, "", 0, math.prod(shape) * dtype.itemsize)

        def keys(self):
            return sorted(self._specs)

        def spec(self, key):
            return self._specs[key]

    from dspark_jax import memory_plan

    m = load_manifest("deepseek-v4-flash")
    config = DeepseekV4Config.from_hf_dict(m["config"])
    _, abstract = nnx.split(nnx.eval_shape(lambda: DeepseekV4(config, rngs=None)))
    found = plan(
        DeepseekV4Source(ManifestReader(m)), DEEPSEEK_V4_KEYMAP, abstract, source="flash", skip=DEEPSEEK_V4_SKIP
    )
    assert len(found) == len(list(abstract.flat_state()))
    n_params = sum(math.prod(v.get_value().shape) for _, v in abstract.flat_state())
    assert n_params == memory_plan.v4_param_count(m["config"])  # the plan's formula = the model's params


# -------------------------------------------------------------------------------------------- through the converter

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import tiny_qwen3_hf  # noqa: E402


@pytest.fixture(scope="module")
def quant_folders(tmp_path_factory):
    """A tiny Qwen3 folder whose q_proj (layer 0) is FP8 + scale and gate_proj (layer 1) packed FP4 + scale, and
    the dequantised matrices the converter must produce."""
    base, _ = tiny_qwen3_hf(tmp_path_factory.mktemp("q"), hidden=64, ffw=96, heads=4, kv_heads=2, head_dim=16)
    with open_checkpoint(str(base)) as r:
        tensors = {k: r.read(k) for k in r.keys()}
    rng = np.random.default_rng(4)
    q_bytes = rng.integers(0, 0x7F, (64, 64), dtype=np.uint8) | (rng.integers(0, 2, (64, 64), dtype=np.uint8) << 7)
    q_scale = rng.integers(118, 124, (1, 1), dtype=np.uint8)
    g_packed = rng.integers(0, 256, (96, 32), dtype=np.uint8)
    g_scale = rng.integers(118, 124, (96, 2), dtype=np.uint8)
    tensors["model.layers.0.self_attn.q_proj.weight"] = q_bytes.view(E4M3)
    tensors["model.layers.0.self_attn.q_proj.scale"] = q_scale.view(E8M0)
    tensors["model.layers.1.mlp.gate_proj.weight"] = g_packed.view(np.int8)
    tensors["model.layers.1.mlp.gate_proj.weight_scale_inv"] = g_scale.view(E8M0)
    folder = tmp_path_factory.mktemp("quantised") / "ck"
    folder.mkdir()
    for f in os.listdir(base):
        if f.endswith(".json"):
            (folder / f).write_bytes((base / f).read_bytes())
    save_safetensors(str(folder / "model.safetensors"), tensors)
    want = {"q": ref_fp8_matrix(q_bytes, q_scale), "gate": ref_fp4_matrix(g_packed, g_scale)}
    return folder, tensors, want


def test_quantised_checkpoint_loads_dequantised(quant_folders):
    import dspark_jax as dj

    folder, _, want = quant_folders
    target = dj.load_target(str(folder), dtype="float32")
    q = np.asarray(target.state["layers"][0]["self_attn"]["q_proj"][...])  # [hidden, heads, head_dim]
    same_f32(q.reshape(64, 64).T.copy(), want["q"])
    gate = np.asarray(target.state["layers"][1]["mlp"]["gate_proj"][...])  # [hidden, ffw]
    same_f32(gate.T.copy(), want["gate"])
    bf = dj.load_target(str(folder), dtype="bfloat16")
    gate_bf = np.asarray(bf.state["layers"][1]["mlp"]["gate_proj"][...])
    assert np.array_equal(gate_bf.T.view(np.uint16), want["gate"].astype(ml_dtypes.bfloat16).view(np.uint16))


def _variant(quant_folders, tmp_path, change):
    folder, tensors, _ = quant_folders
    tensors = dict(tensors)
    change(tensors)
    out = tmp_path / "src"
    out.mkdir()
    for f in os.listdir(folder):
        if f.endswith(".json"):
            (out / f).write_bytes((folder / f).read_bytes())
    save_safetensors(str(out / "model.safetensors"), tensors)
    return out


Q = "model.layers.0.self_attn.q_proj."
G = "model.layers.1.mlp.gate_proj."


@pytest.mark.parametrize(
    "name, change, needles",
    [
        ("no_scale", lambda t: t.pop(Q + "scale"), ("q_proj.weight", "no scale")),
        (
            "scale_shape",
            lambda t: t.__setitem__(Q + "scale", np.full((2, 1), 127, np.uint8).view(E8M0)),
            ("q_proj.scale", "[2, 1]", "[1, 1]"),
        ),
        (
            "nan_scale",
            lambda t: t.__setitem__(G + "weight_scale_inv", np.full((96, 2), 0xFF, np.uint8).view(E8M0)),
            ("gate_proj", "NaN", "0xFF"),
        ),
        (
            "packed_shape",
            lambda t: t.__setitem__(G + "weight", np.zeros((96, 31), np.int8)),
            ("gate_proj.weight", "[96, 62]", "[96, 64]"),
        ),
    ],
)
def test_bad_quantised_input_is_one_line_exit_2_nothing_written(quant_folders, tmp_path, capsys, name, change, needles):
    from conversion import convert

    src = _variant(quant_folders, tmp_path, change)
    out = tmp_path / "out"
    out.mkdir()
    assert convert.main(["--src", str(src), "--dst", str(out / "ckpt"), "--dtype", "float32"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert os.listdir(out) == []


def test_fp4_target_with_odd_last_dimension(tmp_path):
    """A packed FP4 tensor for a param whose input width is odd: refused before reading anything."""
    from conversion import convert

    base, _ = tiny_qwen3_hf(tmp_path, hidden=64, ffw=95, heads=4, kv_heads=2, head_dim=16, layers=1)
    with open_checkpoint(str(base)) as r:
        tensors = {k: r.read(k) for k in r.keys()}
    tensors["model.layers.0.mlp.down_proj.weight"] = np.zeros((64, 48), np.int8)
    tensors["model.layers.0.mlp.down_proj.scale"] = np.full((64, 3), 127, np.uint8).view(E8M0)
    save_safetensors(str(base / "model.safetensors"), tensors)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DSparkError) as e:
        convert.convert_checkpoint(str(base), str(out / "ckpt"))
    assert "\n" not in str(e.value) and "odd last dimension" in str(e.value) and "down_proj" in str(e.value)
    assert os.listdir(out) == []


# ------------------------------------------------------------------------- a conversion killed midway (DST.tmp-*)

_KILL_DURING_SAVE = """
import os, signal, sys
import orbax.checkpoint as ocp
def save(self, path, *args, **kwargs):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "half_written"), "wb") as f:
        f.write(b"x" * 4096)
    os.kill(os.getpid(), signal.SIGKILL)
ocp.StandardCheckpointer.save = save
from conversion import convert
sys.exit(convert.main(sys.argv[1:]))
"""


def test_killed_conversion_leaves_tmp_folder_that_the_next_run_removes(quant_folders, tmp_path):
    import subprocess
    import sys
    import warnings

    from conversion import convert

    src = quant_folders[0]
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "ckpt"
    argv = ["--src", str(src), "--dst", str(dst), "--dtype", "float32"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, *argv], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    left = os.listdir(out)
    assert len(left) == 1 and left[0].startswith("ckpt.tmp-"), left  # --dst untouched, the partial folder beside it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert convert.main(argv) == 0
    said = [str(w.message) for w in caught if left[0] in str(w.message)]
    assert len(said) == 1 and said[0].startswith(f"removed {left[0]}") and "cannot be resumed" in said[0], said
    assert os.listdir(out) == ["ckpt"]


def test_tmp_folder_of_a_live_conversion_is_left_alone(quant_folders, tmp_path):
    import warnings

    from conversion import convert
    from conversion.engine import claim_destination

    out = tmp_path / "out"
    (out / "ckpt.tmp-live0001").mkdir(parents=True)
    (out / "ckpt.tmp-live0001" / "data").write_bytes(b"y" * 100)
    other = claim_destination(str(out / "other"))  # another conversion writing into the same folder
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert convert.main(["--src", str(quant_folders[0]), "--dst", str(out / "ckpt"), "--dtype", "float32"]) == 0
    finally:
        other.release()
    said = [str(w.message) for w in caught if "ckpt.tmp-live0001" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("left ckpt.tmp-live0001") and "alone" in said[0], said
    assert sorted(os.listdir(out)) == ["ckpt", "ckpt.tmp-live0001"]


def test_sliceable_source_builds_only_the_local_shards(quant_folders):
    """A reader view that offers read_slice is asked for each device's slice, never for the whole tensor."""
    from conversion.engine import convert_state
    from conversion.keymaps import KEYMAPS
    from conversion.loader import abstract_model
    from dspark_jax.configs import Qwen3Config, read_config_json
    from dspark_jax.models import Qwen3
    from dspark_jax.sharding import make_mesh

    folder = quant_folders[0]
    asked = []

    class View:
        def __init__(self, reader):
            self._r = reader

        def keys(self):
            return self._r.keys()

        def spec(self, key):
            return self._r.spec(key)

        def read(self, key):
            assert key != "model.embed_tokens.weight", "the sliceable key was read whole"
            return self._r.read(key)

        def sliceable(self, key):
            return key == "model.embed_tokens.weight"

        def read_slice(self, key, index, dtype):
            asked.append(index)
            return self._r.read(key)[index].astype(dtype)

    config = Qwen3Config.from_hf_dict(read_config_json(str(folder))).with_dtype("float32")
    _, abstract = abstract_model(Qwen3, config)
    mesh = make_mesh("data=2,model=2")
    with open_checkpoint(str(folder)) as reader:
        want = reader.read("model.embed_tokens.weight")
        state = convert_state(View(reader), KEYMAPS["qwen3"], abstract, source="view", mesh=mesh, progress=False)
    embed = state["embed_tokens"][...]
    np.testing.assert_array_equal(np.asarray(embed), want)
    vocab = want.shape[0]
    assert asked and all(idx[0].stop - idx[0].start == vocab // 2 for idx in asked)  # vocab split over model=2


def test_legacy_mtp_checkpoint_is_refused_as_a_draft(tmp_path):
    """A V4 base checkpoint (legacy MTP block mtp.0 with e_proj) offered as a DSpark draft: one-line UsageError."""
    import json

    import dspark_jax as dj
    from conversion.reader import load_manifest

    folder = tmp_path / "v4_base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(load_manifest("deepseek-v4-flash")["config"]))
    save_safetensors(str(folder / "model.safetensors"), {"mtp.0.e_proj.weight": np.zeros((4, 4), np.float32)})
    with pytest.raises(UsageError) as e:
        dj.load_draft(str(folder), target=None)
    msg = str(e.value)
    assert "\n" not in msg and "legacy MTP" in msg and "mtp.0.e_proj" in msg and "DSpark" in msg


def test_mesh_load_reads_only_each_shards_rows(quant_folders):
    """On a mesh every param is read shard by shard (only the rows each device holds; FP8 in whole 128-row tiles,
    packed FP4 row by row, each with its scale rows). The result equals the unsharded load."""
    from conversion.engine import convert_state
    from conversion.keymaps import KEYMAPS
    from conversion.loader import abstract_model
    from dspark_jax.configs import Qwen3Config, read_config_json
    from dspark_jax.models import Qwen3
    from dspark_jax.sharding import make_mesh

    folder = quant_folders[0]
    whole, rows = [], []

    class Counting:
        def __init__(self, reader):
            self._r = reader

        def keys(self):
            return self._r.keys()

        def spec(self, key):
            return self._r.spec(key)

        def read(self, key):
            whole.append(key)
            return self._r.read(key)

        def read_rows(self, key, start, stop):
            rows.append((key, start, stop))
            return self._r.read_rows(key, start, stop)

    config = Qwen3Config.from_hf_dict(read_config_json(str(folder))).with_dtype("float32")
    _, abstract = abstract_model(Qwen3, config)
    with open_checkpoint(str(folder)) as reader:
        sharded = convert_state(
            Counting(reader), KEYMAPS["qwen3"], abstract, source="x", mesh=make_mesh("data=2,model=2"), progress=False
        )
        plain = convert_state(reader, KEYMAPS["qwen3"], abstract, source="x", progress=False)
    for (path, a), (_, b) in zip(sharded.flat_state(), plain.flat_state()):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    assert set(whole) == {
        "model.layers.0.self_attn.o_proj.weight",  # heads_out: its heads are source columns, not rows
        "model.layers.1.self_attn.o_proj.weight",
    }
    q_rows = {(key.rsplit(".", 1)[1], a, b) for key, a, b in rows if "layers.0.self_attn.q_proj" in key}
    assert q_rows == {("weight", 0, 64), ("scale", 0, 1)}  # FP8: 64 rows are part of one tile, read the tile
    g_rows = {(key.rsplit(".", 1)[1], a, b) for key, a, b in rows if "layers.1.mlp.gate_proj" in key}
    assert g_rows == {(n, a, b) for n in ("weight", "weight_scale_inv") for a, b in ((0, 48), (48, 96))}  # FP4 rows
    k_rows = [(a, b) for key, a, b in rows if key == "model.layers.1.self_attn.k_proj.weight"]
    assert sorted(set(k_rows)) == [(0, 16), (16, 32)]  # 2 kv heads of 16 rows over model=2
    up_rows = {(a, b) for key, a, b in rows if key == "model.layers.0.mlp.up_proj.weight"}
    assert up_rows == {(0, 48), (48, 96)}  # ffw 96 over model=2
