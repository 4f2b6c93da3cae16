"""The decision-only album API (Face++-shaped) on Ray Serve, its client, and the attack through it.

``service`` deploys the photo-album clustering service (create, add, group, detail) behind
the serving layer's keys, budgets and rate limits; ``launch`` deploys it, ``grouping`` is the hidden clustering,
``store`` keeps the albums, ``client.AlbumClient`` is the attacker's view, and
``attack.run_api_attack`` trains a surrogate and a generator offline and scores the
service's groups of clean and perturbed images.
Names are imported on first use: the service pulls in Ray Serve and FastAPI, which a
client or a unit test should not pay for.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AlbumClient": "client",
    "AlbumServiceConfig": "config",
    "ApiAttackConfig": "attack",
    "ApiAttackResult": "attack",
    "AlbumStore": "store",
    "GroupingSpec": "grouping",
    "StoreLimits": "store",
    "build_album_app": "launch",
    "deploy_album_service": "launch",
    "launch_album_service": "launch",
    "local_album_service": "launch",
    "run_api_attack": "attack",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
