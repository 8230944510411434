"""Module layering of style.md §2, read from the source with `ast` (nothing is imported): every import of
pallas_kernels, dspark_jax and conversion, at module level or inside a function, points down the layers.

    pallas_kernels → ops → layers → models → {checkpoints, …} → {decoding, training, conversion} → loading → API → CLIs

A new module needs a row in LAYERS; a justified exception needs a row, with its reason, in ALLOWED.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("pallas_kernels", "dspark_jax", "conversion")

# Layer of a module: the row with the longest dotted prefix of its name (a row covers its submodules). A module may
# import a lower layer, anything in its own row, and SHARED; never a higher layer or another row of its own layer.
LAYERS = {
    "pallas_kernels": 0,  # jax only; see ONLY_IMPORTED_BY
    "dspark_jax.ops": 1,  # picks kernel or reference
    "dspark_jax.layers": 2,
    "dspark_jax.models": 3,
    # Model-free helpers the layers above use.
    "dspark_jax.checkpoints": 4,  # checkpoint folder files: orbax state, calibration.json
    "dspark_jax.metrics": 4,  # numpy only
    "dspark_jax.tokenizer": 4,
    "dspark_jax.cli_util": 4,  # argparse plumbing (also used by training.corpus's CLI)
    "dspark_jax.memory_plan": 4,  # bytes per device of params and caches for a mesh; configs only
    "dspark_jax.eval_data": 4,  # evaluation prompt sets: benchmark names, hub datasets, local JSONL
    "dspark_jax.plots": 4,  # matplotlib figures of evaluation results
    "dspark_jax.decoding": 5,  # never training, conversion or CLIs
    "dspark_jax.training": 5,  # never decoding
    "conversion": 5,  # reads param trees from models, writes through checkpoints; never decoding or training
    "dspark_jax.loading": 6,  # public handles on top of conversion.loader
    "dspark_jax": 7,  # the package __init__ (public API); exact match only, see _layer
    # CLIs: imported by nothing in the packages.
    "dspark_jax.generate": 8,
    "dspark_jax.train": 8,
    "dspark_jax.evaluate": 8,
    "dspark_jax.regenerate": 8,
    "dspark_jax.bench": 8,
    "conversion.convert": 8,
}
# Any module of dspark_jax or conversion may use these (style.md §2); they themselves import only each other.
SHARED = (
    "dspark_jax.configs",
    "dspark_jax.errors",
    "dspark_jax.sharding",
    "dspark_jax.cache",
    "dspark_jax.sampling",
    "dspark_jax.hub",
    "dspark_jax.distributed",  # jax.distributed.initialize + the CLI mesh; imports errors and sharding only
)
# Rows that only the listed rows (and themselves) may import, whatever the layers say.
ONLY_IMPORTED_BY = {"pallas_kernels": ("dspark_jax.ops",)}
CLIS = tuple(row for row, layer in LAYERS.items() if layer == max(LAYERS.values()))
# Rows a package never imports, whatever the layers say: conversion (its CLI included) sits below the public API.
NEVER = {"conversion": ("dspark_jax", "dspark_jax.loading", "dspark_jax.decoding", "dspark_jax.training", *CLIS)}
# (importer, imported) -> one-line reason. The test also fails on a row that no longer matches any import.
ALLOWED: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """{dotted module name: (file, is package __init__)} for every .py file of the three packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_init = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return out


MODULES = _modules()


