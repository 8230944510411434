"""Conversion and loading: orbax round trip through the CLI, hub ids from a local cache (offline), full-size key
coverage from the committed manifests, and one-line errors (API and CLI: exit 2, nothing left at --dst)."""

import json
import os
import pathlib
import pickle
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")
pytest.importorskip("transformers")

from conftest import tiny_qwen3_hf  # noqa: E402

import dspark_jax as dj  # noqa: E402
from conversion import convert  # noqa: E402
from conversion.keymaps import KEYMAPS  # noqa: E402
from conversion.loader import convert_checkpoint  # noqa: E402
from conversion.reader import DTYPES, load_manifest, open_checkpoint, save_safetensors  # noqa: E402
from dspark_jax.configs import Qwen3Config  # noqa: E402
from dspark_jax.errors import DSparkError, UsageError  # noqa: E402
from dspark_jax.models import Qwen3  # noqa: E402
from dspark_jax.sharding import make_mesh  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> pathlib.Path:
    """A tiny HF Qwen3 folder with 2 kv heads (so a model=4 mesh cannot shard it)."""
    folder, _ = tiny_qwen3_hf(tmp_path_factory.mktemp("src"), heads=4, kv_heads=2, seed=7)
    return folder


def _flat(target) -> dict:
    return {path: var.get_value() for path, var in target.state.flat_state()}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        assert fa[path].dtype == fb[path].dtype, path
        np.testing.assert_array_equal(np.asarray(fa[path]), np.asarray(fb[path]), err_msg=str(path))


# ----------------------------------------------------------------------------------------------------- orbax round trip


@pytest.mark.parametrize("dtype, mesh", [("bfloat16", "data=1,model=1"), ("float32", "model=2")])
def test_orbax_round_trip_through_cli(hf_folder, tmp_path, capsys, dtype, mesh):
    dst = tmp_path / "out" / "ckpt"
    assert convert.main(["--src", str(hf_folder), "--dst", str(dst), "--dtype", dtype, "--mesh", mesh]) == 0
    assert os.listdir(dst.parent) == ["ckpt"]  # no temp folder left beside it
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == dtype
    from_orbax = dj.load_target(str(dst), dtype=dtype)
    from_safetensors = dj.load_target(str(hf_folder), dtype=dtype)
    assert from_orbax.config == from_safetensors.config
    _assert_same_params(from_orbax, from_safetensors)
    leaf = from_orbax.state["layers"][0]["self_attn"]["q_proj"][...]
    assert leaf.dtype == np.dtype(dtype)


