"""Every CLI's --help ends with runnable examples (issue: a CLI that behaves like the tools people know)."""

import importlib

import pytest

CLIS = [
    "dspark_jax.generate",
    "dspark_jax.evaluate",
    "dspark_jax.bench",
    "dspark_jax.train",
    "dspark_jax.regenerate",
    "conversion.convert",
]


@pytest.mark.parametrize("module", CLIS)
def test_help_shows_an_example(module):
    text = importlib.import_module(module).build_parser().format_help()
    assert "example" in text and f"python -m {module}" in text.split("example", 1)[1], text[-400:]


def test_corpus_help_shows_an_example(capsys):
    from dspark_jax.training import corpus

    with pytest.raises(SystemExit):
        corpus.main(["--help"])
    assert "example:\n  python -m dspark_jax.training.corpus" in capsys.readouterr().out
