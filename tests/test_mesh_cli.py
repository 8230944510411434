"""--mesh and the multi-process flags on generate / evaluate / bench (one-line errors, exit 2), and the memory plan:
per-device bytes against a loaded sharded model, V4 sizes against the committed manifests, refusals."""

import importlib
import math

import numpy as np
import pytest

from conversion.reader import DTYPES, load_manifest
from dspark_jax import memory_plan
from dspark_jax.errors import UsageError

CLIS = ("dspark_jax.generate", "dspark_jax.evaluate", "dspark_jax.bench")


def _main(module: str):
    return importlib.import_module(module).main


def _run(module, argv, capsys, tmp_path):
    extra = ["--out", str(tmp_path / "bench.json")] if module == "dspark_jax.bench" else []
    if module == "dspark_jax.evaluate":
        extra = ["--data", str(tmp_path / "none.jsonl")]
    try:
        code = _main(module)([*argv, *extra])
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("module", CLIS)
@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--mesh", "model=8"], "needs 8 devices, only 4 present"),
        (["--mesh", "data=1,model=2"], "covers 2 of the 4 devices"),
        (["--mesh", "tensor=4"], "mesh axis must be one of"),
        (["--mesh", "model=0"], "positive integer"),
        (["--coordinator", "localhost:1234"], "go together"),
        (["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "--process-id must be in [0, 2)"),
        (["--distributed", "auto", "--process-id", "0"], "drop --coordinator"),
        (["--distributed", "mpi"], "--distributed"),
    ],
)
def test_bad_parallel_flags_are_one_line_exit_2(module, argv, needle, capsys, tmp_path):
    code, err = _run(module, argv, capsys, tmp_path)
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err
    assert not (tmp_path / "bench.json").exists()


# ------------------------------------------------------------------------------------------------------ memory plan


@pytest.fixture(scope="module")
def tiny_target():
    from dspark_jax.generate import DEFAULT_TARGET

    return DEFAULT_TARGET


def test_qwen3_plan_matches_the_shards_of_a_loaded_model(tiny_target):
    import dspark_jax as dj
    from dspark_jax.sharding import make_mesh

    mesh = make_mesh("data=2,model=2")
    plan = memory_plan.plan_checkpoint(tiny_target, mesh, "float32", context=256, batch=2)
    target = dj.load_target(tiny_target, dtype="float32", mesh=mesh)
    device = mesh.devices.reshape(-1)[0]
    on_device = sum(
        s.data.nbytes
        for _, var in target.state.flat_state()
        for s in var.get_value().addressable_shards
        if s.device == device
    )
    assert plan.param_bytes == on_device
    whole = sum(var.get_value().nbytes for _, var in target.state.flat_state())
    single = memory_plan.plan_checkpoint(tiny_target, None, "float32", context=256, batch=2)
    assert single.param_bytes == whole and plan.param_bytes < whole
    c = target.config
    # K and V, batch 2 split over data=2, kv heads over model=2
    assert plan.cache_bytes == 2 * c.num_hidden_layers * 1 * 256 * (c.num_key_value_heads // 2) * c.head_dim * 4
    assert single.cache_bytes == 4 * plan.cache_bytes
    assert "params" in plan.describe() and "mesh data=2,model=2,expert=1" in plan.describe()


def test_plan_refuses_a_mesh_that_cannot_hold_the_model(tiny_target):
    plan = memory_plan.plan_checkpoint(tiny_target, None, "float32")
    small = memory_plan.MemoryPlan(**{**plan.__dict__, "device_bytes": plan.total_bytes})  # no headroom left
    with pytest.raises(UsageError) as e:
        small.check()
    assert "\n" not in str(e.value) and "does not fit" in str(e.value) and "GiB per device" in str(e.value)
    memory_plan.MemoryPlan(**{**plan.__dict__, "device_bytes": 2 * plan.total_bytes}).check()


def test_cli_prints_the_plan_and_refuses_before_loading(tiny_target, capsys, monkeypatch, tmp_path):
    generate = importlib.import_module("dspark_jax.generate")

    monkeypatch.setattr(memory_plan, "device_memory", lambda: 1 << 20)  # 1 MiB devices
    loaded = []
    monkeypatch.setattr("dspark_jax.load_target", lambda *a, **k: loaded.append(1))
    code = generate.main(["--mesh", "data=2,model=2", "--prompt-ids", "5,6,7", "--no-compile-cache"])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and not loaded
    assert lines[0].startswith("memory plan ") and "mesh data=2,model=2,expert=1" in lines[0]
    assert lines[1].startswith("error: ") and "does not fit" in lines[1] and len(lines) == 2, err


@pytest.mark.parametrize("name", ["deepseek-v4-flash", "deepseek-v4-flash-dspark", "deepseek-v4-pro"])
def test_v4_plan_counts_the_manifest_params(name):
    """Two derivations of V4 §3-4 agree: the plan's formula and the manifest's keys (after dequantisation)."""
    from conversion import quant

    m = load_manifest(name)
    dspark = "dspark_target_layer_ids" in m["config"]
    total = 0
    for key, t in m["tensors"].items():
        if key.endswith(".scale") or (key.startswith("mtp.") and not dspark):  # scales; the legacy MTP is skipped
            continue
        total += math.prod(quant.logical_shape(tuple(t["shape"]), DTYPES[t["dtype"]]))
    assert memory_plan.v4_param_count(m["config"]) == total
    expected = {"deepseek-v4-flash": 284e9, "deepseek-v4-pro": 1.6e12}.get(name)
    if expected:  # V4 §1.1 totals (rounded in the table)
        assert abs(total / expected - 1) < 0.02, total


def test_v4_plan_shards_experts_and_refuses_one_device():
    config = load_manifest("deepseek-v4-flash")["config"]
    one = memory_plan.v4_plan(config, {"data": 1, "model": 1, "expert": 1}, device_bytes=139 << 30)
    eight = memory_plan.v4_plan(config, {"data": 1, "model": 1, "expert": 8}, device_bytes=139 << 30)
    assert one.param_bytes > 500 << 30 and not one.fits
    assert eight.param_bytes < one.param_bytes / 6  # experts are ~95% of the bytes
    with pytest.raises(UsageError, match="does not fit"):
        one.check()
    n, plan = memory_plan.min_devices(config, 139 << 30, "bfloat16", 1 << 20)
    assert n == 8 and plan.fits
    assert np.isclose(plan.context, 1 << 20)
