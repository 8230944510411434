"""Stream tensors one at a time out of safetensors checkpoints (single file or sharded), write them back atomically,
and load the committed key manifests that describe which tensors each supported checkpoint must hold.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import ml_dtypes
import numpy as np

from dspark_jax.errors import DSparkError, UsageError

# safetensors dtype name -> numpy dtype. Byte order is fixed little-endian by the format, so spell it out.
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(bool),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    # DeepSeek-V4 block scales (V4 §3.2): unsigned power-of-two exponents; dequantised by conversion.quant.
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
}
_ACCEPTED = ", ".join(DTYPES)
# Real headers are a few hundred KB even for 400-tensor shards; anything past this is garbage, not a header.
MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
MANIFEST_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "manifests")


def safetensors_dtype_name(dtype: np.dtype) -> str:
    """The safetensors name ("BF16", ...) of a numpy dtype; UsageError if the format cannot store it."""
    dtype = np.dtype(dtype)
    if dtype.byteorder == ">":
        dtype = dtype.newbyteorder("<")
    for name, candidate in DTYPES.items():
        # Compare dtype objects, not `.str`: ml_dtypes types all report an opaque '<V2' / '<V1' string.
        if candidate == dtype:
            return name
    raise UsageError(f"dtype {dtype} cannot be stored in safetensors; accepted: {_ACCEPTED}")


@dataclass(frozen=True)
class TensorSpec:
    """Where one tensor lives: `shape` and `dtype` as stored, `file` the shard's base name, `offset` the absolute
    byte position of its data in that file and `nbytes` its length (prod(shape) * itemsize)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: str
    offset: int
    nbytes: int

    @property
    def safetensors_dtype(self) -> str:
        return safetensors_dtype_name(self.dtype)


def _corrupt(path: str, why: str) -> DSparkError:
    return DSparkError(f"{path}: corrupt header ({why}); expected an 8-byte little-endian length then a JSON header")


def _reject_duplicate_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"name {key!r} appears twice")
        out[key] = value
    return out


