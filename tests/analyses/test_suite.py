"""A tiny sweep's analyses end to end: each a child run of the sweep, the report from that one parent run.

One tiny sweep (8x8 digits, one CC victim, eps 0.1 and 0.2, 2 trials each, 2 seeds) with every
analysis (``jobs/sweep.py --analyses all``: the paper's seven and ``query_detection``) is run in
this process: its deployments screen every query in flag mode, and after its seed runs it runs
the analyses on its registered generators as Ray tasks. 2 generator epochs, so that every
trial's queries stay within the detector's history of 1,600 and all their fingerprints are
still stored. A second parent run holds the same rows with the eps 0.2 generator swapped for a
registered version whose file cannot load: the analysis that needs it fails (and says which
row and why), the one that does not finishes, and the report stands.

The query-detection child run must list every search trial's and seed run's key with the
ledger's count of its queries, and each key's verdict must be the one the detector's own
matching gives when its stored fingerprints are replayed in order through a fresh index.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from tests.reports.helpers import cell, read_page

pytestmark = pytest.mark.slow

JOB = Path(__file__).resolve().parents[2] / "jobs" / "report.py"
ALL = ("breakdown", "norm_curves", "transfer", "detection", "pca", "retraining", "baselines")
#: What the sweep runs: the paper's seven analyses and the query detector's read-back.
SWEPT = (*ALL, "query_detection")


def _job():
    spec = importlib.util.spec_from_file_location("report_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    from clusterattack.tuning.sweep import run_sweep
    from tests.tuning.helpers import private_store, tiny_config

    tmp = tmp_path_factory.mktemp("suite")
    with private_store(tmp):
        config = tiny_config(tmp, "analysed", analyses=SWEPT, epochs=2)
        outcome = run_sweep(config)
        yield tmp, config, outcome


def _request(config, outcome, **changes):
    from clusterattack.analyses.suite import SweepAnalysisRequest
    from clusterattack.tuning.targets import data_uri

    fields = {
        "sweep": config.experiment, "parent_run_id": outcome.parent_run_id, "tracking_uri": outcome.tracking_uri,
        "rows": outcome.table1, "table2": outcome.table2, "data_uris": {"digits": data_uri(config, "digits")},
        "eval_limit": config.eval_limit, "seed": config.seed, "analyses": ALL, "preset": config.preset_name,
        "cpus_per_task": config.cpus_per_trial,
    }  # fmt: skip
    return SweepAnalysisRequest(**{**fields, **changes})


@pytest.fixture(scope="module")
def analysed(swept):
    """The statuses the sweep's own analyses returned, and the state it persisted for --resume."""
    tmp, config, outcome = swept
    state = json.loads((Path(config.storage) / config.experiment / "sweep_state.json").read_text())
    request = _request(config, outcome, state=state)
    return tmp, config, outcome, request, outcome.analyses, [json.dumps(state)]


def _children(client: MlflowClient, parent: str) -> dict[str, list]:
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}' and tags.phase = 'analysis'")
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags["analysis"], []).append(run)
    return out


def _payload(client: MlflowClient, run, tmp: Path) -> dict:
    name = run.data.tags["analysis"]
    return json.loads(Path(client.download_artifacts(run.info.run_id, f"analysis/{name}.json", str(tmp))).read_text())