def _known(name: str) -> str:
    """The longest prefix of `name` that is a module (an attribute import resolves to its module)."""
    while name not in MODULES and "." in name:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: pathlib.Path, is_init: bool) -> list[tuple[int, str, str]]:
    """(line, imported module, source text) for each import of the three packages in `module`, at any depth,
    plus string constants naming a module (lazy tables for importlib.import_module)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if is_init else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, _known(a.name), f"import {a.name}") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            text = f"from {'.' * node.level}{node.module or ''} import {', '.join(a.name for a in node.names)}"
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.append((node.lineno, sub if sub in MODULES else _known(base), text))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in MODULES:
            found.append((node.lineno, node.value, f"{node.value!r} (string naming a module)"))
    return [f for f in found if f[1].split(".")[0] in PACKAGES and f[1] != module]


def _row(module: str, table) -> str | None:
    """The longest key of `table` covering `module`; the bare "dspark_jax" row covers only the package __init__."""
    rows = [k for k in table if module == k or (module.startswith(k + ".") and k != "dspark_jax")]
    return max(rows, key=len, default=None)


def _shared(module: str) -> bool:
    return any(module == s or module.startswith(s + ".") for s in SHARED)


def _problem(importer: str, imported: str) -> str | None:
    """Why `importer` may not import `imported`, or None when it may."""
    src_row, dst_row = _row(importer, LAYERS), _row(imported, LAYERS)
    for guarded, importers in ONLY_IMPORTED_BY.items():
        if dst_row == guarded and src_row != guarded and src_row not in importers:
            return f"only {', '.join(importers)} may import {guarded}"
    if src_row == "pallas_kernels" and dst_row != "pallas_kernels":
        return "pallas_kernels never imports dspark_jax or conversion"
    for package, rows in NEVER.items():
        if importer.split(".")[0] == package and dst_row in rows and dst_row != src_row:
            return f"{package} never imports {dst_row}"
    if _shared(importer):
        return None if _shared(imported) else "a shared module may import only other shared modules"
    if _shared(imported) or src_row == dst_row:
        return None
    if LAYERS[dst_row] < LAYERS[src_row]:
        return None
    if LAYERS[dst_row] == LAYERS[src_row]:
        return f"{src_row} and {dst_row} are siblings (layer {LAYERS[src_row]}); neither may import the other"
    return f"{dst_row} (layer {LAYERS[dst_row]}) is above {src_row} (layer {LAYERS[src_row]})"


def _graph() -> list[tuple[str, str, pathlib.Path, int, str]]:
    edges = []
    for module, (path, is_init) in MODULES.items():
        edges += [(module, dst, path, line, text) for line, dst, text in _imports(module, path, is_init)]
    return edges


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if not _shared(m) and _row(m, LAYERS) is None]
    assert not missing, f"modules with no row in tests/test_imports.py LAYERS (add one, style.md §2): {missing}"


def test_imports_point_down_the_layers():
    bad, used = [], set()
    for src, dst, path, line, text in _graph():
        if _row(src, LAYERS) is None and not _shared(src):
            continue  # reported by test_every_module_has_a_layer
        why = _problem(src, dst)
        if why is None:
            continue
        if (src, dst) in ALLOWED:
            used.add((src, dst))
            continue
        bad.append(f"{path.relative_to(ROOT)}:{line}: `{text}` ({src} -> {dst}): {why}")
    stale = [f"{a} -> {b}" for a, b in ALLOWED if (a, b) not in used]
    assert not bad, "imports against style.md §2's direction:\n" + "\n".join(bad)
    assert not stale, f"ALLOWED rows that no longer match a backwards import (remove them): {stale}"


@pytest.mark.parametrize(
    "src, dst, ok",
    [
        ("dspark_jax.models.qwen3", "dspark_jax.layers.attention", True),
        ("dspark_jax.layers.attention", "dspark_jax.models.qwen3", False),
        ("dspark_jax.decoding.loop", "dspark_jax.training.step", False),
        ("conversion.loader", "dspark_jax.loading", False),
        ("conversion.convert", "dspark_jax.loading", False),
        ("conversion.convert", "conversion.loader", True),
        ("conversion.loader", "dspark_jax.checkpoints", True),
        ("dspark_jax.loading", "conversion.loader", True),
        ("conversion.engine", "conversion.convert", False),
        ("dspark_jax.layers.attention", "pallas_kernels.verify", False),
        ("pallas_kernels.verify", "dspark_jax.errors", False),
        ("dspark_jax.sampling", "dspark_jax.models", False),
        ("dspark_jax.generate", "dspark_jax", True),
        ("dspark_jax.evaluate", "dspark_jax.generate", False),
    ],
)
def test_rules_catch_backwards_imports(src, dst, ok):
    """The checker itself: a few edges whose verdict style.md §2 states outright."""
    assert (_problem(src, dst) is None) == ok, _problem(src, dst)


def test_resolves_relative_and_nested_imports(tmp_path):
    """Relative imports resolve against the package, and imports inside functions count."""
    path = tmp_path / "gpu.py"
    path.write_text("from .. import _common\nfrom .reference import x\ndef f():\n    import dspark_jax.ops\n")
    found = {dst for _, dst, _ in _imports("pallas_kernels.verify.gpu", path, is_init=False)}
    assert found == {"pallas_kernels._common", "pallas_kernels.verify.reference", "dspark_jax.ops"}
