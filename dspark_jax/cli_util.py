"""Shared CLI plumbing: an argparse parser whose errors are one `error: ...` line and exit status 2."""

from __future__ import annotations

import argparse
import sys
import warnings


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse for the CLIs: a usage error is one `error:` line (exit 2); library warnings print as one
    `warning:` line without a source location."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        warnings.formatwarning = _one_line_warning

    def error(self, message: str):  # argparse's default prints the whole usage block first
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
