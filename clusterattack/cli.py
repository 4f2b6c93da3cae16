"""Small argparse helpers the jobs share."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["key_value"]


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` from the command line: VALUE parsed as JSON (numbers, lists, true/false),
    else kept as a plain string, so strings need no quotes; argparse reports a malformed pair."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value
