"""What every config module shares: the accepted dtypes, field checks with one-line errors, and `config.json`
reading."""

from __future__ import annotations

import json
import os
from typing import Any

from dspark_jax.errors import UsageError

DTYPES = ("float32", "bfloat16")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _number(source: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{source}: {name} must be a number, got {value!r}")
    return float(value)


def _require(d: dict, key: str, source: str) -> Any:
    if key not in d:
        raise UsageError(f"{source}: missing field {key!r}")
    return d[key]


def read_config_json(folder: str) -> dict:
    """The `config.json` of an HF-style folder as a dict, with a one-line error when absent or corrupt."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint folder {folder!r} has no config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(d, dict):
        raise UsageError(f"{path} must hold a JSON object, got {type(d).__name__}")
    return d