def test_every_analysis_is_a_finished_child_run_of_the_sweep(analysed, tmp_path):
    from clusterattack.analyses.suite import request_from_sweep, run_sweep_analyses
    from clusterattack.data import read_parquet_dataset
    from clusterattack.tracking.analyses import registered_generator_info

    tmp, config, outcome, request, statuses, saved = analysed
    assert {k: s.status for k, s in statuses.items()} == dict.fromkeys(SWEPT, "FINISHED"), statuses
    client = MlflowClient(outcome.tracking_uri)
    children = _children(client, outcome.parent_run_id)
    assert sorted(children) == sorted(SWEPT) and all(len(v) == 1 for v in children.values())
    rows = {r["eps"]: r for r in outcome.table1}
    assert sorted(rows) == [0.1, 0.2]
    version = rows[0.1]["victim_version"]
    for name, (run,) in children.items():
        tags = run.data.tags
        assert run.info.status == "FINISHED" and run.info.run_id == statuses[name].run_id
        assert (tags["analysis"], tags["sweep"], tags["phase"]) == (name, "analysed", "analysis")
        assert tags["victim_version"] == f"victim-cc-digits/{version}"
        assert tags["generator"] == f"{rows[0.1]['generator']},{rows[0.2]['generator']}"
        assert tags["seeds"] == "1,2" and tags["selection"] == "label_free"
        assert tags["clusterattack.git_commit"] == os.environ["CLUSTERATTACK_TEST_HEAD"]
        assert "error" not in tags
    payloads = {name: _payload(client, runs[0], tmp_path / name) for name, runs in children.items()}
    items = {name: {i["key"]: i for i in p["items"]} for name, p in payloads.items()}
    assert {name: len(v) for name, v in items.items()} == {
        "breakdown": 2, "norm_curves": 1, "transfer": 2, "detection": 2, "pca": 2, "retraining": 1, "baselines": 1,
        "query_detection": 2,
    }  # fmt: skip
    assert all(p["failed"] == [] for p in payloads.values())
    keys = ("cc-digits-surrogate-eps0.1", "cc-digits-surrogate-eps0.2")
    assert set(items["breakdown"]) == set(items["detection"]) == set(items["pca"]) == set(keys)

    # the sweep's own victim and test subset: the clean scores are Table 1's, to the digit
    for eps, key in zip((0.1, 0.2), keys, strict=True):
        b = items["breakdown"][key]
        assert b["provenance"]["generator"] == rows[eps]["generator"] and b["provenance"]["seeds"] == "1,2"
        assert b["payload"]["scores"]["nmi_pre"] == pytest.approx(rows[eps]["nmi_pre"], abs=1e-9)
        assert b["payload"]["n_images"] == config.eval_limit
        assert sum(b["payload"]["cluster_sizes_ordered_post"]) == config.eval_limit
        transfer = items["transfer"][f"digits-surrogate-eps{eps:g}"]["payload"]
        assert transfer["pre"]["cc"]["nmi"] == pytest.approx(rows[eps]["nmi_pre"], abs=1e-9)
        assert transfer["generators"] == {"cc": rows[eps]["generator"]}
        detection = items["detection"][key]["payload"]
        assert (detection["images"], detection["trials"], detection["fit_images"]) == (200, 20, 800)
        assert detection["linf_max"] <= eps + 1e-6
    # norm curves: the sweep's eps grid, black-box and the white-box reference, each within its bound
    curve = items["norm_curves"]["digits-surrogate"]["payload"]
    assert sorted((r["gradient_source"], r["eps"]) for r in curve["rows"]) == [
        ("surrogate", 0.1), ("surrogate", 0.2), ("whitebox", 0.1), ("whitebox", 0.2)]  # fmt: skip
    assert all(r["linf_max"] <= r["eps"] + 1e-6 for r in curve["rows"])
    assert curve["chosen"]["cc"]["0.2"]["alpha_a"] == pytest.approx(rows[0.2]["alpha_a"], rel=1e-6)
    # retraining: both of the victim's generators, the fresh attack from the headline row
    retraining = items["retraining"]["cc-digits"]["payload"]
    assert retraining["generators"] == [rows[0.1]["generator"], rows[0.2]["generator"]]
    assert [r["model"] for r in retraining["rows"]] == ["original", "retrained"]
    # baselines at equal total queries over the whole test split (Appendix E)
    base = items["baselines"][keys[0]]["payload"]
    name, _, v = rows[0.1]["generator"].partition("/")
    spent = int(registered_generator_info(name, v)["metrics"]["image_queries"])
    split = int((read_parquet_dataset(request.data_uris[0][1]).split == "test").sum())
    assert (base["generator_image_queries"], base["split_images"]) == (spent, split)
    assert base["equal_total_budget"] == spent // split and base["sample_images"] == 64
    runs = [r for r in base["rows"] if r["method"] != "generator"]
    assert {r["method"] for r in runs} <= {"nes", "spsa", "square"} and runs
    against = next(r for r in runs if base["payback_against"].startswith(f"{r['method']}@{r['budget']}:"))
    assert base["payback_images"] == math.ceil(spent / against["queries_per_image"])
    search = next(r for r in outcome.table2 if r["eps"] == 0.1)["search_image_queries"]
    assert base["payback_images_with_search"] == math.ceil((spent + search) / against["queries_per_image"])
    assert all(r["queries_per_image"] <= r["budget"] for r in runs)

    # the state the sweep persists (its sweep_state.json), and a second call redoes nothing
    last = json.loads(saved[-1])["analyses"]
    assert {k: v["status"] for k, v in last.items()} == dict.fromkeys(SWEPT, "FINISHED")
    again = run_sweep_analyses(_request(config, outcome, state=json.loads(saved[-1])))
    assert {k: s.status for k, s in again.items()} == dict.fromkeys(ALL, "SKIPPED")
    assert {k: s.run_id for k, s in again.items()} == {k: statuses[k].run_id for k in ALL}
    assert all(len(v) == 1 for v in _children(client, outcome.parent_run_id).values())
    # the request read back from the finished sweep's parent run names the same rows and subset
    back = request_from_sweep(outcome.parent_run_id, "pca")
    assert (back.sweep, back.eval_limit, back.seed, back.data_uris, back.analyses) == (
        "analysed", request.eval_limit, request.seed, request.data_uris, ("pca",))  # fmt: skip
    assert [(r["generator"], r["victim_version"]) for r in back.rows] == [
        (r["generator"], r["victim_version"]) for r in request.rows]  # fmt: skip