def _is_int(x: Any) -> bool:
    # bool is an int subclass, but `true` is never a valid size or offset.
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: str) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """Parse and validate the header of one .safetensors file without touching its tensor data.

    Returns ({tensor name: TensorSpec}, __metadata__). Raises DSparkError on a corrupt header, an unknown dtype,
    a size that disagrees with the shape, overlapping tensors, or data offsets past the end of the file (truncated).
    """
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, f"file is {file_size} bytes, shorter than the 8-byte header length")
        header_len = int.from_bytes(head, "little")
        if header_len > MAX_HEADER_BYTES:
            raise _corrupt(path, f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if header_len > file_size - 8:
            raise _corrupt(path, f"header length {header_len} exceeds the {file_size}-byte file")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_names)
    except (UnicodeDecodeError, ValueError) as exc:
        # json's messages are one line ("Expecting value: line 1 column 1 (char 0)"); keep them for debugging.
        raise _corrupt(path, f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"header JSON is a {type(header).__name__}, not an object")

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "__metadata__ must be an object of string values")

    data_start = 8 + header_len
    base = os.path.basename(path)
    specs: dict[str, TensorSpec] = {}
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise _corrupt(path, f"tensor {name!r} lacks dtype/shape/data_offsets")
        dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype_name not in DTYPES:
            raise DSparkError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}; accepted: {_ACCEPTED}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _corrupt(path, f"tensor {name!r} shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise _corrupt(path, f"tensor {name!r} data_offsets {offsets!r} are not [begin, end], 0 <= begin <= end")
        dtype = DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise _corrupt(
                path,
                f"tensor {name!r} spans {offsets[1] - offsets[0]} bytes but shape {shape} of "
                f"{dtype_name} needs {nbytes}",
            )
        if data_start + offsets[1] > file_size:
            raise DSparkError(
                f"{path}: file is truncated: tensor {name!r} ends at byte {data_start + offsets[1]} "
                f"but the file has {file_size} bytes; re-download or re-save it"
            )
        specs[name] = TensorSpec(name, tuple(shape), dtype, base, data_start + offsets[0], nbytes)

    # Overlapping regions mean two tensors would alias the same bytes: never produced by a sane writer.
    ordered = sorted((s for s in specs.values() if s.nbytes), key=lambda s: s.offset)
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.offset < prev.offset + prev.nbytes:
            raise _corrupt(path, f"tensors {prev.name!r} and {cur.name!r} overlap")
    return specs, metadata


class SafetensorsReader:
    """Random access to the tensors of one checkpoint folder; each `read` touches only that tensor's bytes.

    Files stay open between reads (one handle per shard) until `close()` or the end of a `with` block; a read
    after `close()` reopens the file it needs.
    """

    def __init__(self, folder: str, specs: dict[str, TensorSpec], metadata: dict[str, str]):
        self.folder = folder
        self._specs = specs
        self.metadata = metadata
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()  # seek + readinto on a shared handle must not interleave across threads

    def keys(self) -> list[str]:
        return sorted(self._specs)

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def __len__(self) -> int:
        return len(self._specs)

    def __iter__(self) -> Iterator[tuple[str, TensorSpec]]:
        for key in self.keys():
            yield key, self._specs[key]

    @property
    def files(self) -> list[str]:
        return sorted({s.file for s in self._specs.values()})

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._specs.values())

    def spec(self, key: str) -> TensorSpec:
        try:
            return self._specs[key]
        except KeyError:
            raise UsageError(
                f"{self.folder}: no tensor named {key!r}; the checkpoint holds {len(self._specs)} tensors, see .keys()"
            ) from None

    def read(self, key: str) -> np.ndarray:
        """One tensor as a fresh C-contiguous array of shape `spec(key).shape`, read with a single seek."""
        spec = self.spec(key)
        out = np.empty(spec.shape, dtype=spec.dtype)
        if spec.nbytes == 0:
            return out
        self._read_into(spec, spec.offset, out)
        return out

    def read_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of dimension 0 of a tensor (contiguous bytes, one seek): a shard without the rest."""
        spec = self.spec(key)
        rows = spec.shape[0] if spec.shape else 0
        if not 0 <= start <= stop <= rows:
            raise UsageError(f"{key}: rows [{start}, {stop}) are outside its {rows} rows")
        out = np.empty((stop - start, *spec.shape[1:]), dtype=spec.dtype)
        if out.nbytes:
            self._read_into(spec, spec.offset + start * (spec.nbytes // rows), out)
        return out

    def _read_into(self, spec: TensorSpec, offset: int, out: np.ndarray) -> None:
        view = memoryview(out.reshape(-1).view(np.uint8))
        with self._lock:
            handle = self._handle(spec.file)
            handle.seek(offset)
            got = 0
            # Raw (unbuffered) reads may return short counts (Linux caps one read at ~2 GiB), so loop.
            while got < out.nbytes:
                n = handle.readinto(view[got:])
                if not n:
                    raise DSparkError(
                        f"{os.path.join(self.folder, spec.file)}: file is truncated: tensor "
                        f"{spec.name!r} needs bytes up to {offset + out.nbytes} but the read stopped "
                        f"at {offset + got}; was the file changed after opening?"
                    )
                got += n

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = open(os.path.join(self.folder, file), "rb", buffering=0)
        return self._handles[file]

    def close(self) -> None:
        with self._lock:
            for handle in self._handles.values():
                handle.close()
            self._handles.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsReader({self.folder!r}, {len(self._specs)} tensors in {len(self.files)} file(s))"


def _open_sharded(folder: str) -> SafetensorsReader:
    index_path = os.path.join(folder, INDEX_NAME)
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (UnicodeDecodeError, ValueError) as exc:
        raise DSparkError(f'{index_path}: not valid JSON ({exc}); expected {{"weight_map": {{key: file}}}}') from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise DSparkError(f'{index_path}: missing or malformed "weight_map"; expected {{"weight_map": {{key: file}}}}')

    specs: dict[str, TensorSpec] = {}
    metadata: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        # A shard name like "../x" would read outside the checkpoint folder.
        if os.path.basename(shard) != shard or shard in ("", ".", ".."):
            raise DSparkError(f"{index_path}: shard name {shard!r} is not a plain file name in the folder")
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise DSparkError(
                f"{index_path}: references shard {shard!r}, which is missing from {folder}; "
                f"download every shard the index lists"
            )
        shard_specs, shard_meta = read_header(shard_path)
        for key, spec in shard_specs.items():
            if key in specs:
                raise DSparkError(
                    f"{folder}: tensor {key!r} appears in two shards, {specs[key].file!r} and "
                    f"{shard!r}; each key must live in exactly one shard"
                )
            specs[key] = spec
        for k, v in shard_meta.items():
            metadata.setdefault(k, v)
    for key, shard in weight_map.items():
        if key not in specs or specs[key].file != shard:
            where = f"is in {specs[key].file!r}" if key in specs else "is in no shard"
            raise DSparkError(f"{index_path}: maps tensor {key!r} to {shard!r} but it {where}; the index is stale")
    return SafetensorsReader(folder, specs, metadata)


def open_checkpoint(path: str) -> SafetensorsReader:
    """Open a checkpoint folder: `model.safetensors.index.json` + shards, or exactly one `*.safetensors` file.

    Pickle checkpoints (*.bin, *.pt, *.pth, *.ckpt) are never opened; they are ignored next to safetensors files
    and refused on their own.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UsageError(f"checkpoint folder {path} does not exist; pass a folder holding *.safetensors files")
    if not os.path.isdir(path):
        raise UsageError(
            f"checkpoint path {path} is not a directory; pass the folder that holds the *.safetensors files, not a file"
        )
    if os.path.isfile(os.path.join(path, INDEX_NAME)):
        return _open_sharded(path)

    names = sorted(os.listdir(path))
    st_files = [n for n in names if n.endswith(".safetensors") and os.path.isfile(os.path.join(path, n))]
    if not st_files:
        pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
        if pickles:
            raise UsageError(
                f"{path} holds only pickle checkpoints ({', '.join(pickles[:3])}); pickle checkpoints "
                f"are never loaded because unpickling runs arbitrary code; convert them to "
                f"safetensors first"
            )
        raise UsageError(f"{path} holds no *.safetensors file; expected model.safetensors or {INDEX_NAME} + shards")
    if "model.safetensors" in st_files:
        chosen = "model.safetensors"
    elif len(st_files) == 1:
        chosen = st_files[0]
    else:
        raise UsageError(
            f"{path} holds {len(st_files)} *.safetensors files ({', '.join(st_files[:3])}, ...) but no "
            f"{INDEX_NAME}; add the index or keep a single model.safetensors"
        )
    specs, metadata = read_header(os.path.join(path, chosen))
    return SafetensorsReader(path, specs, metadata)


