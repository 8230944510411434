"""Two cooperating CPU processes on localhost (2 simulated devices each, one data=2,model=2 mesh over all 4) generate
the same tokens as one process on the same mesh, and convert a checkpoint into one orbax folder; only process 0
prints."""

import importlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

from dspark_jax import distributed

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARGS = ["--prompt-ids", "5,6,7,8,9,10", "--max-new-tokens", "12", "--json", "--dtype", "float32", "--no-compile-cache"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(module: str, args: list[str]) -> list[tuple[str, str]]:
    """(stdout, stderr) of `python -m module *args` run as processes 0 and 1 of one distributed run."""
    port = _free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "HF_HUB_OFFLINE": "1",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, *args]
            + ["--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=900))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs


def test_gloo_collectives_option_exists():
    import jax

    # jax 0.10.2: the option exists and CPU processes use gloo (set explicitly by distributed.initialize).
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def test_auto_detection_off_cluster_is_one_line(capsys):
    generate = importlib.import_module("dspark_jax.generate")

    # Not on a TPU pod / SLURM / MPI launch: JAX cannot find a coordinator.
    if any(k in os.environ for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")):
        pytest.skip("running under a cluster launcher; auto detection would succeed")
    code = generate.main(["--distributed", "auto", "--mesh", "data=2,model=2", *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "distributed" in err, err


def test_single_process_needs_no_initialize():
    p = distributed.Parallel(mesh="data=2,model=2")
    assert not p.multi_process
    mesh = p.start()
    assert dict(mesh.shape) == {"data": 2, "model": 2, "expert": 1}
    assert distributed.Parallel().start() is None


@pytest.mark.slow
def test_two_processes_generate_the_tokens_of_one(capsys):
    generate = importlib.import_module("dspark_jax.generate")

    outs = _two_processes("dspark_jax.generate", [*ARGS, "--mesh", "data=2,model=2"])
    assert outs[1][0] == ""  # only process 0 prints
    two = json.loads(outs[0][0])  # and its stdout is exactly the JSON object (gloo's logs went to stderr)
    assert "memory plan" in outs[0][1] and "memory plan" not in outs[1][1]

    # The same run in this process: 4 devices, the same mesh.
    assert generate.main([*ARGS, "--mesh", "data=2,model=2"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert [p["tokens"] for p in two["prompts"]] == [p["tokens"] for p in one["prompts"]]
    assert [p["acceptance_lengths"] for p in two["prompts"]] == [p["acceptance_lengths"] for p in one["prompts"]]
    assert len(one["prompts"][0]["tokens"]) == 12


def test_two_processes_convert_one_checkpoint(tmp_path):
    """Each process writes its own shards into the one folder (interfaces.md §4: the flags of generate on convert);
    the folder loads in one process to the source's very arrays."""
    import numpy as np
    from conftest import tiny_qwen3_hf

    import dspark_jax as dj

    src, _ = tiny_qwen3_hf(tmp_path / "src", heads=4, kv_heads=2, seed=7)
    dst = tmp_path / "out" / "ckpt"
    outs = _two_processes("conversion.convert", ["--src", str(src), "--dst", str(dst), "--mesh", "data=2,model=2"])
    assert outs[0][0] == f"wrote {dst}\n" and outs[1][0] == ""
    assert os.listdir(dst.parent) == ["ckpt"]  # no temp folder left
    assert sorted(p.name for p in (dst / "params").glob("ocdbt.process_*")) == ["ocdbt.process_0", "ocdbt.process_1"]
    got, want = (dict(dj.load_target(str(f), dtype="bfloat16").state.flat_state()) for f in (dst, src))
    assert got.keys() == want.keys()
    for k in got:
        np.testing.assert_array_equal(np.asarray(got[k].get_value()), np.asarray(want[k].get_value()), err_msg=str(k))
