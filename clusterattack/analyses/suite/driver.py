"""Running a sweep's analyses: one task per analysis, each logged into a child run of the sweep's parent run."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clusterattack.analyses.suite.baselines import _baselines
from clusterattack.analyses.suite.breakdown import _breakdown
from clusterattack.analyses.suite.defenses import _detection, _pca, _retraining
from clusterattack.analyses.suite.norm_curves import _norm_curves
from clusterattack.analyses.suite.query_detection import _query_detection
from clusterattack.analyses.suite.request import ANALYSES, AnalysisStatus, SweepAnalysisRequest
from clusterattack.analyses.suite.rows import _run_tags
from clusterattack.analyses.suite.task import _Loader, _Outcome
from clusterattack.analyses.suite.transfer import _transfer

__all__ = ["run_analysis", "run_sweep_analyses"]

log = logging.getLogger(__name__)

#: The order tasks are submitted in: the longest first, so that they do not finish last alone.
_ORDER = ("norm_curves", "retraining", "baselines", "detection", "transfer", "pca", "breakdown", "query_detection")


_ANALYSES: dict[str, Callable[[SweepAnalysisRequest, _Loader, Path, _Outcome], None]] = {
    "breakdown": _breakdown,
    "norm_curves": _norm_curves,
    "transfer": _transfer,
    "detection": _detection,
    "pca": _pca,
    "retraining": _retraining,
    "baselines": _baselines,
    "query_detection": _query_detection,
}


def run_analysis(name: str, request: SweepAnalysisRequest, run_id: str) -> dict[str, Any]:
    """One analysis of ``request`` logged into its child run ``run_id`` (left open); what it did.

    The body of each Ray task (callable in-process too). Raises when nothing could be
    computed or logged; items that failed are listed in the returned ``failed``.
    """
    from clusterattack.tracking.analyses import log_analysis_artifacts
    from clusterattack.tracking.store import configure, source_tags

    if name not in _ANALYSES:
        raise ValueError(f"unknown analysis {name!r}, expected one of {ANALYSES}")
    configure(request.tracking_uri, request.registry_uri)
    torch.set_num_threads(request.threads)
    started = time.perf_counter()
    out = _Outcome()
    with tempfile.TemporaryDirectory(prefix=f"ca-{name}-") as tmp:
        _ANALYSES[name](request, _Loader(request), Path(tmp), out)
        payload = {
            "kind": name, "sweep": request.sweep, "parent_run_id": request.parent_run_id, "preset": request.preset,
            "sizes": request.sizes.to_dict(), "eval_limit": request.eval_limit, "seed": request.seed,
            "code": source_tags(), "items": out.items, "failed": out.failed,
            "wall_s": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        out.metrics["items"], out.metrics["failed_items"] = len(out.items), len(out.failed)
        out.metrics["wall_s"] = payload["wall_s"]
        log_analysis_artifacts(
            run_id, name, payload, figures=out.figures, tables=out.tables, files=out.files, metrics=out.metrics
        )
    if not out.items and out.failed:
        raise RuntimeError(f"{name}: every item failed: " + "; ".join(f"{f['key']}: {f['error']}" for f in out.failed))
    return {"items": len(out.items), "failed": out.failed, "wall_s": payload["wall_s"]}


# ------------------------------------------------------------------ the driver
def run_sweep_analyses(request: SweepAnalysisRequest) -> dict[str, AnalysisStatus]:
    """Run the analyses ``request`` names as Ray tasks, each in its own child run; see :mod:`clusterattack.analyses.suite`.

    Returns one :class:`AnalysisStatus` per requested analysis: FINISHED, FAILED (with the
    error) or SKIPPED (finished by an earlier call with the same ``state``). Failed analyses
    run again on the next call; those left RUNNING by an interrupted call are marked KILLED in
    MLflow and run again. ``wall_s`` counts from the first submission (tasks share the CPUs).
    """
    from clusterattack.analyses.common import TaskRunner
    from clusterattack.tracking.analyses import (
        REQUESTED_TAG,
        finish_analysis_run,
        set_parent_tags,
        start_analysis_run,
    )
    from clusterattack.tracking.store import configure

    configure(request.tracking_uri, request.registry_uri)
    record = request.state.setdefault("analyses", {})
    requested = [a for a in ANALYSES if a in request.analyses or a in record]
    set_parent_tags(request.parent_run_id, {REQUESTED_TAG: ",".join(requested)})

    def save() -> None:
        if request.persist is not None:
            request.persist()

    statuses: dict[str, AnalysisStatus] = {}
    todo = []
    for name in [a for a in _ORDER if a in request.analyses]:
        entry = record.get(name, {})
        if entry.get("status") == "FINISHED":
            log.info("analysis %s finished before (run %s): not run again", name, entry.get("run_id"))
            statuses[name] = AnalysisStatus(name, "SKIPPED", entry.get("run_id"), items=int(entry.get("items", 0)))
            continue
        if entry.get("status") == "RUNNING" and entry.get("run_id"):
            finish_analysis_run(entry["run_id"], "KILLED", "interrupted: run again by a resumed sweep")
        todo.append(name)
    if not todo:
        return {a: statuses[a] for a in ANALYSES if a in statuses}

    tags = _run_tags(request)
    params = {f"size.{k}": v for k, v in request.sizes.to_dict().items()}
    for name in todo:
        own = params
        if name == "query_detection" and request.detector:
            own = {**params, **{f"detector.{k}": v for k, v in dict(request.detector["detector"]).items()}}
        run_id = start_analysis_run(request.parent_run_id, name, tags, own, run_name=f"{request.sweep}-{name}")
        record[name] = {"status": "RUNNING", "run_id": run_id}
    save()

    runner = TaskRunner(
        request.use_ray, request.threads, request.ray_address, num_cpus=request.cpus_per_task,
        num_gpus=request.gpus_per_task, max_retries=0,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        shipped = runner.put(request.detached())
        handles = [runner.submit(run_analysis, name, shipped, record[name]["run_id"]) for name in todo]
        for i, result, err in runner.as_completed(handles):
            name = todo[i]
            run_id = record[name]["run_id"]
            wall = time.perf_counter() - started
            if err is not None:  # the analysis raised, or its worker died: record it, go on
                error = f"{type(err).__name__}: {err}"
                log.error("analysis %s failed after %.0f s: %s", name, wall, error)
                finish_analysis_run(run_id, "FAILED", error)
                record[name] = {"status": "FAILED", "run_id": run_id, "error": error}
                statuses[name] = AnalysisStatus(name, "FAILED", run_id, error, wall_s=wall)
            else:
                failed = result["failed"]
                listed = "; ".join(f"{f['key']}: {f['error']}" for f in failed)
                error = f"{len(failed)} of {len(failed) + result['items']} item(s) failed: {listed}" if failed else ""
                status = "FAILED" if failed else "FINISHED"
                finish_analysis_run(run_id, status, error or None)
                record[name] = {"status": status, "run_id": run_id, "items": result["items"], "error": error}
                statuses[name] = AnalysisStatus(
                    name, status, run_id, error, result["items"], tuple(f["key"] for f in failed), wall
                )
                log.info("analysis %s %s after %.0f s (%d items, run %s)", name, status.lower(), wall, result["items"], run_id)
            save()
    except BaseException:
        # Interrupted: the runs still open say so; a resumed sweep marks them KILLED and reruns them.
        save()
        raise
    finally:
        runner.close()
    return {a: statuses[a] for a in ANALYSES if a in statuses}
