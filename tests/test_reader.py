"""Tests for conversion/reader.py: safetensors read/write round trips, interop with the official library,
sharded folders, one-line errors on bad checkpoints, streaming reads, and the committed key manifests."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import builtins
import gzip
import importlib.util
import io
import json
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from safetensors import safe_open

from conversion.reader import (
    DTYPES,
    MANIFEST_DIR,
    SafetensorsReader,
    TensorSpec,
    list_manifests,
    load_manifest,
    manifest_specs,
    open_checkpoint,
    save_safetensors,
    write_manifest,
)
from dspark_jax.errors import DSparkError, UsageError

torch.set_num_threads(1)

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}


def random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.dtype(bool):
        return rng.random(shape) > 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)  # ml_dtypes types cast from float64 like numpy ones


def bits(a: np.ndarray) -> bytes:
    """Raw bytes, so NaNs and -0.0 in float8 / bf16 compare exactly."""
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)


def torch_to_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return t.reshape(-1).contiguous().view(torch.uint8).numpy().view(dtype).reshape(tuple(t.shape))


def one_line_error(excinfo: pytest.ExceptionInfo, *needles: str) -> str:
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, DSparkError)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def all_dtype_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {f"t.{name}": random_array(rng, dtype, (3, 5)) for name, dtype in DTYPES.items()}
    out["scalar"] = np.array(2.5, dtype=ml_dtypes.bfloat16)  # shape ()
    out["empty"] = np.zeros((0, 4), dtype=np.float32)  # zero bytes of data
    out["odd"] = random_array(rng, np.dtype(np.int8), (7,))  # 7 bytes: the next tensor starts unaligned
    return out


def write_single(folder, tensors, name="model.safetensors", metadata=None):
    folder.mkdir(exist_ok=True)
    save_safetensors(str(folder / name), tensors, metadata)
    return folder


# ---------------------------------------------------------------------------------------------------- round trips


def test_round_trip_every_dtype(tmp_path):
    tensors = all_dtype_tensors()
    write_single(tmp_path / "ck", tensors, metadata={"format": "np", "note": "x"})
    with open_checkpoint(str(tmp_path / "ck")) as reader:
        assert reader.keys() == sorted(tensors)
        assert reader.metadata == {"format": "np", "note": "x"}
        assert reader.nbytes == sum(a.nbytes for a in tensors.values())
        assert [k for k, _ in reader] == reader.keys()
        for key, arr in tensors.items():
            spec = reader.spec(key)
            assert isinstance(spec, TensorSpec)
            assert (spec.shape, spec.dtype, spec.file) == (arr.shape, arr.dtype, "model.safetensors")
            out = reader.read(key)
            assert_same(out, arr)
            assert out.flags.c_contiguous and out.flags.owndata and out.flags.writeable
        assert reader.spec("t.BF16").safetensors_dtype == "BF16"
    # Closing releases the handles; a later read reopens the file.
    assert_same(reader.read("t.F32"), tensors["t.F32"])
    reader.close()


def test_written_layout_is_aligned_sorted_contiguous(tmp_path):
    tensors = all_dtype_tensors()
    path = tmp_path / "x.safetensors"
    save_safetensors(str(path), tensors)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header_text = raw[8 : 8 + n].decode()
    assert header_text.rstrip(" ").endswith("}") and len(header_text) - len(header_text.rstrip(" ")) < 8
    header = json.loads(header_text)
    names = [k for k in header if k != "__metadata__"]
    assert names == sorted(tensors)
    end = 0
    for k in names:
        begin, stop = header[k]["data_offsets"]
        assert begin == end
        end = stop
    assert 8 + n + end == len(raw)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # temp file was renamed, not left behind


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_safetensors(str(path), {"a": np.ones(3, np.float32)})
    before = path.read_bytes()
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        save_safetensors(str(path), {"a": np.zeros(3, np.float32)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(UsageError) as e:
        save_safetensors(str(tmp_path / "a.safetensors"), {"c": np.zeros(2, np.complex64)})
    one_line_error(e, "complex64", "BF16")
    with pytest.raises(UsageError) as e:
        save_safetensors(str(tmp_path / "nope" / "a.safetensors"), {"a": np.zeros(2)})
    one_line_error(e, "does not exist")
    with pytest.raises(UsageError) as e:
        save_safetensors(str(tmp_path / "a.safetensors"), {"a": np.zeros(2)}, {"k": 3})
    one_line_error(e, "metadata")


def test_big_endian_input_is_stored_little_endian(tmp_path):
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    write_single(tmp_path / "ck", {"a": arr})
    with open_checkpoint(str(tmp_path / "ck")) as r:
        np.testing.assert_array_equal(r.read("a"), arr)
        assert r.spec("a").dtype == np.dtype("<i4")


# ------------------------------------------------------------------------------------ interop with `safetensors`


def test_official_library_reads_our_files(tmp_path):
    tensors = all_dtype_tensors()
    path = str(tmp_path / "model.safetensors")
    save_safetensors(path, tensors, {"format": "pt"})
    loaded = safetensors.torch.load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for key, arr in tensors.items():
        assert tuple(loaded[key].shape) == arr.shape
        if key.startswith("t."):
            assert loaded[key].dtype == TORCH_DTYPES[key[2:]]
        assert_same(torch_to_numpy(loaded[key], arr.dtype), arr)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        assert_same(torch_to_numpy(f.get_tensor("t.BF16"), tensors["t.BF16"].dtype), tensors["t.BF16"])
    # numpy has no native bf16/float8, so check the numpy frontend on the plain dtypes only.
    with safe_open(path, framework="numpy") as f:
        for name in ("F64", "F32", "F16", "I64", "I8", "U8", "BOOL"):
            assert_same(f.get_tensor(f"t.{name}"), tensors[f"t.{name}"])


def test_we_read_official_numpy_files(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {
        f"n.{name}": random_array(rng, DTYPES[name], (4, 2, 3))
        for name in ("F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL")
    }
    (tmp_path / "ck").mkdir()
    safetensors.numpy.save_file(tensors, str(tmp_path / "ck" / "model.safetensors"), metadata={"a": "b"})
    with open_checkpoint(str(tmp_path / "ck")) as r:
        assert r.metadata == {"a": "b"}
        for key, arr in tensors.items():
            assert_same(r.read(key), arr)


def test_we_read_official_torch_files(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "bf16": torch.randn(5, 7).to(torch.bfloat16),
        "f8e4": torch.randn(3, 4).to(torch.float8_e4m3fn),
        "f8e5": torch.randn(3, 4).to(torch.float8_e5m2),
        "f32": torch.randn(2, 3, 4),
        "i64": torch.arange(10),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5, dtype=torch.float16),
    }
    (tmp_path / "ck").mkdir()
    safetensors.torch.save_file(tensors, str(tmp_path / "ck" / "weights.safetensors"))
    with open_checkpoint(str(tmp_path / "ck")) as r:
        assert r.keys() == sorted(tensors)
        for key, t in tensors.items():
            out = r.read(key)
            assert out.shape == tuple(t.shape)
            assert_same(out, torch_to_numpy(t, out.dtype))
        assert r.spec("bf16").dtype == np.dtype(ml_dtypes.bfloat16)
        assert r.spec("f8e4").dtype == np.dtype(ml_dtypes.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------------- sharding


def make_sharded(folder, shards: dict[str, dict[str, np.ndarray]], weight_map=None):
    folder.mkdir(exist_ok=True)
    for name, tensors in shards.items():
        save_safetensors(str(folder / name), tensors)
    if weight_map is None:
        weight_map = {k: name for name, tensors in shards.items() for k in tensors}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def test_sharded_folder(tmp_path):
    a = {"model.embed_tokens.weight": np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)}
    b = {"model.norm.weight": np.ones(4, ml_dtypes.bfloat16), "lm_head.weight": np.full((3, 4), 2, np.float32)}
    folder = make_sharded(
        tmp_path / "ck", {"model-00001-of-00002.safetensors": a, "model-00002-of-00002.safetensors": b}
    )
    (folder / "pytorch_model.bin").write_bytes(b"ignored when safetensors exist")
    with open_checkpoint(str(folder)) as r:
        assert r.keys() == sorted({**a, **b})
        assert r.files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert r.spec("lm_head.weight").file == "model-00002-of-00002.safetensors"
        for key, arr in {**a, **b}.items():
            assert_same(r.read(key), arr)
        assert isinstance(r, SafetensorsReader) and "2 file(s)" in repr(r)


def test_single_file_with_other_name_and_pickle_next_to_it(tmp_path):
    folder = write_single(tmp_path / "ck", {"w": np.eye(2, dtype=np.float16)}, name="consolidated.safetensors")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04garbage")
    with open_checkpoint(str(folder)) as r:
        assert r.keys() == ["w"]


# ---------------------------------------------------------------------------------------------------- bad inputs


def test_missing_folder(tmp_path):
    with pytest.raises(UsageError) as e:
        open_checkpoint(str(tmp_path / "absent"))
    one_line_error(e, "absent", "does not exist")


def test_path_is_a_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_safetensors(str(path), {"a": np.zeros(1)})
    with pytest.raises(UsageError) as e:
        open_checkpoint(str(path))
    one_line_error(e, "not a directory")


def test_empty_folder(tmp_path):
    with pytest.raises(UsageError) as e:
        open_checkpoint(str(tmp_path))
    one_line_error(e, str(tmp_path), "no *.safetensors")


def test_several_files_without_index(tmp_path):
    for n in ("a", "b"):
        save_safetensors(str(tmp_path / f"{n}.safetensors"), {n: np.zeros(1)})
    with pytest.raises(UsageError) as e:
        open_checkpoint(str(tmp_path))
    one_line_error(e, "model.safetensors.index.json")


def test_pickle_only_folder_is_refused_without_opening_it(tmp_path, monkeypatch):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04\x95garbage that is not a pickle")
    opened = []
    real_open = builtins.open

    def spy_open(file, *args, **kwargs):
        opened.append(os.fspath(file) if not isinstance(file, int) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(UsageError) as e:
        open_checkpoint(str(tmp_path))
    one_line_error(e, "pytorch_model.bin", "pickle", "never loaded", "safetensors")
    assert not [p for p in opened if str(p).endswith(".bin")]


def test_truncated_file(tmp_path):
    folder = write_single(tmp_path / "ck", {"a": np.ones((4, 4), np.float32), "z": np.ones((8,), np.float32)})
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DSparkError) as e:
        open_checkpoint(str(folder))
    one_line_error(e, "model.safetensors", "'z'", "truncated")


def test_file_truncated_after_open(tmp_path):
    folder = write_single(tmp_path / "ck", {"a": np.ones((4, 4), np.float32)})
    reader = open_checkpoint(str(folder))
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DSparkError) as e:
        reader.read("a")
    one_line_error(e, "'a'", "truncated")
    reader.close()


@pytest.mark.parametrize(
    "kind", ["garbage", "bad_json", "huge_length", "length_past_end", "too_short", "not_object", "duplicate_name"]
)
def test_corrupt_header(tmp_path, kind):
    if kind == "garbage":
        data = b"this is certainly not a safetensors file" * 4
    elif kind == "bad_json":
        body = b'{"a": {"dtype": "F32", "shape": [1], '
        data = len(body).to_bytes(8, "little") + body + b"\0" * 4
    elif kind == "huge_length":
        data = (2**40).to_bytes(8, "little") + b"{}"
    elif kind == "length_past_end":
        data = (1000).to_bytes(8, "little") + b"{}"
    elif kind == "duplicate_name":
        entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
        body = f'{{"a": {entry}, "a": {entry}}}'.encode()
        data = len(body).to_bytes(8, "little") + body + b"\0"
    elif kind == "too_short":
        data = b"\x02\0\0"
    else:
        data = (2).to_bytes(8, "little") + b"[]"
    (tmp_path / "model.safetensors").write_bytes(data)
    with pytest.raises(DSparkError) as e:
        open_checkpoint(str(tmp_path))
    one_line_error(e, "model.safetensors", "corrupt header")


def test_size_mismatch_is_corrupt(tmp_path):
    body = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 16)
    with pytest.raises(DSparkError) as e:
        open_checkpoint(str(tmp_path))
    one_line_error(e, "'a'", "12", "16")


def test_unknown_dtype(tmp_path):
    body = json.dumps({"c": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(len(body).to_bytes(8, "little") + body + b"\0" * 8)
    with pytest.raises(DSparkError) as e:
        open_checkpoint(str(tmp_path))
    one_line_error(e, "model.safetensors", "'c'", "C64", "BF16")


def test_index_points_at_missing_shard(tmp_path):
    folder = make_sharded(
        tmp_path / "ck",
        {"model-00001-of-00002.safetensors": {"a": np.zeros(2, np.float32)}},
        weight_map={"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    )
    with pytest.raises(DSparkError) as e:
        open_checkpoint(str(folder))
    one_line_error(e, "model-00002-of-00002.safetensors", "missing")


def test_index_shard_outside_folder_refused(tmp_path):
    folder = make_sharded(
        tmp_path / "ck", {"a.safetensors": {"a": np.zeros(2, np.float32)}}, weight_map={"a": "../a.safetensors"}
    )
    with pytest.raises(DSparkError) as e:
        open_checkpoint(str(folder))
    one_line_error(e, "../a.safetensors", "plain file name")


def test_duplicate_key_across_shards(tmp_path):
    folder = make_sharded(
        tmp_path / "ck",
        {
            "s1.safetensors": {"w": np.zeros(2, np.float32)},
            "s2.safetensors": {"w": np.ones(2, np.float32), "v": np.ones(1)},
        },
        weight_map={"w": "s1.safetensors", "v": "s2.safetensors"},
    )
    with pytest.raises(DSparkError) as e:
        open_checkpoint(str(folder))
    one_line_error(e, "'w'", "two shards", "s1.safetensors", "s2.safetensors")


def test_stale_index(tmp_path):
    folder = make_sharded(
        tmp_path / "ck",
        {"s1.safetensors": {"w": np.zeros(2, np.float32)}},
        weight_map={"w": "s1.safetensors", "gone": "s1.safetensors"},
    )
    with pytest.raises(DSparkError) as e:
        open_checkpoint(str(folder))
    one_line_error(e, "'gone'", "no shard")


def test_bad_index_json(tmp_path):
    folder = make_sharded(tmp_path / "ck", {"s1.safetensors": {"w": np.zeros(2, np.float32)}})
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(DSparkError) as e:
        open_checkpoint(str(folder))
    one_line_error(e, "model.safetensors.index.json", "not valid JSON")


def test_unknown_key(tmp_path):
    with open_checkpoint(str(write_single(tmp_path / "ck", {"a": np.zeros(1)}))) as r:
        with pytest.raises(UsageError) as e:
            r.spec("b")
        one_line_error(e, "'b'")


# ---------------------------------------------------------------------------------------------------- streaming


def test_read_touches_only_its_own_bytes(tmp_path):
    a, b = np.arange(16, dtype=np.float32), np.arange(64, dtype=np.int64)
    folder = write_single(tmp_path / "ck", {"a": a, "b": b})
    reader = open_checkpoint(str(folder))
    spec_b = reader.spec("b")
    # Scribble over b's bytes: a must still read back intact, and b must read exactly the scribble.
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(spec_b.offset)
        f.write(b"\xff" * spec_b.nbytes)
    np.testing.assert_array_equal(reader.read("a"), a)
    np.testing.assert_array_equal(reader.read("b"), np.full(64, -1, np.int64))
    reader.close()


def test_reading_small_tensor_from_huge_file_allocates_little(tmp_path):
    # A 256 MiB tensor region stored as a sparse hole: opening and reading the small tensor must not pull it in.
    big = 2**26  # float32 elements = 256 MiB
    header = {
        "small": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "big": {"dtype": "F32", "shape": [big], "data_offsets": [16, 16 + 4 * big]},
    }
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(len(body).to_bytes(8, "little") + body + np.arange(4, dtype="<f4").tobytes())
        f.truncate(8 + len(body) + 16 + 4 * big)
    tracemalloc.start()
    try:
        with open_checkpoint(str(tmp_path)) as r:
            assert r.nbytes == 16 + 4 * big
            out = r.read("small")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(out, np.arange(4, dtype=np.float32))
    assert peak < 1 << 20, f"peak allocation {peak} bytes while reading a 16-byte tensor"


# ---------------------------------------------------------------------------------------------------- manifests


def _load_generator():
    spec = importlib.util.spec_from_file_location("make_manifests", os.path.join(MANIFEST_DIR, "make_manifests.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SIZES = {"4b": (2560, 36, 32, 9728, True), "8b": (4096, 36, 32, 12288, False), "14b": (5120, 40, 40, 17408, False)}


def test_manifest_names():
    expected = {
        f"{kind}qwen3-{s}{suffix}"
        for s in SIZES
        for kind, suffix in (("", ""), ("dspark-", "-block7"), ("dflash-", "-block7"))
    } | {f"deepseek-v4-{s}{d}" for s in ("flash", "pro") for d in ("", "-dspark")}
    assert set(list_manifests()) == expected
    with pytest.raises(UsageError) as e:
        load_manifest("qwen3-70b")
    one_line_error(e, "qwen3-70b", "qwen3-4b")


def test_committed_manifests_match_generator():
    gen = _load_generator()
    for name, manifest in gen.build_all().items():
        with open(os.path.join(MANIFEST_DIR, f"{name}.json.gz"), "rb") as f:
            assert f.read() == gen.encode(manifest), f"{name}.json.gz is stale; rerun make_manifests.py"
        assert load_manifest(name + ".json.gz") == json.loads(gzip.decompress(gen.encode(manifest)))


@pytest.mark.parametrize("size", list(SIZES))
def test_target_manifest(size):
    h, layers, nq, inter, tied = SIZES[size]
    m = load_manifest(f"qwen3-{size}")
    specs = manifest_specs(m)
    assert len(specs) == 1 + layers * 11 + 1 + (0 if tied else 1)
    assert {d for _, d in specs.values()} == {"BF16"}
    assert specs["model.embed_tokens.weight"] == ((151936, h), "BF16")
    assert ("lm_head.weight" in specs) == (not tied)
    last = f"model.layers.{layers - 1}."
    assert specs[last + "self_attn.q_proj.weight"][0] == (nq * 128, h)
    assert specs[last + "self_attn.k_proj.weight"][0] == (8 * 128, h)
    assert specs[last + "self_attn.o_proj.weight"][0] == (h, nq * 128)
    assert specs[last + "self_attn.k_norm.weight"][0] == (128,)
    assert specs[last + "mlp.down_proj.weight"][0] == (h, inter)
    assert f"model.layers.{layers}.input_layernorm.weight" not in specs
    c = m["config"]
    assert (c["hidden_size"], c["num_hidden_layers"], c["tie_word_embeddings"]) == (h, layers, tied)
    assert c["rope_parameters"] == {"rope_theta": 1000000.0, "rope_type": "default"}
    assert (c["rms_norm_eps"], c["max_position_embeddings"], c["model_type"]) == (1e-6, 40960, "qwen3")


@pytest.mark.parametrize("size", list(SIZES))
def test_draft_manifests(size):
    h, target_layers, nq, inter, _ = SIZES[size]
    ids = [1, 10, 19, 28, 37] if size == "14b" else [1, 9, 17, 25, 33]
    dspark, dflash = load_manifest(f"dspark-qwen3-{size}-block7"), load_manifest(f"dflash-qwen3-{size}-block7")
    s, f = manifest_specs(dspark), manifest_specs(dflash)
    assert len(s) == 1 + 5 * 11 + 1 + 1 + 1 + 1 + 2 + 2 == 64
    assert set(s) - set(f) == {
        "markov_head.markov_w1.weight",
        "markov_head.markov_w2.weight",
        "confidence_head.proj.weight",
        "confidence_head.proj.bias",
    }
    assert set(f) <= set(s) and len(f) == 60
    assert s["fc.weight"] == ((h, 5 * h), "BF16")
    assert s["markov_head.markov_w1.weight"] == ((151936, 256), "BF16")
    assert s["confidence_head.proj.weight"] == ((1, h + 256), "BF16")
    assert s["confidence_head.proj.bias"] == ((1,), "BF16")
    assert s["layers.4.mlp.gate_proj.weight"] == ((inter, h), "BF16")
    assert s["layers.4.self_attn.q_proj.weight"] == ((nq * 128, h), "BF16")
    assert "layers.5.input_layernorm.weight" not in s and not any(k.startswith("model.") for k in s)
    for name, m in (("dspark", dspark), ("dflash", dflash)):
        c = m["config"]
        assert c["num_target_layers"] == target_layers and c["target_layer_ids"] == ids
        assert (c["block_size"], c["num_hidden_layers"], c["mask_token_id"], c["num_anchors"]) == (7, 5, 151669, 512)
        assert c["layer_types"] == ["full_attention"] * 5 and c["architectures"] == ["Qwen3DSparkModel"]
        assert c["tie_word_embeddings"] is False
        assert c["enable_confidence_head"] is (name == "dspark")
        assert c["markov_rank"] == (256 if name == "dspark" else 0)
        assert ("markov_head_type" in c) == ("confidence_head_with_markov" in c) == (name == "dspark")
    if size == "4b":
        assert s["fc.weight"][0] == (2560, 12800) and s["confidence_head.proj.weight"][0] == (1, 2816)


@pytest.mark.parametrize("size", list(SIZES))
def test_target_manifest_matches_transformers(size):
    transformers = pytest.importorskip("transformers")
    m = load_manifest(f"qwen3-{size}")
    config = transformers.Qwen3Config(**m["config"])
    with torch.device("meta"):  # shapes only: no memory for 4-14B parameters
        model = transformers.Qwen3ForCausalLM(config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        # state_dict() lists the tied alias; checkpoints written by save_pretrained drop it.
        assert got.pop("lm_head.weight") == got["model.embed_tokens.weight"]
    assert got == {k: shape for k, (shape, _) in manifest_specs(m).items()}


def test_write_manifest_round_trip(tmp_path):
    tensors = {"embed_tokens.weight": np.zeros((6, 4), ml_dtypes.bfloat16), "norm.weight": np.ones(4, np.float32)}
    with open_checkpoint(str(write_single(tmp_path / "ck", tensors))) as r:
        manifest = write_manifest(r, {"hidden_size": 4})
    assert manifest == {
        "config": {"hidden_size": 4},
        "tensors": {
            "embed_tokens.weight": {"shape": [6, 4], "dtype": "BF16"},
            "norm.weight": {"shape": [4], "dtype": "F32"},
        },
    }
    assert json.loads(json.dumps(manifest)) == manifest
