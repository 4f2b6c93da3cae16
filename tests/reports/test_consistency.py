"""The report from a tiny MLflow store: the numbers on the page are the numbers in ONE sweep's runs, and it is logged."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from clusterattack.tracking.analyses import (
    REQUESTED_TAG,
    finish_analysis_run,
    log_analysis,
    log_analysis_artifacts,
    start_analysis_run,
)
from clusterattack.tracking.reports import (
    REPORT_EXPERIMENT,
    REPORT_TAG,
    SweepNotFound,
    gather_report,
)
from clusterattack.tracking.sweeps import SweepRecorder
from tests.reports.helpers import cell, payloads, pca_points, read_page, table_rows

JOB = Path(__file__).resolve().parents[2] / "jobs" / "report.py"
METRICS = (
    "nmi_pre",
    "nmi_post",
    "ari_pre",
    "ari_post",
    "acc_pre",
    "acc_post",
    "nmi_drop",
    "ari_drop",
    "acc_drop",
)


def _job():
    spec = importlib.util.spec_from_file_location("report_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sweep(uri: str, name: str, tmp: Path, scale: float = 1.0) -> tuple[str, dict[str, str]]:
    """A finished sweep as tuning.sweep writes it: parent run, tables, config, one child run per best trial."""
    recorder = SweepRecorder(uri)
    parent = recorder.start_parent(
        name, {"budget": 20000}, {"sweep": name, "preset": "demo", "norm": "linf"}
    )
    t1, t2 = table_rows()
    children = {}
    for r1, r2 in zip(t1, t2, strict=True):
        for key in METRICS:
            r1[key] *= scale
        tags = {
            k: str(r1[k])
            for k in ("model", "dataset", "victim", "gradient_source", "norm", "eps", "seed")
        }
        run_id = recorder.trial_run(
            parent,
            r1["best_trial"],
            f"{r1['model']}-{r1['best_trial']}",
            {},
            {**tags, "sweep": name},
        )
        recorder.log_metrics(
            run_id,
            {
                **{k: r1[k] for k in METRICS},
                "image_queries": r2["image_queries"],
                "calls": r2["calls"],
            },
            step=3,
        )
        recorder.end_run(run_id)
        children[r1["best_trial"]] = run_id
    recorder.log_table(parent, t1, "table1_attack", tmp / name)
    recorder.log_table(parent, t2, "table2_queries", tmp / name)
    recorder.write_json(
        parent, {"experiment": name, "eval_limit": 100, "seed": 0}, "sweep_config.json"
    )
    recorder.set_tags(parent, {"status": "completed"})
    recorder.end_run(parent)
    return parent, children


def _analyses(parent: str, tmp: Path, scale: float = 1.0) -> dict[str, str]:
    """One child run per analysis under ``parent``, as ``analyses.suite`` writes them (one item each)."""
    ids = {}
    for kind, payload in payloads().items():
        key = f"item-{kind}"
        files, figures = {}, {}
        if kind == "pca":
            path = tmp / kind / "points.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **pca_points())
            payload = {**payload, "points": f"pca/{key}/points.npz"}
            files = {payload["points"]: path}
        if kind == "detection":
            payload = {**payload, "detection_rate_mean": payload["detection_rate_mean"] * scale}
            fig = Figure(figsize=(2, 2))
            fig.add_subplot().hist([1, 2, 2, 3])
            figures = {f"{key}__scores": fig}
        provenance = {"victim": "victim-cc-tiny/1", "generator": "generator-cc-tiny/1", "generator_run_id": "g1",
                      "selection": "label_free", "seeds": "1,2"}  # fmt: skip
        run_id = start_analysis_run(parent, kind, {"sweep": "s", "seeds": "1,2"})
        log_analysis_artifacts(
            run_id, kind, {"kind": kind, "items": [{"key": key, "provenance": provenance, "payload": payload}],
                           "failed": []},
            figures=figures, files=files,
        )  # fmt: skip
        finish_analysis_run(run_id)
        ids[kind] = run_id
    SweepRecorder().set_tags(parent, {REQUESTED_TAG: ",".join(payloads())})
    return ids


def test_report_numbers_equal_the_runs(mlflow_uri, tmp_path):
    old_parent, _ = _sweep(mlflow_uri, "old-sweep", tmp_path, scale=0.5)
    old_ids = _analyses(old_parent, tmp_path / "old", scale=0.5)
    parent, children = _sweep(mlflow_uri, "new-sweep", tmp_path)
    analysis_ids = _analyses(parent, tmp_path / "new")
    # a stand-alone analysis of the same data set, newer than both sweeps: not this sweep's, not shown
    stray = log_analysis("detection", payloads()["detection"], dataset="tiny", gradient_source="whitebox",
                         norm="linf", eps=0.1, seed=0)  # fmt: skip
    out = tmp_path / "report"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _job().main(["--out", str(out), "--images", "4"]) == 0
    index = Path(printed.getvalue().strip())
    assert index == (out / "index.html").resolve() and index.is_file()
    page = read_page(index)
    text = " ".join(page.text)

    # the newest sweep by default; the rows come with their runs' numbers and ids
    client = MlflowClient(mlflow_uri)
    assert "new-sweep" in text and "old-sweep" not in text and parent in text
    run_cells = [c for c in page.cells["table1"] if c.get("data-key") == "run_id"]
    assert len(run_cells) == 2
    for i, trial in enumerate(("t_00000", "t_00001")):
        run = client.get_run(children[trial])
        assert run.info.run_id in text
        for metric in ("nmi", "ari", "acc"):
            assert cell(page, "table1", metric, i, "data-pre") == run.data.metrics[f"{metric}_pre"]
            assert (
                cell(page, "table1", metric, i, "data-post") == run.data.metrics[f"{metric}_post"]
            )
            assert cell(page, "table1", f"{metric}_drop", i) == run.data.metrics[f"{metric}_drop"]
        for table in ("table1", "table2"):
            assert cell(page, table, "image_queries", i) == run.data.metrics["image_queries"]
            assert cell(page, table, "calls", i) == run.data.metrics["calls"]
        assert cell(page, "table1", "eps", i) == float(run.data.tags["eps"])

    # analyses: this sweep's child run of each kind, its numbers and its id; no other sweep's, no stray run
    assert all(page.sections[k] for k in analysis_ids), page.sections
    for kind, run_id in analysis_ids.items():
        assert run_id in text and old_ids[kind] not in text, kind
    assert stray not in text
    p = payloads()
    for metric in ("nmi", "ari", "acc"):
        for i, _source in enumerate(p["transfer"]["sources"]):
            for j, target in enumerate(p["transfer"]["targets"]):
                assert (
                    cell(page, f"transfer-{metric}-item-transfer", target, i)
                    == p["transfer"]["post"][metric][i][j]
                )
    for i, source in enumerate(p["transfer"]["sources"]):
        assert cell(page, "transfer-generators-item-transfer", "train_eps", i) == p["transfer"]["train_eps"][source]
        assert (
            cell(page, "transfer-generators-item-transfer", "image_queries", i)
            == p["transfer"]["image_queries_by_source"][source]
        )
    assert cell(page, "detection-item-detection", "detection_rate_mean") == p["detection"]["detection_rate_mean"]
    assert cell(page, "detection-item-detection", "fpr_mean") == p["detection"]["fpr_mean"]
    assert cell(page, "pca-item-pca", "overlap") == p["pca"]["overlap"]
    assert (
        cell(page, "retraining-item-retraining", "nmi_old_generators", 1)
        == p["retraining"]["rows"][1]["nmi_old_generators"]
    )
    curve = sorted(p["norm_curves"]["rows"], key=lambda r: (r["victim"], r["eps"]))
    for i, row in enumerate(curve):
        assert cell(page, "norm-curves-item-norm_curves", "nmi", i, "data-post") == row["nmi_post"]
    assert cell(page, "baselines-summary-item-baselines", "ratio_equal_total") == p["baselines"]["ratio_equal_total"]
    assert cell(page, "baselines-summary-item-baselines", "payback_images") == p["baselines"]["payback_images"]
    # the detection run's own figure, copied in
    assert "figures/detection_scores-item-detection.png" in page.images
    for src in page.images:
        assert (out / src).is_file(), src

    # no generator was registered and no breakdown requested: those sections say so rather than failing
    assert page.states["confusion"] == "not_requested" and "registered no generator" in text

    # logged: a run in "reports" holding the folder, and the sweep points at it
    exp = client.get_experiment_by_name(REPORT_EXPERIMENT)
    (report_run,) = client.search_runs([exp.experiment_id])
    assert {a.path for a in client.list_artifacts(report_run.info.run_id, "report")} >= {
        "report/index.html", "report/report.json", "report/figures"}  # fmt: skip
    assert client.get_run(parent).data.tags[REPORT_TAG] == report_run.info.run_id
    assert report_run.data.tags["analysis.transfer"] == analysis_ids["transfer"]
    numbers = json.loads((out / "report.json").read_text())
    assert numbers["sweep"]["parent_run_id"] == parent


def test_named_sweep_and_missing_sweep(mlflow_uri, tmp_path):
    old_parent, _ = _sweep(mlflow_uri, "old-sweep", tmp_path, scale=0.5)
    _sweep(mlflow_uri, "new-sweep", tmp_path)
    data = gather_report("old-sweep", breakdown=False, work_dir=tmp_path / "work")
    assert data.sweep.parent_run_id == old_parent
    assert data.sweep.table1[0]["nmi_pre"] == pytest.approx(0.5 * 0.61)
    assert data.analyses == {} and data.dataset == "tiny" and data.requested == ()
    # the missing sections name the commands that run them on this sweep's generators
    assert "python jobs/report.py --sweep old-sweep --run-analyses transfer" in data.commands["transfer"]
    assert data.commands["detection"].startswith("python jobs/report.py --sweep old-sweep --run-analyses detection")
    with pytest.raises(SweepNotFound, match="no-such-sweep.*old-sweep"):
        gather_report("no-such-sweep", breakdown=False, work_dir=tmp_path / "work")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert (
            _job().main(["--sweep", "no-such-sweep", "--no-mlflow", "--out", str(tmp_path / "r")])
            == 2
        )


def test_empty_store_gives_a_report_of_placeholders(mlflow_uri, tmp_path):
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _job().main(["--no-mlflow", "--out", str(tmp_path / "r")]) == 0
    page = read_page(Path(printed.getvalue().strip()))
    assert not any(page.sections.values())
    assert "python jobs/sweep.py --preset demo" in " ".join(page.text)


@pytest.mark.slow
def test_breakdown_from_the_registered_generator_and_victim(mlflow_uri, tmp_path):
    """Confusion matrices and the grid recomputed from models the sweep registered (tiny CC on 8x8 digits)."""
    import torch

    from clusterattack import tracking
    from clusterattack.attacks import AttackConfig, Generator
    from clusterattack.attacks.io import save_generator
    from clusterattack.reports import write_report
    from clusterattack.tracking.victims import log_victim
    from clusterattack.victims.backbones import BackboneConfig
    from clusterattack.victims.cc import CC, CCConfig

    torch.manual_seed(0)
    config = CCConfig(10, (1, 8, 8), BackboneConfig("convnet", 1, 8, 4))
    with tracking.start_run("victims", run_name="cc-digits"):
        log_victim(CC(config).eval(), config, {"nmi": 0.5}, "digits")
    recorder = SweepRecorder(mlflow_uri)
    parent = recorder.start_parent("s", {}, {"sweep": "s"})
    child = recorder.trial_run(parent, "t_00000", "cc-digits-t_00000", {}, {"sweep": "s"})
    attack = AttackConfig(
        norm="linf", eps=0.1, generator_width=4, generator_blocks=1, gradient_source="whitebox"
    )
    generator = Generator((1, 8, 8), width=4, blocks=1)
    path = save_generator(generator, attack, tmp_path / "generator.pt")
    recorder.log_generator(child, generator, "generator-cc-digits", path, {"sweep": "s"})
    row = {"model": "cc", "dataset": "digits", "victim": "victim-cc-digits", "victim_version": "1",
           "gradient_source": "whitebox", "norm": "linf", "eps": 0.1, "seed": 0, "best_trial": "t_00000",
           "nmi_pre": 0.5, "nmi_post": 0.4}  # fmt: skip
    recorder.log_table(parent, [row], "table1_attack", tmp_path / "tables")
    recorder.write_json(
        parent,
        {"eval_limit": 60, "seed": 0, "data_dir": str(tmp_path / "no-parquet")},
        "sweep_config.json",
    )
    recorder.set_tags(parent, {"generator.cc-digits": "generator-cc-digits/1"})

    data = gather_report("s", images=4, work_dir=tmp_path / "work")
    (b,) = data.breakdowns
    assert data.breakdown_error == ""
    assert b.generator == "generator-cc-digits/1" and b.generator_run_id == child
    assert b.victim == "victim-cc-digits/1" and b.eps == 0.1 and b.gradient_source == "whitebox"
    assert b.n_images == 60 and b.image_queries == 120 and b.confusion_pre.sum() == 60
    assert (
        b.grid_clean.shape == (4, 1, 8, 8) and np.abs(b.grid_adv - b.grid_clean).max() <= 0.1 + 1e-6
    )
    page = read_page(write_report(data, tmp_path / "report"))
    assert page.sections["confusion"] and page.sections["grid"]
    assert child in " ".join(page.text)
