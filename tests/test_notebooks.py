"""The notebooks (interfaces.md §7): committed without outputs, in sync with notebooks/build.py, and each runs top to
bottom in smoke mode (DSPARK_SMOKE=1: tiny local models, few steps, CPU, offline) in a fresh python3 kernel, so a
broken notebook fails the suite."""

import importlib.util
import os
import pathlib
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
TIMEOUT_S = 300  # interfaces.md §7: under 5 minutes each on a 2-core CPU (a few tens of seconds when idle)

nbformat = pytest.importorskip("nbformat", reason="notebook tests need the test extra (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="notebook tests need the test extra (nbformat, nbclient, ipykernel)")
pytest.importorskip("ipykernel", reason="notebook tests need the test extra (nbformat, nbclient, ipykernel)")


def _build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOKS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_module()
NAMES = sorted(BUILD.NOTEBOOKS)


def _kernel_env() -> dict:
    """The kernel's environment: smoke mode, offline, CPU, one device (the test process's virtual-device flag from
    conftest is dropped, so a notebook sees what a plain CPU machine shows)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env.pop("MPLBACKEND", None)  # the kernel's default, inline, is what renders the plots
    env.update(DSPARK_SMOKE="1", HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    return env


def test_at_least_five_notebooks():
    assert len(NAMES) >= 5
    for name in NAMES:
        assert (NOTEBOOKS / f"{name}.ipynb").is_file(), f"{name}.ipynb missing: run python notebooks/build.py"


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs_and_in_sync(name):
    path = NOTEBOOKS / f"{name}.ipynb"
    text = path.read_text()
    assert text == BUILD.render(name), f"{path.name} differs from notebooks/build.py: run python notebooks/build.py"
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)
    for i, cell in enumerate(code):
        compile(cell.source, f"{name}.ipynb code cell {i}", "exec")  # a syntax error fails here, before any run
    first = nb.cells[0]
    assert first.cell_type == "markdown" and BUILD.colab_url(name) in first.source


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One JAX compilation cache for the notebooks of this run: they share the embedded pair's decoding loops, so
    a loop compiled by one notebook is read back by the next (cold, each still fits its timeout)."""
    return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_runs_in_smoke_mode(name, tmp_path, compile_cache):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},  # the kernel's working folder: files it writes land here
    )
    start = time.perf_counter()
    # TMPDIR: the notebooks' scratch folders (tempfile.mkdtemp, tens of MB each) land in this test's folder, which
    # pytest prunes, instead of piling up in the system's temp folder run after run.
    client.execute(env={**_kernel_env(), "JAX_COMPILATION_CACHE_DIR": compile_cache, "TMPDIR": str(tmp_path)})
    seconds = time.perf_counter() - start
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    footer = [line for line in text.splitlines() if line.startswith("notebook ran in")]
    print(f"{name}: {seconds:.0f} s with the kernel's start; {footer[-1] if footer else 'no footer'}")
    assert seconds < TIMEOUT_S
    assert "smoke mode: True" in text  # the kernel really ran in smoke mode
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert images, "no plot rendered"