def test_report_of_the_parent_run_has_every_section_filled(analysed, tmp_path):
    from tests.reports.test_browser import open_in_chromium

    _, _, outcome, _, statuses, _ = analysed
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert _job().main(["--parent-run", outcome.parent_run_id, "--out", str(tmp_path / "report")]) == 0
    index = Path(printed.getvalue().strip())
    page = read_page(index)
    assert page.states == dict.fromkeys(page.states, "filled") and len(page.states) == 11, page.states
    raw, text = index.read_text(), " ".join(page.text)
    assert 'class="missing"' not in raw and 'class="failed"' not in raw
    assert "not run yet" not in text and "not requested" not in text and "could not be shown" not in text
    for status in statuses.values():
        assert status.run_id in text, status.name
    head = os.environ["CLUSTERATTACK_TEST_HEAD"][:12]
    generators = [r["generator"] for r in outcome.table1]
    for shown in (head, *generators, "label_free", "1,2", "victim-cc-digits/"):
        assert shown in text, shown
    # every table and figure block names its generator run and the code
    assert text.count(head) >= 1 + 2 + 1 + 2 + 2 + 2 + 1 + 1
    assert cell(page, "detection-cc-digits-surrogate-eps0.2", "trials") == 20
    # the report run is logged and the sweep points at it
    client = MlflowClient(outcome.tracking_uri)
    report_run = client.get_run(client.get_run(outcome.parent_run_id).data.tags["report.run_id"])
    assert report_run.data.tags["analysis.baselines"] == statuses["baselines"].run_id
    seen = open_in_chromium(index, 1280, screenshot=tmp_path / "report.png")
    assert seen["images"] and all(ok for _, ok in seen["images"]), seen["images"]
    assert seen["severe"] == [] and seen["overflow"] == [], (seen["severe"], seen["overflow"])
    assert seen["page_width"] <= seen["window_width"]


