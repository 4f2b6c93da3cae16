"""Save and load trained generators as self-describing files (config, input shape, weights)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.generator import Generator

__all__ = ["load_generator", "save_generator"]

FORMAT = "clusterattack.generator/1"


def save_generator(
    generator: Generator,
    config: AttackConfig,
    path: str | Path,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the generator, the config it was trained with and ``extra`` (e.g. its victim) to ``path``.

    Written to a temporary file first and renamed, so a reader never sees half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": FORMAT,
        "config": config.to_dict(),
        "input_shape": list(generator.input_shape),
        "state_dict": {k: v.detach().cpu() for k, v in generator.state_dict().items()},
        "extra": dict(extra or {}),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_generator(path: str | Path, device: str = "cpu") -> tuple[Generator, AttackConfig, dict[str, Any]]:
    """(generator in eval mode, its AttackConfig, extra) from a file written by ``save_generator``."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        found = blob.get("format") if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(f"{path} is not a generator file (format {FORMAT!r}), found {found!r}")
    try:
        # A generator only perturbs: keys retired since it was trained do not change that.
        config = AttackConfig.from_dict(blob["config"], retired="drop")
    except ValueError as err:
        raise ValueError(
            f"{path}: its attack config does not load in this version of clusterattack ({err}); "
            "it was saved by another version"
        ) from None
    generator = Generator(tuple(blob["input_shape"]), config.generator_width, config.generator_blocks)
    generator.load_state_dict(blob["state_dict"])
    return generator.to(device).eval(), config, blob.get("extra", {})
