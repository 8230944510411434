"""Shared CLI plumbing: an argparse parser whose errors are one `error: ...` line and exit status 2."""

from __future__ import annotations

import argparse
import sys


class OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's default prints the whole usage block first
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)