def _unloadable_generator(client: MlflowClient, tmp: Path) -> str:
    """A registered version of generator-cc-digits whose generator.pt is not a generator file."""
    exp = client.get_experiment_by_name("sweeps").experiment_id
    run = client.create_run(exp, tags={"trial_id": "broken"}, run_name="broken-generator")
    bad = tmp / "generator" / "generator.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a generator at all")
    client.log_artifact(run.info.run_id, str(bad), artifact_path="generator")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(
        "generator-cc-digits", f"runs:/{run.info.run_id}/generator", run_id=run.info.run_id
    )
    return f"generator-cc-digits/{version.version}"


def test_analyses_read_the_registry_the_request_names_not_the_workers_environment(swept, tmp_path, monkeypatch):
    """A Ray worker keeps the environment it started with; on a long-lived cluster that may name
    another registry than the driver's (seen when the session's Ray was started by an earlier
    test with its own store). The request carries the driver's registry to the worker."""
    from clusterattack.analyses.suite import run_sweep_analyses
    from clusterattack.tracking.sweeps import SweepRecorder

    _, config, outcome = swept
    recorder = SweepRecorder(outcome.tracking_uri)
    parent = recorder.start_parent("stale-worker", config.to_dict(), {"sweep": "stale-worker", "preset": "tiny"})
    recorder.end_run(parent)
    request = _request(config, outcome, sweep="stale-worker", parent_run_id=parent, analyses=("breakdown",),
                       use_ray=False)  # fmt: skip
    assert request.registry_uri == os.environ["MLFLOW_REGISTRY_URI"] == outcome.tracking_uri
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{tmp_path / 'another-store.db'}")
    statuses = run_sweep_analyses(request)
    assert statuses["breakdown"].status == "FINISHED", statuses
    (run,) = _children(MlflowClient(outcome.tracking_uri), parent)["breakdown"]
    assert run.info.status == "FINISHED" and "error" not in run.data.tags


def test_baselines_run_one_task_per_victim_merged_into_one_run(analysed, tmp_path):
    """Two victims' baselines (CC's rows again under a second model name) run as two Ray tasks, and
    their shares make one child run whose items are those the unsplit analysis computes."""
    from clusterattack.analyses.suite import run_sweep_analyses
    from clusterattack.analyses.suite.driver import PER_VICTIM, _tasks_of
    from clusterattack.tracking.sweeps import SweepRecorder

    tmp, config, outcome, _, statuses, _ = analysed
    client = MlflowClient(outcome.tracking_uri)
    recorder = SweepRecorder(outcome.tracking_uri)
    parent = recorder.start_parent("two-victims", config.to_dict(), {"sweep": "two-victims", "preset": "tiny"})
    recorder.end_run(parent)
    rows = [*outcome.table1, *(dict(r, model="twin") for r in outcome.table1)]
    table2 = [*outcome.table2, *(dict(r, model="twin") for r in outcome.table2)]
    request = _request(config, outcome, sweep="two-victims", parent_run_id=parent, analyses=("baselines",),
                       rows=rows, table2=table2)  # fmt: skip
    assert "baselines" in PER_VICTIM and _tasks_of("baselines", request) == [("cc",), ("twin",)]
    assert _tasks_of("pca", request) == [None]
    got = run_sweep_analyses(request)
    assert got["baselines"].status == "FINISHED" and got["baselines"].items == 2, got
    (run,) = _children(client, parent)["baselines"]
    assert run.info.status == "FINISHED"
    payload = _payload(client, run, tmp_path / "split")
    assert payload["tasks"] == 2 and payload["failed"] == []
    items = {i["key"]: i["payload"] for i in payload["items"]}
    assert sorted(items) == ["cc-digits-surrogate-eps0.1", "twin-digits-surrogate-eps0.1"]
    # The same seeded attacks on the same victim and images: each share equals the unsplit run's item.
    (whole,) = _children(client, outcome.parent_run_id)["baselines"]
    (before,) = _payload(client, whole, tmp_path / "whole")["items"]
    assert _payload(client, whole, tmp_path / "whole")["tasks"] == 1
    for key, item in items.items():
        assert item["rows"] == before["payload"]["rows"], key
    metrics = run.data.metrics
    assert metrics["items"] == 2 and any(k.startswith("twin-digits") for k in metrics)
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "figures")}
    assert len(artifacts) == 2 * len(list(client.list_artifacts(whole.info.run_id, "figures"))), artifacts


