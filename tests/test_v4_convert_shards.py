"""DeepSeek-V4 conversion shard by shard (V4 §3.2, §3.4): on a mesh each shard of a stacked expert tensor reads and
dequantises only its own experts (and, split along the stored rows, only those rows), an FP8 matrix split by rows
reads only its 128-row tiles, and the params are bit-identical to the one-device conversion and to the whole-tensor
path (stack every expert in f32, then cast). `tid2eid` loads as integers."""

import json
import re

import jax
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "DeepseekV4ForCausalLM"):
    pytest.skip("this transformers has no DeepseekV4ForCausalLM (needs >= 5.8.1)", allow_module_level=True)

from test_deepseek_v4 import TINY, native_tensors, tiny_v4_hf  # noqa: E402
from test_quant import E4M3, E8M0  # noqa: E402

from conversion.engine import convert_state  # noqa: E402
from conversion.keymaps.deepseek_v4 import DEEPSEEK_V4_KEYMAP, DEEPSEEK_V4_SKIP, DeepseekV4Source  # noqa: E402
from conversion.loader import abstract_model  # noqa: E402
from conversion.reader import open_checkpoint, save_safetensors  # noqa: E402
from dspark_jax.configs import DeepseekV4Config  # noqa: E402
from dspark_jax.errors import DSparkError  # noqa: E402
from dspark_jax.models.deepseek_v4 import DeepseekV4  # noqa: E402
from dspark_jax.sharding import make_mesh  # noqa: E402

EXPERTS, HIDDEN, FFW = TINY["n_routed_experts"], TINY["hidden_size"], TINY["moe_intermediate_size"]
MEMBER = re.compile(r"layers\.(\d+)\.ffn\.experts\.(\d+)\.(w[123])\.(weight|scale)")