def test_dst_replaced_only_when_it_is_a_plain_conversion(hf_folder, tmp_path, capsys):
    """A previous conversion at --dst is replaced whole; one holding other files, or a symlink, is refused with
    nothing written; the folder gets the umask's mode, not mkdtemp's 0700."""
    out = tmp_path / "out"
    dst = out / "ckpt"
    assert convert.main(["--src", str(hf_folder), "--dst", str(dst)]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(dst).st_mode & 0o777 == 0o777 & ~umask
    assert convert.main(["--src", str(hf_folder), "--dst", str(dst), "--dtype", "float32"]) == 0
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "float32"
    (dst / "notes.txt").write_text("mine")
    os.symlink(dst, out / "link")
    capsys.readouterr()
    for target, needle in ((dst, "notes.txt"), (out / "link", "symbolic link")):
        assert convert.main(["--src", str(hf_folder), "--dst", str(target)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert sorted(os.listdir(out)) == ["ckpt", "link"] and (dst / "notes.txt").read_text() == "mine"
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "float32"


def test_damaged_orbax_checkpoint_is_one_line(hf_folder, tmp_path):
    """A converted folder whose config no longer fits its arrays names every mismatch before any read (orbax's
    abandoned reads used to print pages of tracebacks after the error); one whose array bytes are cut short says
    it cannot be read (orbax raised a bare Exception: a traceback)."""
    good = tmp_path / "good"
    assert convert.main(["--src", str(hf_folder), "--dst", str(good), "--dtype", "float32"]) == 0
    resized = tmp_path / "resized"
    shutil.copytree(good, resized)
    config = json.loads((resized / "config.json").read_text())
    (resized / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    with pytest.raises(DSparkError, match=r"does not match the model \(\d+ problem\(s\)\): layers/0/mlp/down_proj"):
        dj.load_target(str(resized), dtype="float32")
    cut = tmp_path / "cut"
    shutil.copytree(good, cut)
    arrays = max((cut / "params").glob("ocdbt.process_*/d/*"), key=os.path.getsize)  # the arrays' bytes
    arrays.write_bytes(arrays.read_bytes()[:100])
    with pytest.raises(DSparkError, match="cannot be read") as info:
        dj.load_target(str(cut), dtype="float32")
    assert "\n" not in str(info.value)


def test_converted_draft_keeps_its_calibration(tmp_path, monkeypatch):
    """A draft converted to orbax loads as its safetensors folder does: the same model and arrays, and its
    calibration.json (the confidence temperatures the scheduler reads, spec §10, and any rank factors of the tree
    builder). Its own frozen copies are restored to the host only (compared, then dropped)."""
    from dspark_jax import loading
    from dspark_jax.generate import ASSETS

    restored_as, bind = {}, loading._bind_restored_copies

    def spy(state, config, bound, source):
        flat = dict(state.flat_state())
        restored_as.update({path: type(flat[path].get_value()) for path in bound})
        return bind(state, config, bound, source)

    monkeypatch.setattr(loading, "_bind_restored_copies", spy)
    dst = tmp_path / "draft"
    convert_checkpoint(os.path.join(ASSETS, "dspark"), str(dst), dtype="float32")
    target = dj.load_target(os.path.join(ASSETS, "target"), dtype="float32")
    converted, original = (dj.load_draft(path, target) for path in (str(dst), os.path.join(ASSETS, "dspark")))
    assert restored_as == {("embed_tokens",): np.ndarray, ("lm_head",): np.ndarray}
    assert original.calibration is not None
    np.testing.assert_array_equal(converted.calibration, original.calibration)
    # The folder's own frozen copies were checked against the target's arrays, which replace them (a tied head: the
    # embedding itself, as `load_draft` binds a safetensors draft's).
    embed = target.state["embed_tokens"][...]
    assert converted.config.tied_head == original.config.tied_head == target.config.tie_word_embeddings
    for name in ("embed_tokens", "lm_head"):
        assert converted.state[name][...].unsafe_buffer_pointer() == embed.unsafe_buffer_pointer(), name
    assert converted.graphdef == original.graphdef  # the same model, so the same decode loop
    for (path, a), (_, b) in zip(converted.state.flat_state(), original.state.flat_state(), strict=True):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_converted_draft_of_another_target_is_refused(tmp_path):
    from dspark_jax.generate import ASSETS

    src = tmp_path / "src"
    shutil.copytree(os.path.join(ASSETS, "dspark"), src)
    with open_checkpoint(str(src)) as reader:
        tensors = {k: reader.read(k) for k in reader.keys()}
    tensors["lm_head.weight"] = tensors["lm_head.weight"].copy()
    tensors["lm_head.weight"][3, 5] += 1
    save_safetensors(str(src / "model.safetensors"), tensors)
    convert_checkpoint(str(src), str(tmp_path / "draft"), dtype="float32")  # no target here to compare with
    target = dj.load_target(os.path.join(ASSETS, "target"), dtype="float32")
    with pytest.raises(DSparkError, match=r"lm_head differs from the target's copy") as e:
        dj.load_draft(str(tmp_path / "draft"), target)
    assert "\n" not in str(e.value)


def test_load_target_from_orbax_into_a_mesh(hf_folder, tmp_path):
    dst = tmp_path / "ckpt"
    convert_checkpoint(str(hf_folder), str(dst), dtype="float32")
    sharded = dj.load_target(str(dst), dtype="float32", mesh=make_mesh("data=2,model=2"))
    q = sharded.state["layers"][0]["self_attn"]["q_proj"][...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
    _assert_same_params(sharded, dj.load_target(str(hf_folder), dtype="float32"))


# --------------------------------------------------------------------------------------------------- hub id resolution


def _fake_hub_cache(root: pathlib.Path, repo_id: str, src: pathlib.Path) -> str:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy2(f, snapshot / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return str(snapshot)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_hub_id_resolves_from_local_cache_offline(hf_folder, tmp_path, monkeypatch, no_network):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = _fake_hub_cache(cache, "org/tiny-qwen3", hf_folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both variables once, at import time.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    target = dj.load_target("org/tiny-qwen3", dtype="float32")
    assert os.path.realpath(target.path) == os.path.realpath(snapshot)
    _assert_same_params(target, dj.load_target(str(hf_folder), dtype="float32"))

    start = time.perf_counter()
    with pytest.raises(UsageError) as info:
        dj.load_target("org/not-cached", dtype="float32")
    assert time.perf_counter() - start < 5
    assert "\n" not in str(info.value) and "org/not-cached" in str(info.value)


def test_home_relative_folder_is_expanded(hf_folder, tmp_path, monkeypatch, no_network):
    shutil.copytree(hf_folder, tmp_path / "models" / "tiny")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert dj.load_target("~/models/tiny", dtype="float32").config.vocab_size == 128


# ------------------------------------------------------------------------------------------ full-size key map coverage


class ManifestReader:
    """Just enough of SafetensorsReader for `plan`: keys and specs, from a committed manifest (no weights)."""

    def __init__(self, manifest: dict):
        self._specs = {k: (tuple(v["shape"]), DTYPES[v["dtype"]]) for k, v in manifest["tensors"].items()}

    def keys(self):
        return sorted(self._specs)

    def spec(self, key):
        shape, dtype = self._specs[key]
        return type("Spec", (), {"shape": shape, "dtype": dtype})()


@pytest.mark.parametrize("name", ["qwen3-4b", "qwen3-8b", "qwen3-14b"])
def test_full_size_manifest_is_covered_by_the_key_map(name):
    manifest = load_manifest(name)
    config = Qwen3Config.from_hf_dict(manifest["config"])
    _, abstract = nnx.split(nnx.eval_shape(lambda: Qwen3(config, rngs=None)))
    found = convert.plan(ManifestReader(manifest), KEYMAPS["qwen3"], abstract, source=name)
    assert {key for key, _ in found.values()} == set(manifest["tensors"])  # every source key used once
    assert len(found) == len(list(abstract.flat_state()))  # every param filled
    n_params = sum(np.prod(v.get_value().shape) for _, v in abstract.flat_state())
    assert n_params == sum(np.prod(t["shape"]) for t in manifest["tensors"].values())
    assert config.tie_word_embeddings == ("lm_head.weight" not in manifest["tensors"])


# ---------------------------------------------------------------------------------------------------------- bad input


def _rewrite(folder: pathlib.Path, change) -> None:
    """Rewrite model.safetensors after `change(tensors)` edits the {key: array} dict in place."""
    with open_checkpoint(str(folder)) as reader:
        tensors = {k: reader.read(k) for k in reader.keys()}
    change(tensors)
    save_safetensors(str(folder / "model.safetensors"), tensors)


def _edit_config(folder, **fields):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


Q = "model.layers.0.self_attn.q_proj.weight"


def _missing_key(f):
    _rewrite(f, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def _unexpected_key(f):
    _rewrite(f, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros((4, 4), np.float32)}))


def _wrong_shape(f):
    _rewrite(f, lambda t: t.update({Q: np.zeros((64, 32), np.float32)}))


def _wrong_dtype(f):
    _rewrite(f, lambda t: t.update({Q: t[Q].astype(np.int32)}))


def _several(f):
    def change(t):
        t.pop("model.norm.weight")
        t["model.layers.7.mlp.up_proj.weight"] = np.zeros((2, 2), np.float32)
        t[Q] = np.zeros((3, 64), np.float32)

    _rewrite(f, change)


def _truncated(f):
    path = f / "model.safetensors"
    os.truncate(path, os.path.getsize(path) - 100)


def _corrupt_header(f):
    with open(f / "model.safetensors", "r+b") as fh:
        fh.seek(8)
        fh.write(b"\xff\xfe{garbage")


class _Boom:
    """Unpickling this touches `marker`: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def _pickle_only(f):
    os.remove(f / "model.safetensors")
    with open(f / "pytorch_model.bin", "wb") as fh:
        pickle.dump(_Boom(str(f.parent / "UNPICKLED")), fh)


def _no_safetensors(f):
    os.remove(f / "model.safetensors")


def _bad_heads(f):
    _edit_config(f, num_key_value_heads=3)


BAD = {  # name: (how to break a copy of the good folder, a word the one-line message must contain)
    "missing_folder": (None, "does not exist"),
    "no_safetensors": (_no_safetensors, "safetensors"),
    "truncated": (_truncated, "truncated"),
    "corrupt_header": (_corrupt_header, "corrupt header"),
    "missing_key": (_missing_key, "layers.1.mlp.up_proj"),
    "unexpected_key": (_unexpected_key, "model.layers.0.self_attn.extra.weight"),
    "wrong_shape": (_wrong_shape, "[64, 32]"),
    "wrong_dtype": (_wrong_dtype, "int32"),
    "several_problems": (_several, "model.layers.7.mlp.up_proj.weight"),
    "pickle_bin": (_pickle_only, "pickle"),
    "heads_not_divisible": (_bad_heads, "num_key_value_heads"),
    "missing_config": (lambda f: os.remove(f / "config.json"), "config.json"),
}


@pytest.fixture(params=list(BAD))
def bad_case(request, hf_folder, tmp_path):
    breaker, needle = BAD[request.param]
    folder = tmp_path / "bad"
    if breaker is not None:
        shutil.copytree(hf_folder, folder)
        breaker(folder)
    return request.param, folder, needle


def _check_one_line(message: str, needle: str):
    assert "\n" not in message.strip(), message
    assert needle in message, message


def test_bad_checkpoint_api_raises_one_line(bad_case):
    name, folder, needle = bad_case
    with pytest.raises(DSparkError) as info:
        dj.load_target(str(folder), dtype="float32")
    _check_one_line(str(info.value), needle)
    if name == "several_problems":  # every problem in the same error
        for part in ("unknown key", "missing param", "norm.weight", "[3, 64]"):
            assert part in str(info.value), part
    assert not (folder.parent / "UNPICKLED").exists()


def test_bad_checkpoint_cli_exits_2_and_writes_nothing(bad_case, tmp_path, capsys):
    name, folder, needle = bad_case
    out = tmp_path / "out"
    out.mkdir()
    code = convert.main(["--src", str(folder), "--dst", str(out / "ckpt")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err
    assert os.listdir(out) == []  # neither --dst nor a temp folder beside it
    assert not (folder.parent / "UNPICKLED").exists()


def test_mesh_axis_that_does_not_divide_heads(hf_folder, tmp_path, capsys):
    with pytest.raises(UsageError) as info:
        dj.load_target(str(hf_folder), dtype="float32", mesh=make_mesh("model=4"))
    _check_one_line(str(info.value), "model=4")
    out = tmp_path / "out"
    out.mkdir()
    assert convert.main(["--src", str(hf_folder), "--dst", str(out / "ckpt"), "--mesh", "model=4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "model=4" in err and "kv_heads" in err, err
    assert os.listdir(out) == []


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--dtype", "float16"], "--dtype"),
        (["--mesh", "model=8"], "needs 8 devices"),
        (["--mesh", "tensor=2"], "mesh axis"),
        (["--kind", "dspark"], "--kind"),
    ],
)
def test_bad_cli_flags(hf_folder, tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    out.mkdir()
    try:
        code = convert.main(["--src", str(hf_folder), "--dst", str(out / "ckpt"), *argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert os.listdir(out) == []


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    """The real entry point (`python -m`): one stderr line, exit 2, even with jax/orbax imported."""
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen3", "hidden_size": 8}))
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    proc = subprocess.run(
        [sys.executable, "-m", "conversion.convert", "--src", str(bad), "--dst", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out").exists()
