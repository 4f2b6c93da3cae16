"""Helpers of the sweep tests: in-process tiny sweeps, a Ray head node of our own, the sweep CLI as a subprocess, store queries."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import free_port, stop_process

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent


@contextlib.contextmanager
def private_store(tmp: Path):
    """While inside, MLflow tracking, registry and artifacts of this process live under ``tmp``."""
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mp.setenv("CLUSTERATTACK_ARTIFACT_ROOT", str(tmp / "mlartifacts"))
        yield


def tiny_config(tmp: Path, name: str, data: str = "data", **changes):
    """The ``tiny`` preset as sweep ``name`` with its storage and data under ``tmp`` and a free Serve port."""
    from clusterattack.tuning.config import SweepConfig

    return SweepConfig.preset(
        "tiny", experiment=name, storage=str(tmp / "sweeps"), data_dir=str(tmp / data), serve_port=free_port(),
        **changes,
    )


def sweep_env(tmp: Path) -> dict[str, str]:
    """Environment of a sweep subprocess: a private MLflow store, no Ray auth, no inherited cluster."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        MLFLOW_REGISTRY_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        CLUSTERATTACK_ARTIFACT_ROOT=str(tmp / "mlartifacts"),
        RAY_AUTH_MODE="disabled",
        RAY_USAGE_STATS_ENABLED="0",
        TQDM_DISABLE="1",
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


def sweep_args(tmp: Path, experiment: str, *extra: str) -> list[str]:
    """Arguments of ``jobs/sweep.py`` for a tiny sweep whose files all live under ``tmp``."""
    return [
        "jobs/sweep.py", "--preset", "tiny", "--storage", str(tmp / "sweeps"), "--data-dir", str(tmp / "data"),
        "--experiment", experiment, "--serve-port", str(free_port()), *extra,
    ]  # fmt: skip


class LocalHead:
    """``ray start --head --block`` on loopback, owned by the test and stopped by it.

    ``ray stop`` would stop every Ray instance on the machine (other tests', other users');
    a SIGTERM to the blocking ``ray start`` stops exactly the processes it started.

    Ready means the dashboard *and* the head's job agent answer: the dashboard alone comes up
    first, and a submission before the agent has registered is refused with "No available
    agent to submit job". The ports are picked free beforehand, which leaves a race: another
    process may bind one before Ray does, and an agent that cannot bind never registers (seen
    once in CI: 120 s of refusals). A head whose agent does not answer is stopped and started
    again on fresh ports, once.
    """

    ATTEMPTS = 2

    def __init__(self, tmp: Path, env: dict[str, str], num_cpus: int = 2, ready_s: float = 180) -> None:
        self.tmp = tmp
        self.env = env
        self.num_cpus = num_cpus
        self.ready_s = ready_s
        self.log = tmp / "ray-head.log"
        self.process: subprocess.Popen | None = None
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.port = free_port()
        self.dashboard_port = free_port()
        self.agent_port = free_port()
        # Unix socket paths must stay short: a temp dir of our own, off the test's tmp path.
        self.temp_dir = f"/tmp/ca-ray-{self.port}"
        self.command = [
            str(VENV_BIN / "ray"), "start", "--head", "--block",
            "--port", str(self.port), "--node-ip-address", "127.0.0.1",
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
            "--include-dashboard", "true", "--num-cpus", str(self.num_cpus),
            "--object-store-memory", str(200 * 1024 * 1024), "--temp-dir", self.temp_dir,
            # Ports of our own: the defaults (the agent's HTTP port 52365 above all) may be held
            # by the test session's Ray, and an agent that cannot bind takes no job submissions.
            "--dashboard-agent-listen-port", str(self.agent_port), "--ray-client-server-port", str(free_port()),
            "--metrics-export-port", str(free_port()),
            "--disable-usage-stats",
        ]  # fmt: skip

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def agent_log_tail(self, n: int = 3000) -> str:
        """The end of this head's dashboard agent log, for failure messages ("" when none)."""
        logs = sorted(Path(self.temp_dir).glob("session_*/logs/dashboard_agent.log"))
        return logs[-1].read_text(errors="replace")[-n:] if logs else ""

    def _answers(self, url: str) -> bool:
        try:
            requests.get(url, timeout=2)
        except requests.RequestException:
            return False
        return True

    def _start_once(self) -> bool:
        with open(self.log, "a") as log:
            self.process = subprocess.Popen(
                self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.ready_s
        urls = [f"{self.dashboard_url}/api/version", f"http://127.0.0.1:{self.agent_port}/api/local_raylet_healthz"]
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}: {self.log.read_text()[-2000:]}")
            # Any HTTP answer from the agent's port means it bound it and is serving.
            if all(self._answers(url) for url in urls):
                return True
            time.sleep(1)
        return False

    def __enter__(self) -> LocalHead:
        for attempt in range(self.ATTEMPTS):
            if attempt:
                self._pick_ports()
            if self._start_once():
                return self
            agent_log = self.agent_log_tail()
            self.__exit__(None, None, None)
        raise TimeoutError(
            f"the Ray head's dashboard or job agent did not answer within {self.ready_s:.0f} s "
            f"({self.ATTEMPTS} starts); last agent log:\n{agent_log}\nhead log:\n{self.log.read_text()[-2000:]}"
        )

    def __exit__(self, *exc_info: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            # Only what this head started: its own session's process group.
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def mlflow_client(tmp: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def sweep_runs(client, experiment: str) -> tuple[object, list]:
    """(parent run, child runs) of sweep ``experiment`` in the store."""
    from clusterattack.tracking.sweeps import PARENT_TAG, SWEEP_EXPERIMENT

    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if PARENT_TAG not in r.data.tags and r.info.run_name == experiment]
    assert len(parents) == 1, f"expected one parent run named {experiment}, found {len(parents)}"
    children = [r for r in runs if r.data.tags.get(PARENT_TAG) == parents[0].info.run_id]
    return parents[0], children


@contextlib.contextmanager
def mlflow_server(tmp_path: Path):
    """``mlflow server`` on loopback over a sqlite store of its own, artifacts proxied by it; yields its URL."""
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")  # noqa: SIM115 (closed below)
    process = subprocess.Popen(
        [
            str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", (tmp_path / "server-artifacts").as_uri(),
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-3000:]
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        except requests.RequestException:
            pass
        assert time.monotonic() < deadline, "the MLflow server did not answer within 120 s"
        time.sleep(1)
    try:
        yield url
    finally:
        stop_process(process)
        log.close()


def rest(url: str, endpoint: str, **params):
    """GET ``/api/2.0/mlflow/<endpoint>`` of the tracking server at ``url``, as its JSON."""
    answer = requests.get(f"{url}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    assert answer.ok, f"{endpoint}: {answer.status_code} {answer.text[:500]}"
    return answer.json()
