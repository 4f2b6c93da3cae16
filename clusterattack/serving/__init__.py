"""Victims served as budgeted black boxes on Ray Serve, and the client attacks query them.

``deployment`` is the Serve application of a victim (built from a ``config.ServeConfig``,
deployed and launched by ``launch``), ``ledger`` keeps the budgets and ``ledger_actor`` serves
it to every replica, ``detection`` fingerprints queries and ``detector`` flags or blocks keys
whose queries repeat (its state and sqlite file: ``detector_state``), ``schema``
checks requests and ``http_models`` documents them, ``client.ServedVictim`` is the Victim
over a handle or HTTP, ``errors`` holds the typed outcomes, ``metrics`` exports counters
for Prometheus.
Names are imported on first use: importing Ray Serve and FastAPI takes seconds, and an
attack that only needs ``ServedVictim`` or the errors should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServedVictim": "client",
    "AutoscalingSpec": "config",
    "KeySpec": "launch",
    "ServeConfig": "config",
    "DetectionConfig": "detection",
    "build_victim_app": "launch",
    "deploy_victim": "launch",
    "launch_victims": "launch",
    "start_serve": "launch",
    "BadRequest": "errors",
    "BudgetExceeded": "errors",
    "Forbidden": "errors",
    "QueryBlocked": "errors",
    "RateLimited": "errors",
    "ServingError": "errors",
    "Unauthorized": "errors",
    "BudgetLedger": "ledger",
    "LedgerAdmin": "ledger_actor",
    "LedgerConfig": "ledger_actor",
    "get_ledger": "ledger_actor",
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