def test_a_per_victim_share_whose_task_died_is_a_failed_item_and_the_others_are_logged(swept, tmp_path):
    import pickle
    import time

    from clusterattack.analyses.suite.driver import _merged
    from clusterattack.analyses.suite.task import _Outcome

    _, config, outcome = swept
    client = MlflowClient(outcome.tracking_uri)
    run_id = client.create_run(client.get_run(outcome.parent_run_id).info.experiment_id).info.run_id
    kept = _Outcome()
    kept.add("cc-digits-surrogate-eps0.1", {"rows": [{"method": "generator", "nmi_drop": 0.5}]}, {"seeds": "1,2"})
    kept.metrics["cc-digits-surrogate-eps0.1.generator_nmi_drop"] = 0.5
    shares = [(("cc",), pickle.dumps(kept)), (("twin",), RuntimeError("the worker died"))]
    result, err = _merged("baselines", _request(config, outcome), run_id, shares, time.perf_counter())
    assert err is None and result["items"] == 1
    assert result["failed"] == [{"key": "twin", "error": "RuntimeError: the worker died"}]
    payload = json.loads(Path(client.download_artifacts(run_id, "analysis/baselines.json", str(tmp_path))).read_text())
    assert [i["key"] for i in payload["items"]] == ["cc-digits-surrogate-eps0.1"] and payload["tasks"] == 2
    assert client.get_run(run_id).data.metrics["cc-digits-surrogate-eps0.1.generator_nmi_drop"] == 0.5
    # Every share failed: the analysis fails, saying why.
    _, err = _merged("baselines", _request(config, outcome), run_id, shares[1:], time.perf_counter())
    assert isinstance(err, RuntimeError) and "every item failed: twin: RuntimeError: the worker died" in str(err)


def test_a_failing_analysis_leaves_the_others_and_the_report_standing(swept, tmp_path):
    """Through ``jobs/report.py --run-analyses`` (the request read back from the parent run)."""
    from clusterattack.tracking.sweeps import SweepRecorder
    from clusterattack.tuning.summary import TABLE1, TABLE2

    _, config, outcome = swept
    client = MlflowClient(outcome.tracking_uri)
    broken = _unloadable_generator(client, tmp_path)
    rows = [dict(r, generator=broken) if r["eps"] == 0.2 else dict(r) for r in outcome.table1]
    recorder = SweepRecorder(outcome.tracking_uri)
    parent = recorder.start_parent("broken", config.to_dict(), {"sweep": "broken", "preset": "tiny"})
    recorder.log_table(parent, rows, TABLE1, tmp_path / "tables")
    recorder.log_table(parent, outcome.table2, TABLE2, tmp_path / "tables")
    recorder.write_json(parent, config.to_dict(), "sweep_config.json")
    recorder.end_run(parent)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        args = ["--parent-run", parent, "--run-analyses", "pca,baselines", "--no-mlflow", "--out", str(tmp_path / "r")]
        assert _job().main(args) == 0
    children = _children(client, parent)
    (pca_run,), (base_run,) = children["pca"], children["baselines"]
    # pca needs both generators: the eps 0.2 one cannot load, the eps 0.1 one is computed and kept
    error = pca_run.data.tags["error"]
    assert pca_run.info.status == "FAILED" and error.startswith("1 of 2 item(s) failed: cc-digits-surrogate-eps0.2: ")
    assert f"cannot load generator {broken}" in error
    payload = _payload(client, pca_run, tmp_path / "pca")
    assert [f["key"] for f in payload["failed"]] == ["cc-digits-surrogate-eps0.2"]
    assert [i["key"] for i in payload["items"]] == ["cc-digits-surrogate-eps0.1"]
    # baselines use the headline row (eps 0.1) only, and go on
    assert base_run.info.status == "FINISHED" and "error" not in base_run.data.tags
    assert client.get_run(parent).data.tags["analyses.requested"] == "pca,baselines"

    page = read_page(Path(printed.getvalue().strip()))
    assert page.states["pca"] == "failed" and page.states["baselines"] == "filled"
    assert cell(page, "pca-cc-digits-surrogate-eps0.1", "points") == config.eval_limit
    text = " ".join(page.text)
    assert error in text and pca_run.info.run_id in text
    for kind in ("norm_curves", "transfer", "detection", "retraining"):
        assert page.states[kind] == "not_requested", kind
        assert f"python jobs/report.py --sweep broken --run-analyses {kind}" in text


