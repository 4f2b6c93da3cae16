"""The Ray side of the dashboard test, run in a process of its own: `python stack.py WORKDIR`.

It starts a fresh local Ray (dashboard on, so Ray writes its Prometheus service-discovery
file; explicit metrics port; one-second metric export), serves a tiny victim with budgets
through ``clusterattack.serving.launch_victims`` with query detection flagging, puts a
bounded load on it (answered requests, the rich key's repeats that get it flagged, and
requests refused for budget, for a bad key and for invalid images), runs a
three-trial Tune sweep with ``SweepMetricsCallback``, prints one JSON line with what it did,
then keeps everything up until its standard input closes, and shuts down.

A process of its own because the test session may already hold a Ray instance (the
``ray_session`` fixture), and ``ray.init`` starts at most one per process.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import uuid
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TQDM_DISABLE", "1")

import requests  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

logger = logging.getLogger("scaleout.stack")

APP = "tiny-victim"
EXPERIMENT = "dashboard-test"
VICTIM = ("tinynet", "synthetic8")
RICH_CALLS, RICH_IMAGES = 6, 16  # answered: 6 requests of 16 images
POOR_BUDGET, POOR_IMAGES = 24, 16  # one request answered, the second refused for budget
TRIAL_DROPS = {0: 0.25, 1: 0.6, 2: None}  # trial 2 fails before it reports


class TinyVictim(nn.Module):
    """Linear map of 1 x 8 x 8 images to 3 clusters (pickled by value: it lives in __main__)."""

    def __init__(self) -> None:
        super().__init__()
        self.num_clusters = 3
        self.input_shape = (1, 8, 8)
        generator = torch.Generator().manual_seed(0)
        self.linear = nn.Linear(64, 3)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(3, 64, generator=generator))
            self.linear.bias.zero_()

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.linear(x.flatten(1)), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_proba(x)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def put_load(url: str, rich_key: str, poor_key: str) -> dict[str, int]:
    """Answered and refused requests of every kind the dashboard shows; returns the counts."""
    from clusterattack.serving import BudgetExceeded, ServedVictim

    images = torch.rand(RICH_IMAGES, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with ServedVictim(url, rich_key, chunk_size=RICH_IMAGES, max_in_flight=1) as victim:
        for _ in range(RICH_CALLS):
            victim.predict_proba(images)
    with ServedVictim(url, poor_key, chunk_size=POOR_IMAGES, max_in_flight=1) as victim:
        victim.predict_proba(images[:POOR_IMAGES])
        try:
            victim.predict_proba(images[:POOR_IMAGES])
        except BudgetExceeded:
            pass
        else:
            raise AssertionError(f"a budget of {POOR_BUDGET} answered {2 * POOR_IMAGES} images")
    bad_key = requests.post(
        url + "/v1/predict",
        json={"images": images[:1].tolist()},
        headers={"X-API-Key": "not-a-key"},
        timeout=30,
    )
    invalid = requests.post(
        url + "/v1/predict",
        json={"images": (images[:1] * 0 + 7.0).tolist()},
        headers={"X-API-Key": rich_key},
        timeout=30,
    )
    reasons = (bad_key.json().get("reason"), invalid.json().get("reason"))
    if reasons != ("unauthorized", "invalid_images"):
        raise AssertionError(
            f"expected refusals for a bad key and for pixels of 7.0, got {reasons} "
            f"(HTTP {bad_key.status_code} and {invalid.status_code})"
        )
    return {
        "images_served": RICH_CALLS * RICH_IMAGES + POOR_IMAGES,
        "requests_served": RICH_CALLS + 1,
        "poor_remaining": POOR_BUDGET - POOR_IMAGES,
    }


def trial_fn(config: dict) -> None:
    """Reports the drop of its index twice; the trial without one fails."""
    from ray import tune

    drop = TRIAL_DROPS[config["index"]]
    if drop is None:
        raise RuntimeError("trial without a drop fails on purpose")
    for step in range(2):
        tune.report({"nmi_drop": drop * (step + 1) / 2})


def run_sweep(storage: Path) -> None:
    from ray import tune

    from clusterattack.tuning.metrics import SweepMetricsCallback

    tuner = tune.Tuner(
        tune.with_resources(trial_fn, {"cpu": 0.25}),
        param_space={"index": tune.grid_search(sorted(TRIAL_DROPS))},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(
            name=EXPERIMENT,
            storage_path=str(storage),
            callbacks=[SweepMetricsCallback(EXPERIMENT, VICTIM, min_interval_s=0.0)],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            verbose=0,
        ),
    )
    tuner.fit()


def main(workdir: Path) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    import ray
    from ray import serve

    from clusterattack.serving import KeySpec, LedgerConfig, ServeConfig, launch_victims
    from clusterattack.serving.detection import DetectionConfig
    from clusterattack.serving.ledger_actor import kill_ledger

    metrics_port, serve_port = free_port(), free_port()
    context = ray.init(
        address="local",
        num_cpus=2,
        object_store_memory=100 * 1024 * 1024,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=free_port(),
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
        log_to_driver=False,
        configure_logging=False,
    )
    ledger = LedgerConfig(
        db_path=str(workdir / "ledger.sqlite"), actor_name=f"dash-ledger-{uuid.uuid4().hex[:8]}"
    )
    try:
        launched = launch_victims(
            {APP: TinyVictim()},
            config=ServeConfig(
                mode="scores", num_replicas=1, num_cpus=0.25, torch_threads=1,
                max_batch_size=32, max_images_per_request=64,
            ),
            ledger=ledger,
            port=serve_port,
            keys=[KeySpec("rich", budget=10_000), KeySpec("poor", budget=POOR_BUDGET)],
            # The rich key asks the same images six times: flagged, and let through.
            detection=DetectionConfig(policy="flag"),
        )
        keys = {issued.name: issued for issued in launched.keys}
        expected = put_load(launched.urls[APP], keys["rich"].api_key, keys["poor"].api_key)
        run_sweep(workdir / "tune")
        report = {
            "session_dir": context.address_info["session_dir"],
            "metrics_port": metrics_port,
            "app": APP,
            "poor_key_id": keys["poor"].key_id,
            "experiment": EXPERIMENT,
            "model": VICTIM[0],
            "dataset": VICTIM[1],
            "best_nmi_drop": max(d for d in TRIAL_DROPS.values() if d is not None),
            "trials": {"terminated": 2, "error": 1, "running": 0},
            **expected,
        }
        print(json.dumps(report), flush=True)
        sys.stdin.read()  # until the test closes our stdin
    finally:
        serve.shutdown()
        kill_ledger(ledger)
        ray.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
