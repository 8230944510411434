"""Every CLI's --help ends with runnable examples (issue: a CLI that behaves like the tools people know); a library
warning reaches a CLI's user as one line, once."""

import importlib
import subprocess
import sys

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


def test_a_warning_prints_once_as_one_line():
    # As generate's compiling run and timed runs each warn, with the warning filters changed between them (as
    # os.get_exec_path does for every subprocess started by name, e.g. platform's `uname`), which resets Python's own
    # once-per-location memory. In a process of its own: pytest records warnings instead of showing them.
    script = (
        "import warnings\n"
        "from dspark_jax.cli_util import OneLineArgumentParser\n"
        "OneLineArgumentParser()\n"
        "for _ in range(3):\n"
        "    warnings.warn('max_new_tokens 9000 is capped at 17')\n"
        "    warnings.simplefilter('ignore', BytesWarning)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "warning: max_new_tokens 9000 is capped at 17\n", proc.stderr
