"""Shared test set-up: offline, seeded, small; real Ray/MLflow/moto started on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def _checkout_head() -> str:
    """The commit of the checkout the tests run from, by git itself ("" outside a checkout)."""
    try:
        return subprocess.run(
            ["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],
            capture_output=True, text=True, check=True, timeout=20,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# Read once, before any test imports the package: what the source tags of its runs must
# name. (Read later, HEAD could have moved under a long session by a commit made beside it.)
os.environ.setdefault("CLUSTERATTACK_TEST_HEAD", _checkout_head())


def free_port() -> int:
    """A TCP port on loopback that is free right now (MLflow and moto both default to 5000)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_process(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """SIGTERM a server the test started, wait ``timeout_s`` for it to exit, then SIGKILL it."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh local MLflow store (sqlite backend, file artifacts) for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    monkeypatch.setenv("CLUSTERATTACK_ARTIFACT_ROOT", str(tmp_path / "mlartifacts"))
    return uri


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray instance shared by the Ray tests of a session (capped memory)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            object_store_memory=200 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


#: The longest modules (a minute or more each, measured on this 2-core machine), longest first.
#: ``make test`` runs the suite on 2 pytest-xdist workers, one module per worker at a time
#: (``--dist loadfile --no-loadscope-reorder``): started first, they run beside the many short
#: modules instead of ending the run alone.
LONGEST_FIRST = (
    "tests/tuning/test_sweep_cli.py",
    "tests/tuning/test_sweep_inprocess.py",
    "tests/analyses/test_suite.py",
    "tests/docs/test_doc_commands.py",
    "tests/scaleout/test_dashboards.py",
    "tests/tuning/test_sweep_own_victim.py",
    "tests/core/test_mlflow_ui.py",
)


def pytest_collection_modifyitems(config, items):
    """Run the longest modules first; the order within a module, and of the rest, is kept."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
