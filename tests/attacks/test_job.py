"""jobs/attack.py end to end on a tiny local victim file and the 8 x 8 digits, logged to MLflow."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from clusterattack.attacks import CountingVictim
from clusterattack.attacks.io import load_generator
from clusterattack.victims.backbones import BackboneConfig
from clusterattack.victims.cc import CC, CCConfig
from clusterattack.victims.io import save_victim

JOB = Path(__file__).resolve().parents[2] / "jobs" / "attack.py"


def _job():
    spec = importlib.util.spec_from_file_location("attack_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def victim_file(tmp_path) -> Path:
    torch.manual_seed(0)
    model = CC(CCConfig(10, (1, 8, 8), BackboneConfig("convnet", 1, 8, 4)))
    return save_victim(model.eval(), tmp_path / "cc-digits.pt")


def test_recipe_sets_the_readme_black_box_settings_and_flags_override_it():
    job = _job()
    base = ["--victim", "v.pt", "--dataset", "digits"]
    default = job.build_config(job.parse_args(base))
    strong = job.build_config(job.parse_args([*base, "--recipe", "strong"]))
    assert (default.surrogate.arch, default.surrogate.ensemble, default.estimator.prior) == ("small", 1, "none")
    assert strong.epochs == 8 and strong.surrogate.refresh_rounds == 7
    assert (strong.surrogate.arch, strong.surrogate.ensemble) == ("pretext", 2)
    assert (strong.estimator.prior, strong.estimator.samples) == ("surrogate", 1)
    mine = job.build_config(
        job.parse_args([*base, "--recipe", "strong", "--epochs", "3", "--set", "surrogate.ensemble=3"])
    )
    assert mine.epochs == 3 and mine.surrogate.ensemble == 3 and mine.surrogate.arch == "pretext"
    with pytest.raises(SystemExit):
        job.parse_args([*base, "--recipe", "strongest"])


@pytest.mark.slow
def test_job_runs_one_attack_and_records_it(victim_file, tmp_path, mlflow_uri, capsys):
    out = tmp_path / "out"
    code = _job().main(
        [
            "--victim", str(victim_file), "--dataset", "digits", "--gradient-source", "estimate",
            "--eps", "0.1", "--epochs", "1", "--train-limit", "128", "--seed", "1", "--quiet",
            "--budget", "100000", "--out", str(out), "--threads", "1",
            "--set", "generator_width=4", "--set", "estimator.samples=1",
        ]
    )
    assert code == 0
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert "| estimate | linf eps 0.1 |" in row and "image-queries" in row
    record = json.loads((out / "record.json").read_text())
    assert record["victim"] == "cc" and record["dataset"] == "digits" and record["seed"] == 1
    assert record["image_queries"] == 128 + 128 * 3  # clean memberships + (1 + 2q) per image
    assert record["linf_max"] <= 0.1 + 1e-6
    assert {"confusion_pre.png", "confusion_post.png", "cluster_sizes.png"} <= {p.name for p in out.iterdir()}
    generator, config, extra = load_generator(out / "generator.pt")
    assert config.gradient_source == "estimate" and extra["victim"] == "cc"
    assert generator(torch.rand(2, 1, 8, 8)).shape == (2, 1, 8, 8)

    from clusterattack.tracking import client
    from clusterattack.tracking.attacks import download_generator

    runs = client().search_runs([client().get_experiment_by_name("attacks").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["gradient_source"] == "estimate" and run.data.tags["victim"] == "cc"
    assert run.data.metrics["image_queries"] == record["image_queries"]
    assert run.data.params["eps"] == "0.1"
    assert load_generator(download_generator(run.info.run_id, tmp_path / "dl"))[1] == config


def test_job_rejects_a_bad_config_with_a_message(victim_file, capsys):
    assert _job().main(["--victim", str(victim_file), "--dataset", "digits", "--eps", "-1", "--no-mlflow"]) == 2
    assert "eps must be > 0, got -1.0" in capsys.readouterr().err


class _DiesAfter(CountingVictim):
    """A victim whose server goes away once ``limit`` image-queries have been answered."""

    def __init__(self, model, limit: int) -> None:
        super().__init__(model)
        self.limit = limit

    def predict_proba(self, x):
        if self.image_queries >= self.limit:
            raise ConnectionError("victim server went away")
        return super().predict_proba(x)


@pytest.mark.slow
def test_an_interrupted_attack_keeps_its_epochs_and_resumes_in_its_run(
    victim_file, tmp_path, mlflow_uri, monkeypatch, capsys
):
    out = tmp_path / "out"
    flags = [
        "--victim", str(victim_file), "--dataset", "digits", "--gradient-source", "estimate",
        "--epochs", "3", "--train-limit", "128", "--seed", "2", "--quiet", "--out", str(out),
        "--threads", "1", "--set", "generator_width=4", "--set", "estimator.samples=1",
    ]
    per_epoch = 128 * 3  # one step of 128 images, each asked 1 + 2q times
    job = _job()
    # The victim answers the clean memberships and the first epoch, then fails.
    monkeypatch.setattr(job, "CountingVictim", lambda model, budget=None: _DiesAfter(model, 128 + per_epoch))
    with pytest.raises(ConnectionError):
        job.main(flags)

    from clusterattack.tracking import client

    experiment = client().get_experiment_by_name("attacks").experiment_id
    (run,) = client().search_runs([experiment])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "ConnectionError: victim server went away"
    assert run.data.tags["gradient_source"] == "estimate" and run.data.params["eps"] == "0.1"
    streamed = client().get_metric_history(run.info.run_id, "train.loss_g")
    assert [m.step for m in streamed] == [1]
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["state"]["epoch"] == 1 and saved["mlflow_run_id"] == run.info.run_id
    assert not (out / "record.json").exists()

    job = _job()  # the victim is back
    assert job.main([*flags, "--eps", "0.2", "--resume"]) == 2
    assert "was written by another attack (eps: 0.1 there, 0.2 now)" in capsys.readouterr().err
    assert job.main(["--victim", str(victim_file), "--dataset", "digits", "--resume", "--no-mlflow"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err

    assert job.main([*flags, "--resume"]) == 0
    (run,) = client().search_runs([experiment])
    assert run.info.status == "FINISHED" and run.data.tags["resumed"] == "true"
    assert run.data.tags["stopped"] == "completed"
    assert [m.step for m in client().get_metric_history(run.info.run_id, "train.loss_g")] == [1, 2, 3]
    record = json.loads((out / "record.json").read_text())
    assert record["epochs_run"] == 3
    # The clean memberships came back with the checkpoint: they are not asked (or counted) again.
    assert record["image_queries"] == run.data.metrics["image_queries"] == 128 + 3 * per_epoch
    assert not (out / "checkpoint.pt").exists()
    assert job.main([*flags, "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_a_surrogate_attack_resumed_from_its_checkpoint_file_is_the_uninterrupted_attack(
    victim_file, tmp_path, monkeypatch
):
    def flags(out):
        return [
            "--victim", str(victim_file), "--dataset", "digits", "--gradient-source", "surrogate",
            "--epochs", "3", "--train-limit", "128", "--seed", "2", "--quiet", "--out", str(out),
            "--threads", "1", "--no-mlflow", "--set", "generator_width=4",
            "--set", "surrogate.refresh_queries=64", "--set", "surrogate.distill_epochs=2",
            "--set", "surrogate.distill_queries=128",
        ]  # fmt: skip

    assert _job().main(flags(tmp_path / "whole")) == 0
    job = _job()
    # Clean memberships (128), epoch 1's online queries (128) and its refresh round (64),
    # then the server goes away at the first query of epoch 2.
    monkeypatch.setattr(job, "CountingVictim", lambda model, budget=None: _DiesAfter(model, 128 + 128 + 64))
    with pytest.raises(ConnectionError):
        job.main(flags(tmp_path / "cut"))
    saved = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert saved["state"]["epoch"] == 1 and len(saved["state"]["source"]["refresh"]) == 1
    monkeypatch.undo()
    assert _job().main([*flags(tmp_path / "cut"), "--resume"]) == 0

    whole, cut = (json.loads((tmp_path / d / "record.json").read_text()) for d in ("whole", "cut"))
    assert cut["image_queries"] == whole["image_queries"]
    for key in ("epochs_run", "calls", "changed_fraction", "l2_mean", "linf_max", "cluster_sizes_post"):
        assert cut[key] == whole[key], key
    a, b = (load_generator(tmp_path / d / "generator.pt")[0] for d in ("whole", "cut"))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.slow
def test_a_resumed_attack_keeps_to_the_budget_it_started_with(victim_file, tmp_path, monkeypatch):
    out = tmp_path / "out"
    per_epoch = 128 * 3
    budget = 128 + 2 * per_epoch + 10  # room for the clean memberships and two epochs
    flags = [
        "--victim", str(victim_file), "--dataset", "digits", "--gradient-source", "estimate",
        "--epochs", "3", "--train-limit", "128", "--quiet", "--out", str(out), "--no-mlflow",
        "--threads", "1", "--set", "generator_width=4", "--set", "estimator.samples=1",
        "--budget", str(budget),
    ]
    job = _job()
    monkeypatch.setattr(job, "CountingVictim", lambda model, budget=None: _DiesAfter(model, 128 + per_epoch))
    with pytest.raises(ConnectionError):
        job.main(flags)
    assert _job().main([*flags, "--resume"]) == 0
    record = json.loads((out / "record.json").read_text())
    # The resumed process may spend only what the first one left: the third epoch runs out.
    assert record["stopped"] == "budget_exhausted" and record["epochs_run"] == 2
    assert 128 + 2 * per_epoch <= record["image_queries"] <= budget


def test_a_run_id_unknown_to_the_store_starts_a_new_run(mlflow_uri):
    from clusterattack.attacks import AttackConfig
    from clusterattack.tracking import client
    from clusterattack.tracking.attacks import LiveAttackRun

    gone = "0" * 32  # e.g. a checkpoint written against another tracking store
    with LiveAttackRun("cc", "digits", AttackConfig(), run_id=gone) as live:
        live.log_epoch({"epoch": 1, "loss_g": 1.5})
    assert live.run_id not in (None, gone)
    run = client().get_run(live.run_id)
    assert run.info.status == "FINISHED" and "resumed" not in run.data.tags
    assert run.data.tags["victim"] == "cc" and run.data.metrics["train.loss_g"] == 1.5


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_keeps_the_checkpoint(victim_file, tmp_path, mlflow_uri):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable, str(JOB), "--victim", str(victim_file), "--dataset", "digits",
            "--gradient-source", "estimate", "--epochs", "500", "--train-limit", "128", "--quiet",
            "--out", str(out), "--threads", "1", "--set", "generator_width=4", "--set", "estimator.samples=1",
        ],
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no epoch finished in 120 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal SIGTERM" in err and "--resume" in err

    from clusterattack.tracking import client

    (run,) = client().search_runs([client().get_experiment_by_name("attacks").experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags["error"] == "Terminated: stopped by signal SIGTERM"
    saved = torch.load(out / "checkpoint.pt", weights_only=False)
    assert saved["state"]["epoch"] >= 1 and saved["mlflow_run_id"] == run.info.run_id
    assert len(client().get_metric_history(run.info.run_id, "train.loss_g")) >= saved["state"]["epoch"]


def test_sigterm_inside_a_tracking_write_waits_for_the_write_to_end():
    # The flake this fixes: SIGTERM landing inside an epoch's MLflow write left its sqlite
    # transaction open, and ending the run KILLED then failed on "database is locked".
    import os
    import signal

    job = _job()
    interrupts = job._Interrupts()
    steps: list[str] = []
    previous = signal.signal(signal.SIGTERM, interrupts.handler)
    try:
        with pytest.raises(job.Terminated, match="stopped by signal SIGTERM"), interrupts.held():
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("write finished")  # the signal did not cut the write short
            with interrupts.held():  # nested: still held until the outer block ends
                steps.append("checkpoint saved")
            steps.append("outer block ends")
        assert steps == ["write finished", "checkpoint saved", "outer block ends"]
        assert interrupts.pending is None and interrupts.depth == 0
        with pytest.raises(job.Terminated):  # outside a held block it interrupts at once
            os.kill(os.getpid(), signal.SIGTERM)
            steps.append("never")
        assert steps[-1] != "never"
    finally:
        signal.signal(signal.SIGTERM, previous)
