"""Test setup: CPU with 4 virtual devices, offline hub, f32 tiny models, single-threaded torch."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # a device run sets JAX_PLATFORMS=cuda for the gpu-marked tests
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The CLIs' persistent compilation cache and the measured product forms (layers/product_forms.py): in one fresh
# folder per test session (subprocess CLIs inherit it), never the user's cache, removed when the session ends.
if "DSPARK_COMPILE_CACHE" not in os.environ or "DSPARK_PRODUCT_FORMS" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _scratch = tempfile.mkdtemp(prefix="dspark-xla-")
    atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
    os.environ.setdefault("DSPARK_COMPILE_CACHE", os.path.join(_scratch, "xla"))
    os.makedirs(os.environ["DSPARK_COMPILE_CACHE"], exist_ok=True)
    os.environ.setdefault("DSPARK_PRODUCT_FORMS", os.path.join(_scratch, "product_forms.json"))

import json  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Reference vectors of the PyTorch DeepSpec implementation on tiny random models, committed in compact form
# (tests/data/goldens/README.md; tests/data/make_goldens.py rebuilds them from the full golden folder).
GOLDENS = pathlib.Path(__file__).resolve().parent / "data" / "goldens"
GOLDEN_VARIANTS = ("markov", "rnn", "dflash")


def golden_folder(variant: str, name: str) -> pathlib.Path:
    """HF folder of a golden model: name "target" (one folder, the three variants share it), "draft" or
    "draft_distilled" (per variant)."""
    if variant not in GOLDEN_VARIANTS:
        raise ValueError(f"variant={variant!r}; accepted: {GOLDEN_VARIANTS}")
    return GOLDENS / "target" if name == "target" else GOLDENS / variant / name


def golden_arrays(variant: str) -> dict[str, np.ndarray]:
    """The golden arrays of one variant by their golden names (goldens README §4), a fresh dict per call."""
    if variant not in GOLDEN_VARIANTS:
        raise ValueError(f"variant={variant!r}; accepted: {GOLDEN_VARIANTS}")
    aliases = json.loads((GOLDENS / "aliases.json").read_text())[variant]
    with np.load(GOLDENS / "arrays.npz", allow_pickle=False) as z:
        arrays = {name.split(".", 1)[1]: z[name] for name in z.files if name.startswith(variant + ".")}
        arrays.update({name: z[stored] for name, stored in aliases.items()})
    return arrays


def rel_err(a, b) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float64."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def hlo_instructions(hlo: str, prefix: str, shape) -> list[tuple[str, str]]:
    """(computation, instruction) of every instruction named `prefix`... with an array of `shape` in compiled HLO
    text (`.compile().as_text()`): e.g. which copies of a cache a compiled loop makes, and where (ENTRY runs once
    a call; any other computation is a loop body or a branch)."""
    dims, found, computation = f"[{','.join(map(str, shape))}]", [], ""
    for line in hlo.splitlines():
        if line and not line[0].isspace():  # a computation's header; its instructions follow, indented
            computation = line.split()[0]
            continue
        name = line.split(" = ")[0].strip()
        if (name == prefix or name.startswith(prefix + ".")) and dims in line.split(" = ", 1)[-1].split("(")[0]:
            found.append((computation, name))
    return found


# Every executable XLA:CPU compiles keeps ~5 memory mappings until its jit cache entry is dropped, and one pytest
# process compiles tens of thousands of programs: left alone it reaches the kernel's vm.max_map_count (65530) around
# 40% of the suite and LLVM aborts inside the next compile ("Fatal Python error: Aborted"). Dropping jax's caches
# after every test module, and after any test that leaves the process past half the limit, keeps it far below.
_MAP_BUDGET = 30_000


def _mapping_count() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux: no such limit to guard
        return 0


def _drop_compiled_programs() -> None:
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="module", autouse=True)
def _fresh_jit_caches_per_module():
    yield
    _drop_compiled_programs()


@pytest.fixture(autouse=True)
def _jit_caches_within_budget():
    yield
    if _mapping_count() > _MAP_BUDGET:
        _drop_compiled_programs()


@pytest.fixture
def small_cache_buckets(monkeypatch):
    """Cache buckets from 16 positions up instead of 256, for the distribution tests: they draw thousands of rows
    of a few tokens, and attention over 256 mostly empty positions was most of their time (one batch-4096 tree
    call of test_tree_lossless: 4.4 -> 0.8 s). The bucket is a compile-sharing choice; the tokens' law does not
    depend on it (the other tests run the deployed buckets)."""
    from dspark_jax.decoding import loop

    monkeypatch.setattr(loop, "MIN_CACHE_BUCKET", 16)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def tiny_qwen3_hf(
    tmp_path, *, vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, ffw=96, tied=False, seed=0, eos=None
):
    """Save a tiny random transformers Qwen3 (norm scales randomised away from 1) and return its folder."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=ffw,
        tie_word_embeddings=tied,
        max_position_embeddings=512,
        rope_theta=10000.0,
        eos_token_id=eos,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    folder = tmp_path / f"qwen3_{vocab}_{layers}_{heads}_{kv_heads}_{int(tied)}_{seed}"
    model.save_pretrained(folder)
    return folder, model
