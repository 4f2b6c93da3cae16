"""Running a sweep's analyses: one task per analysis (per victim for ``PER_VICTIM`` ones), each logged into a child run of the sweep's parent run."""

from __future__ import annotations

import dataclasses
import logging
import pickle
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

__all__ = ["PER_VICTIM", "analysis_part", "run_analysis", "run_sweep_analyses"]

log = logging.getLogger(__name__)

#: Analyses whose items are one victim each: one task per victim (Table 1's ``model``), their
#: shares merged into the analysis's one child run. The demo's baselines ran 432 s in one task
#: of its two victims while the other core sat idle after 36 s.
PER_VICTIM = frozenset({"baselines"})
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
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"ca-{name}-") as tmp:
        out = _compute(name, request, Path(tmp))
        return _log_outcome(name, request, run_id, out, time.perf_counter() - started)


def analysis_part(name: str, request: SweepAnalysisRequest, models: tuple[str, ...]) -> bytes:
    """The items of per-victim analysis ``name`` over the Table 1 rows of ``models`` only: one
    task's share, returned (not logged) for the driver to merge into the analysis's run.

    Returned pickled: Ray hands numpy arrays back read-only (zero-copy from its object store),
    and a matplotlib figure so received fails when it is drawn ("assignment destination is
    read-only"); ``pickle.loads`` in the driver gives writable copies.
    """
    if name not in PER_VICTIM:
        raise ValueError(f"{name!r} is not split by victim; those that are: {sorted(PER_VICTIM)}")
    part = dataclasses.replace(request, rows=tuple(r for r in request.rows if str(r["model"]) in models))
    with tempfile.TemporaryDirectory(prefix=f"ca-{name}-") as tmp:
        out = _compute(name, part, Path(tmp))
    if out.files:
        raise RuntimeError(f"{name}: a task's share cannot ship files ({sorted(out.files)}): it would lose them")
    return pickle.dumps(out)


def _compute(name: str, request: SweepAnalysisRequest, work: Path) -> _Outcome:
    from clusterattack.tracking.store import configure

    if name not in _ANALYSES:
        raise ValueError(f"unknown analysis {name!r}, expected one of {ANALYSES}")
    configure(request.tracking_uri, request.registry_uri)
    torch.set_num_threads(request.threads)
    out = _Outcome()
    _ANALYSES[name](request, _Loader(request), work, out)
    return out


def _log_outcome(
    name: str, request: SweepAnalysisRequest, run_id: str, out: _Outcome, wall_s: float, tasks: int = 1
) -> dict[str, Any]:
    """Log ``out`` into ``run_id``; raise when every item failed."""
    from clusterattack.tracking.analyses import log_analysis_artifacts
    from clusterattack.tracking.store import source_tags

    payload = {
        "kind": name, "sweep": request.sweep, "parent_run_id": request.parent_run_id, "preset": request.preset,
        "sizes": request.sizes.to_dict(), "eval_limit": request.eval_limit, "seed": request.seed,
        "code": source_tags(), "items": out.items, "failed": out.failed,
        "wall_s": round(wall_s, 1), "tasks": tasks,
    }  # fmt: skip
    out.metrics["items"], out.metrics["failed_items"] = len(out.items), len(out.failed)
    out.metrics["wall_s"] = payload["wall_s"]
    log_analysis_artifacts(
        run_id, name, payload, figures=out.figures, tables=out.tables, files=out.files, metrics=out.metrics
    )
    if not out.items and out.failed:
        raise RuntimeError(f"{name}: every item failed: " + "; ".join(f"{f['key']}: {f['error']}" for f in out.failed))
    return {"items": len(out.items), "failed": out.failed, "wall_s": payload["wall_s"]}


def _tasks_of(name: str, request: SweepAnalysisRequest) -> list[tuple[str, ...] | None]:
    """The victims of each task analysis ``name`` runs as: one per victim where it is split, else [None] (one task)."""
    models = sorted({str(r["model"]) for r in request.rows})
    if name in PER_VICTIM and len(models) > 1:
        return [(m,) for m in models]
    return [None]


def _merged(
    name: str, request: SweepAnalysisRequest, run_id: str, shares: list[tuple[tuple[str, ...], Any]], started: float
) -> tuple[dict[str, Any] | None, Exception | None]:
    """(what the analysis did, None) once its per-victim shares are merged and logged, or (None, the error).

    A share whose task failed (its worker died) is a failed item named by its victims; the
    other shares' items are still logged.
    """
    out = _Outcome()
    for models, share in shares:
        if isinstance(share, Exception):
            out.failed.append({"key": ",".join(models), "error": f"{type(share).__name__}: {share}"})
        else:
            out.merge(pickle.loads(share))
    try:
        return _log_outcome(name, request, run_id, out, time.perf_counter() - started, tasks=len(shares)), None
    except Exception as err:  # recorded as the analysis's failure, like a task's
        return None, err


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
    jobs = [(name, models) for name in todo for models in _tasks_of(name, request)]
    parts: dict[str, dict[tuple[str, ...], Any]] = {}
    try:
        shipped = runner.put(request.detached())
        handles = [
            runner.submit(run_analysis, name, shipped, record[name]["run_id"])
            if models is None
            else runner.submit(analysis_part, name, shipped, models)
            for name, models in jobs
        ]
        for i, result, err in runner.as_completed(handles):
            name, models = jobs[i]
            run_id = record[name]["run_id"]
            if models is not None:
                # A per-victim share: the analysis is done when its last share is, merged in victim order.
                done = parts.setdefault(name, {})
                done[models] = err if err is not None else result
                shares = [m for n, m in jobs if n == name]
                if len(done) < len(shares):
                    continue
                result, err = _merged(name, request, run_id, [(m, done[m]) for m in shares], started)
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
