"""Where a sweep keeps its state: Tune's storage folder, the state file a resume reads, cluster-wide names."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from clusterattack.tuning.config import SweepConfig

__all__ = [
    "LEDGER_FILE",
    "STATE_FILE",
    "app_suffix",
    "find_resumable",
    "load_state",
    "storage_root",
    "sweep_dir",
    "write_state",
]

STATE_FILE = "sweep_state.json"
#: The budget ledger of the sweep's keys, in its folder (query detection's file lies beside it).
LEDGER_FILE = "ledger.sqlite"


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def storage_root(config: SweepConfig) -> str:
    """Tune's storage path of the sweep: ``<storage>/<experiment>`` (absolute when local)."""
    if _is_uri(config.storage):
        return f"{config.storage.rstrip('/')}/{config.experiment}"
    return os.path.join(os.path.abspath(config.storage.removeprefix("file://")), config.experiment)


def sweep_dir(config: SweepConfig) -> Path:
    """Local folder of the sweep's state, ledger and tables (``storage_root`` when local)."""
    if _is_uri(config.storage):
        return Path.home() / ".clusterattack" / "sweeps" / config.experiment
    return Path(storage_root(config))


def load_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no sweep to resume at {folder}: {STATE_FILE} is missing (was --experiment or --storage wrong?)"
        ) from None


def write_state(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp"
    # The state holds the secret the per-trial API keys derive from: owner-only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2, default=str)
    os.replace(tmp, folder / STATE_FILE)


def find_resumable(storage: str) -> str:
    """Name of the most recent sweep under local ``storage`` that has not completed."""
    root = Path(storage)
    candidates = []
    for path in root.glob(f"*/{STATE_FILE}"):
        try:
            status = json.loads(path.read_text()).get("status")
        except (OSError, ValueError):
            continue
        if status != "completed":
            candidates.append((path.stat().st_mtime, path.parent.name))
    if not candidates:
        raise FileNotFoundError(f"no unfinished sweep under {root.resolve()} to resume")
    return max(candidates)[1]


def app_suffix(experiment: str) -> str:
    """A short, stable suffix naming a sweep's cluster-wide objects (its ledger actor)."""
    return hashlib.sha1(experiment.encode()).hexdigest()[:10]