def _fp4(rng, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Random packed FP4 [rows, cols/2] (every nibble, both signs) and its E8M0 scales [rows, cols/32]."""
    codes = rng.integers(0, 16, (rows, cols)).astype(np.uint8)
    scale = rng.integers(120, 130, (rows, cols // 32)).astype(np.uint8)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.int8), scale.view(E8M0)


def _fp8(rng, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Random FP8 e4m3 [rows, cols] (no NaN byte) and one E8M0 scale per 128x128 tile, each tile its own."""
    bits = rng.integers(0, 0x7F, (rows, cols), dtype=np.uint8) | (rng.integers(0, 2, (rows, cols), dtype=np.uint8) << 7)
    scale = rng.choice(np.arange(118, 130, dtype=np.uint8), (-(-rows // 128), -(-cols // 128)), replace=False)
    return bits.view(E4M3), scale.view(E8M0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny V4 (V4 §6.1) in native names with every layer's w1 / w2 experts packed FP4, w3 left f32, and FP8
    matrices: head [256, 64] (two row tiles), wq_a [32, 64] (a partial tile), wq_b [128, 32] (heads_in)."""
    base = tmp_path_factory.mktemp("v4hf")
    tiny_v4_hf(base)
    tensors = native_tensors(base)
    rng = np.random.default_rng(11)
    for key in [k for k in tensors if MEMBER.fullmatch(k) and not k.endswith("w3.weight")]:
        rows, cols = tensors[key].shape
        tensors[key], tensors[key.replace(".weight", ".scale")] = _fp4(rng, rows, cols)
    for key in ("head.weight", "layers.0.attn.wq_a.weight", "layers.1.attn.wq_b.weight"):
        rows, cols = tensors[key].shape
        tensors[key], tensors[key.replace(".weight", ".scale")] = _fp8(rng, rows, cols)
    assert tensors["head.weight"].shape == (256, 64) and tensors["head.scale"].shape == (2, 1)
    out = tmp_path_factory.mktemp("v4native")
    save_safetensors(str(out / "model.safetensors"), tensors)
    (out / "config.json").write_text(json.dumps(TINY))
    return out


class Counting:
    """A SafetensorsReader wrapper that logs every read: ('read', key) or ('rows', key, start, stop), into `log`."""

    def __init__(self, reader):
        self._r = reader
        self.log: list[tuple] = []

    def keys(self):
        return self._r.keys()

    def __contains__(self, key):
        return key in self._r

    def spec(self, key):
        return self._r.spec(key)

    def read(self, key):
        self.log.append(("read", key))
        return self._r.read(key)

    def read_rows(self, key, start, stop):
        self.log.append(("rows", key, start, stop))
        return self._r.read_rows(key, start, stop)

    def close(self):
        pass


class Spy(DeepseekV4Source):
    """The V4 view, recording for each `read_slice` call its index ranges and the reads it made."""

    def __init__(self, counting: Counting):
        super().__init__(counting)
        self.counting = counting
        self.slices: list[tuple[str, tuple, list]] = []

    def read_slice(self, key, index, dtype):
        start = len(self.counting.log)
        out = super().read_slice(key, index, dtype)
        shape = self.spec(key).shape
        ranges = tuple(s.indices(n)[:2] for s, n in zip(index, shape))
        self.slices.append((key, ranges, self.counting.log[start:]))
        return out


class Whole:
    """The V4 view without `sliceable` / `read_rows`: every stacked tensor is read whole in f32 (the older path)."""

    def __init__(self, view):
        self._v = view

    def keys(self):
        return self._v.keys()

    def spec(self, key):
        return self._v.spec(key)

    def read(self, key):
        return self._v.read(key)


def convert(folder, view, dtype: str, mesh=None):
    config = DeepseekV4Config.from_hf_dict(json.loads((folder / "config.json").read_text())).with_dtype(dtype)
    _, abstract = abstract_model(DeepseekV4, config)
    return convert_state(
        view, DEEPSEEK_V4_KEYMAP, abstract, source="v4", mesh=mesh, skip=DEEPSEEK_V4_SKIP, progress=False
    )


def _bits(state) -> dict:
    """{path: (dtype, shape, bytes)} of every param, gathered to the host."""
    out = {}
    for path, var in state.flat_state():
        a = np.asarray(var.get_value())
        out[path] = (a.dtype, a.shape, a.tobytes())
    return out


@pytest.fixture(scope="module")
def reference(folder):
    """bf16 params by the whole-tensor path, on one device."""
    with open_checkpoint(str(folder)) as r:
        return _bits(convert(folder, Whole(DeepseekV4Source(r)), "bfloat16"))


def _same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for path in want:
        assert got[path][:2] == want[path][:2], path
        assert got[path][2] == want[path][2], f"{path} differs"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_one_device_slices_equal_the_whole_tensor_path(folder, reference, dtype):
    """Without a mesh the view builds each stacked tensor straight in the param dtype: same bits as stacking in f32
    and casting after (one rounding either way)."""
    with open_checkpoint(str(folder)) as r:
        got = _bits(convert(folder, DeepseekV4Source(r), dtype))
        want = reference if dtype == "bfloat16" else _bits(convert(folder, Whole(DeepseekV4Source(r)), dtype))
    _same(got, want)
    tid2eid = got[("layers", 0, "ffn", "tid2eid")]
    assert tid2eid[0] == np.int32


@pytest.mark.parametrize("spec", ["expert=4", "expert=2,model=2"])
def test_mesh_shards_read_only_their_experts_and_rows(folder, reference, spec):
    """On a 4-device mesh the params equal the one-device ones bit for bit, every stacked-expert shard reads only
    its own experts (each expert's FP4 rows / scale rows of the shard when `model` splits the stored rows), no
    expert is ever read whole, and the FP8 head split over `model` reads only its own 128-row tile."""
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 devices (conftest forces 4 CPU devices)")
    mesh = make_mesh(spec)
    n_exp, n_model = mesh.shape["expert"], mesh.shape["model"]
    with open_checkpoint(str(folder)) as r:
        counting = Counting(r)
        view = Spy(counting)
        state = convert(folder, view, "bfloat16", mesh)
        _same(_bits(state), reference)
        gate = state["layers"][2]["ffn"]["gate_proj"][...]
        assert gate.sharding.spec[0] == "expert" and len(gate.addressable_shards) == 4
    assert not [e for e in counting.log if e[0] == "read" and MEMBER.fullmatch(e[1])], "an expert was read whole"
    stacked = [name for name in view.keys() if view.sliceable(name)]
    assert len(stacked) == 3 * TINY["num_hidden_layers"]
    per_key: dict[str, set] = {}
    for key, (experts, ins, outs), reads in view.slices:
        per_key.setdefault(key, set()).add((experts, ins, outs))
        touched = {(int(m[2]), m[3], m[4]) for e in reads if (m := MEMBER.fullmatch(e[1]))}
        layer, part = key.split(".")[1], key.rsplit(".", 1)[1]
        assert all(e[1].startswith(f"layers.{layer}.ffn.experts.") for e in reads), reads
        assert {t[0] for t in touched} == set(range(*experts)), (key, experts, touched)
        assert {t[1] for t in touched} == {part}
        for e in reads:  # FP4 experts: exactly the stored rows (= the view's last dim) of the shard, scales too
            assert e[0] == "rows" and (e[2], e[3]) == outs, (key, outs, e)
        assert len(reads) == (experts[1] - experts[0]) * (1 if part == "w3" else 2)
    ffw_split = {"w1": (1, n_model), "w3": (1, n_model), "w2": (n_model, 1)}
    for key, shards in per_key.items():  # each distinct shard built once: no read is repeated
        split_in, split_out = ffw_split[key.rsplit(".", 1)[1]]
        assert len(shards) == n_exp * n_model, (key, shards)
        assert {s[0] for s in shards} == {(i * EXPERTS // n_exp, (i + 1) * EXPERTS // n_exp) for i in range(n_exp)}
        assert len({s[1] for s in shards}) == split_in and len({s[2] for s in shards}) == split_out
    head = [e for e in counting.log if e[1] in ("head.weight", "head.scale")]
    assert not [e for e in head if e[0] == "read"], head
    if n_model == 2:  # vocab over model: each shard one 128-row tile and its scale row
        assert sorted(e[1:] for e in head) == [
            ("head.scale", 0, 1),
            ("head.scale", 1, 2),
            ("head.weight", 0, 128),
            ("head.weight", 128, 256),
        ]


def test_tid2eid_loads_as_integers_and_ids_that_do_not_fit_are_refused(folder, tmp_path):
    """The view keeps tid2eid's integer dtype (int64 in the file); the engine casts to the int32 param and refuses
    ids that int32 cannot hold, naming the key; float params still refuse integer tensors."""
    with open_checkpoint(str(folder)) as r:
        view = DeepseekV4Source(r)
        stored = r.read("layers.0.ffn.gate.tid2eid")
        assert view.spec("layers.0.ffn.gate.tid2eid").dtype == stored.dtype and stored.dtype.kind == "i"
        state = convert(folder, view, "float32")
        np.testing.assert_array_equal(np.asarray(state["layers"][0]["ffn"]["tid2eid"][...]), stored)
        tensors = {k: r.read(k) for k in r.keys()}
    bad = dict(tensors)
    bad["layers.1.ffn.gate.tid2eid"] = stored.astype(np.int64) + 2**33
    bad["layers.2.ffn.gate.bias"] = tensors["layers.2.ffn.gate.bias"].astype(np.int32)
    save_safetensors(str(tmp_path / "model.safetensors"), bad)
    with open_checkpoint(str(tmp_path)) as r, pytest.raises(DSparkError) as e:
        convert(folder, DeepseekV4Source(r), "float32")
    assert "layers.2.ffn.gate.bias has dtype int32, expected a float" in str(e.value)
    bad["layers.2.ffn.gate.bias"] = tensors["layers.2.ffn.gate.bias"]
    save_safetensors(str(tmp_path / "model.safetensors"), bad)
    with open_checkpoint(str(tmp_path)) as r, pytest.raises(DSparkError) as e:
        convert(folder, DeepseekV4Source(r), "float32")
    msg = str(e.value)
    assert "\n" not in msg and "layers.1.ffn.gate.tid2eid" in msg and "int32" in msg


def test_fp8_rows_equal_the_whole_matrix_rows():
    """quant.read_dequantized_rows of an FP8 matrix with partial tiles (300 x 200: 3 x 2 tiles) reads whole
    128-row tiles and equals the whole matrix's rows bit for bit, for any row range and dtype."""
    from conversion import quant

    rng = np.random.default_rng(5)
    weight, scale = _fp8(rng, 300, 200)
    tensors = {"w.weight": weight, "w.scale": scale}

    class Mem:
        log: list = []

        def spec(self, key):
            from conversion.reader import TensorSpec

            a = tensors[key]
            return TensorSpec(key, a.shape, a.dtype, "", 0, a.nbytes)

        def read(self, key):
            return tensors[key].copy()

        def read_rows(self, key, a, b):
            self.log.append((key, a, b))
            return tensors[key][a:b].copy()

    for dtype in (np.float32, ml_dtypes.bfloat16):
        whole = quant.read_dequantized(Mem(), "w.weight", "w.scale", dtype)
        for start, stop in ((0, 300), (5, 7), (127, 129), (128, 256), (250, 300), (40, 40)):
            Mem.log.clear()
            got = quant.read_dequantized_rows(Mem(), "w.weight", "w.scale", start, stop, dtype)
            assert got.dtype == whole.dtype and got.tobytes() == whole[start:stop].tobytes(), (start, stop)
            (_, a, b), (_, sa, sb) = sorted(Mem.log, key=lambda e: e[0], reverse=True)
            assert (
                a == start // 128 * 128
                and b == min(-(-stop // 128) * 128, 300)
                and (sa, sb) == (a // 128, -(-b // 128))
            )
