"""The ``query_detection`` analysis of a tiny sweep: its deployments screen in flag mode, the child run reads the keys back.

One tiny sweep (8x8 digits, one CC victim, surrogate, eps 0.1 and 0.2, 2 trials each, 2 seeds;
2 generator epochs, so that every trial's queries stay within the detector's history of 1,600
and all their fingerprints are still stored) with ``analyses="query_detection"`` (``jobs/sweep.py --analyses query_detection``) runs in this
process. Its child run must list every search trial's and seed run's key with the ledger's
count of its queries, and each key's verdict must be the one the detector's own matching gives
when its stored fingerprints are replayed in order through a fresh index.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def swept(ray_session, tmp_path_factory):
    from clusterattack.tuning.sweep import run_sweep
    from tests.tuning.helpers import private_store, tiny_config

    tmp = tmp_path_factory.mktemp("qd")
    with private_store(tmp):
        config = tiny_config(tmp, "screened", analyses="query_detection", epochs=2)
        outcome = run_sweep(config)
        yield tmp, config, outcome


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
    from clusterattack.tuning.targets import data_uri

    _, config, outcome = swept
    request = SweepAnalysisRequest(
        sweep=config.experiment, parent_run_id=outcome.parent_run_id, tracking_uri=outcome.tracking_uri,
        rows=outcome.table1, data_uris={"digits": data_uri(config, "digits")}, eval_limit=config.eval_limit,
        seed=config.seed, analyses="query_detection", preset="tiny", use_ray=False,
    )  # fmt: skip
    status = run_sweep_analyses(request)["query_detection"]
    assert status.status == "FAILED" and "no query-detector state" in status.error
    run = MlflowClient(outcome.tracking_uri).get_run(status.run_id)
    assert run.info.status == "FAILED" and "no query-detector state" in run.data.tags["error"]