def _ledger_used(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as conn:
        return {name: int(used) for name, used in conn.execute("SELECT name, used FROM api_keys")}


def _replay(detector_db: Path, key_id: str, config) -> tuple[np.ndarray, np.ndarray]:
    """(matched as the detector stored it, matched as a fresh index finds it) for every query of the key."""
    with sqlite3.connect(detector_db) as conn:
        stored = conn.execute(
            "SELECT hashes, matched FROM detection_fingerprints WHERE scope = ? ORDER BY row", (f"key:{key_id}",)
        ).fetchall()
    fps = np.stack([np.frombuffer(h, np.uint64) for h, _ in stored])
    return np.array([bool(m) for _, m in stored]), config.index().match(fps).matched


def test_query_detection_child_run_reads_back_every_trial_key(swept, tmp_path):
    from clusterattack.analyses.suite import SweepAnalysisRequest, run_sweep_analyses
    from clusterattack.serving.detector_state import detector_db_path
    from clusterattack.tracking.analyses import sweep_trial_runs
    from clusterattack.tuning.targets import data_uri, sweep_detection

    tmp, config, outcome = swept
    status = outcome.analyses["query_detection"]
    assert status.status == "FINISHED", status
    client = MlflowClient(outcome.tracking_uri)
    run = client.get_run(status.run_id)
    tags = run.data.tags
    assert (tags["analysis"], tags["phase"], tags["mlflow.parentRunId"]) == ("query_detection", "analysis", outcome.parent_run_id)
    assert tags["generator"] == ",".join(r["generator"] for r in outcome.table1) and tags["seeds"] == "1,2"
    assert tags["selection"] == "label_free" and tags["victim_version"].startswith("victim-cc-digits/")
    assert run.data.params["detector.policy"] == "flag" and run.data.params["detector.flag_after"] == "25"
    artifacts = {a.path for a in client.list_artifacts(status.run_id, "query_detection")}
    assert artifacts == {"query_detection/keys.csv", "query_detection/keys.md"}
    assert [a.path for a in client.list_artifacts(status.run_id, "figures")] == ["figures/keys.png"]
    payload = json.loads(
        Path(client.download_artifacts(status.run_id, "analysis/query_detection.json", str(tmp_path))).read_text()
    )
    assert payload["failed"] == []
    items = {i["key"]: i["payload"] for i in payload["items"]}
    assert sorted(items) == ["cc-digits-surrogate", "evaluator"]
    rows = items["cc-digits-surrogate"]["rows"]

    # one row per search trial (2 eps x 2 samples) and seed run (2 eps x 2 seeds), each with its run
    trials = {r["trial_id"]: r for r in sweep_trial_runs(outcome.parent_run_id)}
    assert sorted(r["trial_id"] for r in rows) == sorted(trials) and len(rows) == 8
    assert sorted(r["phase"] for r in rows) == ["final"] * 4 + ["search"] * 4
    assert all(r["run_id"] == trials[r["trial_id"]]["run_id"] for r in rows)

    # images screened = images the ledger charged, key for key, and what each trial reported spending
    folder = Path(config.storage) / config.experiment
    used = _ledger_used(folder / "ledger.sqlite")
    for r in rows:
        assert r["queries"] == r["ledger_image_queries"] == used[f"trial-{r['trial_id']}"] > 0, r
        reported = int(trials[r["trial_id"]]["metrics"]["image_queries"])  # the ledger's count at its last report
        # a seed run reports last after its last query; a search trial ASHA stops may have asked a few more
        assert reported == r["queries"] if r["phase"] == "final" else reported <= r["queries"], r
    (evaluator,) = items["evaluator"]["rows"]
    assert evaluator["queries"] == evaluator["ledger_image_queries"] == used["sweep-evaluator"] > 0

    # each verdict is the detector's: replay the stored fingerprints in order through a fresh index
    detection = sweep_detection(config)
    assert detection.policy == "flag"
    for r in rows:
        assert r["queries"] <= detection.history  # every query's fingerprint is still stored
        stored, replayed = _replay(Path(detector_db_path(str(folder / "ledger.sqlite"))), r["key_id"], detection)
        assert len(stored) == r["queries"] and replayed.tolist() == stored.tolist(), r
        assert int(replayed.sum()) == r["matched"] and r["matched_fraction"] == pytest.approx(r["matched"] / r["queries"])
        recent = np.convolve(replayed.astype(int), np.ones(detection.flag_window, int))[: len(replayed)]
        crossed = np.flatnonzero(recent >= detection.flag_after)
        assert r["flagged"] == bool(crossed.size), r
        assert r["queries_to_flag"] == (int(crossed[0]) + 1 if crossed.size else None), r
        first = np.flatnonzero(replayed)
        assert r["first_match_query"] == (int(first[0]) + 1 if first.size else None), r
        if r["flagged"]:  # a flag needs flag_after matches, the first of them included
            assert r["queries_to_flag"] >= r["first_match_query"] + detection.flag_after - 1, r
    summary = items["cc-digits-surrogate"]
    assert summary["keys"] == 8 and summary["flagged_keys"] == sum(r["flagged"] for r in rows)
    assert run.data.metrics["flagged_keys"] == summary["flagged_keys"]

    # a second call with the state the sweep persisted redoes nothing
    state = json.loads((folder / "sweep_state.json").read_text())
    assert state["analyses"]["query_detection"]["status"] == "FINISHED"
    request = SweepAnalysisRequest(
        sweep=config.experiment, parent_run_id=outcome.parent_run_id, tracking_uri=outcome.tracking_uri,
        rows=outcome.table1, data_uris={"digits": data_uri(config, "digits")}, eval_limit=config.eval_limit,
        seed=config.seed, analyses="query_detection", preset="tiny", state=state, use_ray=False,
    )  # fmt: skip
    again = run_sweep_analyses(request)
    assert again["query_detection"].status == "SKIPPED" and again["query_detection"].run_id == status.run_id


def test_query_detection_without_detector_state_fails_saying_why(swept):
    """A request whose sweep ran without detection (no state read back): the analysis fails, the run says why."""
    from clusterattack.analyses.suite import SweepAnalysisRequest, run_sweep_analyses
    from clusterattack.tracking.sweeps import SweepRecorder
    from clusterattack.tuning.targets import data_uri

    _, config, outcome = swept
    # A parent run of its own: the failed child run must not join the sweep's analyses.
    recorder = SweepRecorder(outcome.tracking_uri)
    parent = recorder.start_parent("no-detector", config.to_dict(), {"sweep": "no-detector", "preset": "tiny"})
    recorder.end_run(parent)
    request = SweepAnalysisRequest(
        sweep="no-detector", parent_run_id=parent, tracking_uri=outcome.tracking_uri,
        rows=outcome.table1, data_uris={"digits": data_uri(config, "digits")}, eval_limit=config.eval_limit,
        seed=config.seed, analyses="query_detection", preset="tiny", use_ray=False,
    )  # fmt: skip
    status = run_sweep_analyses(request)["query_detection"]
    assert status.status == "FAILED" and "no query-detector state" in status.error
    run = MlflowClient(outcome.tracking_uri).get_run(status.run_id)
    assert run.info.status == "FAILED" and "no query-detector state" in run.data.tags["error"]
