"""The tiny sweep end to end in this process: one trial's worker is killed after its first epoch.

One sweep (about a minute) serves two tests: what the MLflow store holds afterwards, and
that the killed trial was retried from its checkpoint and completed.
"""

from __future__ import annotations

import os
import signal

import pytest
from ray import tune

from tests.conftest import free_port

pytestmark = pytest.mark.slow

EXPERIMENT = "inproc"


class KillAfterFirstCheckpoint(tune.Callback):
    """SIGKILLs the worker process of the first trial whose epoch-1 checkpoint is saved, once.

    Killed once Tune has registered the checkpoint (``on_trial_save``), as a crash after
    a completed epoch would be. The first trial at an ASHA rung is never stopped there,
    so the kill lands on a trial that would have gone on.
    """

    def __init__(self) -> None:
        self.killed: tuple[str, int] | None = None
        self.before: dict | None = None

    def on_trial_save(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if self.killed is None and result.get("epoch") == 1:
            self.killed = (trial.trial_id, int(result["pid"]))
            self.before = dict(result)
            os.kill(int(result["pid"]), signal.SIGKILL)


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    from clusterattack.tuning.config import SweepConfig
    from clusterattack.tuning.sweep import run_sweep

    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mp.setenv("CLUSTERATTACK_ARTIFACT_ROOT", str(tmp / "mlartifacts"))
        config = SweepConfig.preset(
            "tiny",
            experiment=EXPERIMENT,
            storage=str(tmp / "sweeps"),
            data_dir=str(tmp / "data"),
            serve_port=free_port(),
        )
        killer = KillAfterFirstCheckpoint()
        outcome = run_sweep(config, callbacks=[killer])
        yield tmp, config, outcome, killer


def _client(tmp):
    from tests.tuning.helpers import mlflow_client

    return mlflow_client(tmp)


def test_sweep_records_parent_trials_tables_and_best_generator(swept):
    import mlflow.pytorch
    import pandas as pd
    import torch

    from clusterattack.tuning.summary import TABLE1, TABLE2, TABLE3
    from tests.tuning.helpers import sweep_runs

    tmp, config, outcome, _ = swept
    assert not outcome.interrupted
    client = _client(tmp)
    parent, children = sweep_runs(client, EXPERIMENT)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["gradient_source"] == "surrogate" and parent.data.tags["norm"] == "linf"
    assert parent.data.metrics["trials"] == config.num_samples

    # One child run per trial, the same parameter and metric names in each.
    assert len(children) == config.num_samples
    names = {frozenset(c.data.params) for c in children}
    assert len(names) == 1
    for child in children:
        assert child.info.status == "FINISHED"
        for key in ("alpha_a", "alpha_c", "eps", "gradient_source", "norm", "seed", "victim", "budget"):
            assert key in child.data.params
        assert child.data.params["gradient_source"] == "surrogate"
        for key in ("nmi_post", "ari_post", "acc_post", "nmi_drop", "linf_mean", "l2_mean", "image_queries", "calls"):
            assert key in child.data.metrics
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "nmi_post")]
        assert steps == sorted(set(steps)) and steps[0] == 1
        eps = float(child.data.params["eps"])
        assert child.data.metrics["linf_mean"] <= eps + 1e-5  # the norm bound held on the test subset
        assert 0 < child.data.metrics["image_queries"] <= config.budget

    # Tables: MLflow tables plus CSV and Parquet, on the parent run and on disk.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    for name in (TABLE1, TABLE2):
        assert {f"tables/{name}.json", f"tables/{name}.csv", f"tables/{name}.parquet"} <= artifacts
        frame = pd.read_parquet(outcome.tables[name]["parquet"])
        assert list(frame["model"]) == ["cc"] and list(frame["dataset"]) == ["digits"]
    table1 = pd.read_csv(outcome.tables[TABLE1]["csv"])
    for key in ("nmi_pre", "nmi_post", "ari_pre", "ari_post", "acc_pre", "acc_post"):
        assert 0.0 <= float(table1[key].iloc[0]) <= 1.0
    best_nmi = min(c.data.metrics["nmi_post"] for c in children if c.data.tags.get("stopped_early") == "False")
    assert float(table1["nmi_post"].iloc[0]) <= best_nmi + 1e-9
    table2 = pd.read_csv(outcome.tables[TABLE2]["csv"])
    assert int(table2["calls_256"].iloc[0]) == -(-int(table2["image_queries"].iloc[0]) // 256)
    # The eps trade-off: NMI after the attack falls strictly as eps grows along the front,
    # it ends at Table 1's best trial, and every row is a trial run of this sweep.
    assert {f"tables/{TABLE3}.csv", f"tables/{TABLE3}.parquet"} <= artifacts
    front = pd.read_csv(outcome.tables[TABLE3]["csv"])
    assert list(front["eps"]) == sorted(front["eps"]) and front["nmi_post"].is_monotonic_decreasing
    assert front["trial"].iloc[-1] == table1["best_trial"].iloc[0]
    assert set(front["trial"]) <= {c.data.tags["trial_id"] for c in children}

    # The best generator is registered and perturbs 8x8 digits.
    version = client.get_model_version("generator-cc-digits", "1")
    assert version.tags["trial_id"] == table1["best_trial"].iloc[0]
    generator = mlflow.pytorch.load_model("models:/generator-cc-digits/1", map_location="cpu")
    with torch.no_grad():
        assert generator(torch.rand(2, 1, 8, 8)).shape == (2, 1, 8, 8)
    assert outcome.generators == {"cc-digits": "generator-cc-digits/1"}


def test_killed_trial_is_retried_from_its_checkpoint_and_completes(swept):
    tmp, config, outcome, killer = swept
    assert killer.killed is not None, "no trial reported epoch 1"
    trial_id, _ = killer.killed
    client = _client(tmp)
    from tests.tuning.helpers import sweep_runs

    _, children = sweep_runs(client, EXPERIMENT)
    run = next(c for c in children if c.data.tags["trial_id"] == trial_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert run.data.tags["failures"] == "1"
    # It went on past the epoch it was killed after, from that epoch's checkpoint: the
    # epochs continue without repeating, and nothing was queried twice (same key, cached
    # clean memberships): the count is what it was before the kill plus the online
    # surrogate's queries of the epochs run after it (each training image once per epoch).
    epochs = [m.step for m in client.get_metric_history(run.info.run_id, "epoch")]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2
    restarts = client.get_metric_history(run.info.run_id, "restarts")
    assert max(m.value for m in restarts) == 1
    attack = config.attack
    per_epoch = attack.train_limit if attack.surrogate.online else 0
    assert per_epoch > 0  # the tiny preset trains online: the check below counts its queries
    extra = per_epoch * (len(epochs) - killer.before["epoch"])
    assert run.data.metrics["image_queries"] == killer.before["image_queries"] + extra