def save_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (name -> array of any dtype in DTYPES) to one .safetensors file at `path`.

    Keys are sorted and packed back to back; the JSON header is space-padded to a multiple of 8 bytes so every
    tensor starts 8-byte aligned. Data goes to a temp file in the same folder that is renamed over `path` only once
    complete, so readers never see a half-written checkpoint.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {path}: folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        raise UsageError(f"cannot write {path}: it is a directory; pass a file path ending in .safetensors")
    meta = dict(metadata or {})
    for k, v in meta.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise UsageError(f"metadata entry {k!r}: {v!r} is not str -> str; safetensors metadata holds strings only")

    arrays: dict[str, np.ndarray] = {}
    for name in sorted(tensors):
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise UsageError(f"tensor name {name!r} is invalid; use a non-empty string other than '__metadata__'")
        arr = np.asarray(tensors[name])
        safetensors_dtype_name(arr.dtype)  # raises on dtypes the format cannot hold
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        # Not np.ascontiguousarray: it turns 0-d scalars into shape (1,).
        arrays[name] = arr if arr.flags.c_contiguous else arr.copy(order="C")

    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    offset = 0
    for name, arr in arrays.items():
        header[name] = {
            "dtype": safetensors_dtype_name(arr.dtype),
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)

    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for arr in arrays.values():
                if arr.nbytes:
                    f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_manifest(reader: SafetensorsReader, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of an open checkpoint: {"config": config, "tensors": {key: {"shape": [...], "dtype": "BF16"}}}."""
    tensors = {key: {"shape": list(spec.shape), "dtype": spec.safetensors_dtype} for key, spec in reader}
    return {"config": dict(config or {}), "tensors": tensors}


def list_manifests() -> list[str]:
    """Names accepted by `load_manifest`, e.g. "qwen3-4b", "dspark-qwen3-4b-block7"."""
    return sorted(n[: -len(".json.gz")] for n in os.listdir(MANIFEST_DIR) if n.endswith(".json.gz"))


def load_manifest(name: str) -> dict[str, Any]:
    """Load a committed manifest by name ("qwen3-8b" or "qwen3-8b.json.gz").

    Returns {"config": HF config dict, "tensors": {key: {"shape": [...], "dtype": "BF16"}}}.
    """
    stem = name[: -len(".json.gz")] if name.endswith(".json.gz") else name
    path = os.path.join(MANIFEST_DIR, f"{stem}.json.gz")
    if os.path.basename(stem) != stem or not os.path.isfile(path):
        raise UsageError(f"manifest {name!r} does not exist; accepted: {', '.join(list_manifests())}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def manifest_specs(manifest: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Flatten a manifest's tensors to {key: (shape tuple, safetensors dtype name)} for direct comparison."""
    return {k: (tuple(v["shape"]), v["dtype"]) for k, v in manifest["tensors"].items()}
