"""The main job: per target, ensure data and victim, serve it with budgets, search the attack, record it all.

``run_sweep(SweepConfig.preset("demo"))`` does, for each (model, dataset) target: ingest the
data set to Parquet (or reuse it), load the registered victim (or train and register it),
and deploy it on Serve behind the budget ledger. Then, for each black-box gradient source:

1. *search*: one Tune experiment over every eps of the grid crossed with sampled alpha_a,
   alpha_c (...), ASHA comparing trials of the same eps only; each trial attacks the served
   victim through its own budgeted key and reports the selection objective (label-free by
   default: the attacker's own score on images it holds out, paid in queries);
2. *seed runs*: the best trial of each eps is trained again from scratch with fresh seeds,
   each on its own key, and scored on the test split (the only place labels are read).

The driver writes one MLflow parent run per sweep and a child run per trial and seed run,
registers each eps's generator as a version of ``generator-<model>-<dataset>``, and logs
Table 1 (pre/post NMI, ARI, ACC, mean and spread over seeds) and Table 2 (query complexity,
selection queries included) as MLflow tables and as CSV and Parquet files.
``resume=True`` continues an interrupted sweep from Tune's saved state.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterattack.ray_session import init_ray
from clusterattack.tuning.config import SweepConfig, target_name
from clusterattack.tuning.experiments import (
    SourceContext,
    experiment_key,
    row_key,
    sweep_source,
    trial_trainable,
)
from clusterattack.tuning.state import (
    LEDGER_FILE,
    STATE_FILE,
    app_suffix,
    find_resumable,
    load_state,
    storage_root,
    sweep_dir,
    write_state,
)

__all__ = [
    "EVALUATOR_KEY_NAME",
    "STATE_FILE",
    "SweepOutcome",
    "app_suffix",
    "experiment_key",
    "find_resumable",
    "load_state",
    "row_key",
    "run_sweep",
    "storage_root",
    "sweep_dir",
    "trial_trainable",
]

log = logging.getLogger(__name__)

#: Image-queries of the evaluator key: scoring is not the attack's spend, so it is not capped.
EVALUATOR_BUDGET = 10**15
#: The ledger's name of the evaluator key (the experimenter's scoring of seed runs).
EVALUATOR_KEY_NAME = "sweep-evaluator"


@dataclass
class SweepOutcome:
    """What a sweep produced; ``interrupted`` sweeps have no tables yet (resume them)."""

    config: SweepConfig
    parent_run_id: str
    tracking_uri: str
    state_dir: Path
    interrupted: bool = False
    table1: list[dict[str, Any]] = field(default_factory=list)
    table2: list[dict[str, Any]] = field(default_factory=list)
    analyses: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, dict[str, Path]] = field(default_factory=dict)
    generators: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    reread: bool = False  # read back from a completed sweep's folder (tuning.export.completed_outcome)


def _serve_running() -> bool:
    from ray import serve

    status = serve.status()
    return bool(status.proxies) or bool(status.applications)


def run_sweep(
    config: SweepConfig,
    *,
    resume: bool = False,
    callbacks: Sequence[Any] = (),
    ray_address: str | None = None,
) -> SweepOutcome:
    """Run (or with ``resume`` continue) the sweep ``config`` describes; see the module docstring.

    ``callbacks`` are extra Tune callbacks (tests use them to break trials on purpose).
    A resumed sweep takes its config from its state file; ``config`` only locates it.
    """
    from clusterattack import tracking
    from clusterattack.tracking.sweeps import SweepRecorder

    started = time.perf_counter()
    folder = sweep_dir(config)
    if resume:
        state = load_state(folder)
        if state.get("status") == "completed":
            raise FileExistsError(
                f"sweep {config.experiment!r} at {folder} has already completed: nothing to resume (jobs/sweep.py "
                "--resume --record NAME exports its tables; jobs/report.py --run-analyses adds analyses)"
            )
        saved = SweepConfig.from_dict(state["config"])
        if saved != config:
            log.info("resuming %s with its saved config (the given one is ignored)", saved.experiment)
        config = saved
    elif (folder / STATE_FILE).exists():
        raise FileExistsError(
            f"sweep {config.experiment!r} already exists at {folder}; pass resume=True (--resume) to "
            "continue it, or choose another experiment name"
        )
    else:
        state = {"config": config.to_dict(), "secret": secrets.token_urlsafe(32), "targets": {}}

    tracking_uri = tracking.configure()
    recorder = SweepRecorder(tracking_uri)
    parent_tags = {
        "sweep": config.experiment,
        "preset": config.preset_name,
        "gradient_source": ",".join(config.gradient_sources),
        "selection": config.objective,
        "recipe": config.recipe,
        "eps_grid": ",".join(f"{e:g}" for e in config.eps_grid),
        "seeds": str(config.seeds),
        "norm": config.norm,
        "time_attr": config.time_attr,
        "storage": storage_root(config),
    }
    state["parent_run_id"] = recorder.start_parent(
        config.experiment, config.to_dict(), parent_tags, run_id=state.get("parent_run_id")
    )
    state["status"] = "running"
    write_state(folder, state)
    outcome = SweepOutcome(config, state["parent_run_id"], tracking_uri, folder)
    if not resume:
        recorder.write_json(outcome.parent_run_id, config.to_dict(), "sweep_config.json")

    started_ray = init_ray(ray_address, config.object_store_mb)
    try:
        _run_targets(config, state, folder, recorder, outcome, callbacks, resume)
        if not outcome.interrupted and config.analyses and outcome.table1:
            outcome.analyses = _run_analyses(config, state, folder, outcome, tracking_uri, ray_address)
    except BaseException:
        state["status"] = "interrupted"
        state["wall_s"] = float(state.get("wall_s", 0.0)) + time.perf_counter() - started
        write_state(folder, state)
        recorder.end_run(outcome.parent_run_id, "KILLED")
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    outcome.wall_s = time.perf_counter() - started
    # Wall time over every invocation of this sweep (first run and resumes).
    state["wall_s"] = float(state.get("wall_s", 0.0)) + outcome.wall_s
    if outcome.interrupted:
        state["status"] = "interrupted"
        write_state(folder, state)
        recorder.set_tags(outcome.parent_run_id, {"status": "interrupted"})
        recorder.end_run(outcome.parent_run_id, "KILLED")
        return outcome
    _finish(config, state, folder, recorder, outcome)
    return outcome


def _run_targets(
    config: SweepConfig,
    state: dict[str, Any],
    folder: Path,
    recorder: Any,
    outcome: SweepOutcome,
    callbacks: Sequence[Any],
    resume: bool,
) -> None:
    from ray import serve

    from clusterattack.data import DatasetNotFound
    from clusterattack.serving import LedgerAdmin, LedgerConfig
    from clusterattack.serving.deployment import start_serve
    from clusterattack.serving.detector import kill_detector
    from clusterattack.serving.ledger_actor import kill_ledger
    from clusterattack.tuning.targets import prepare_target
    from clusterattack.tuning.trainable import derive_api_key, ensure_key

    serve_was_running = _serve_running()
    if not serve_was_running:
        start_serve(config.serve_host, config.serve_port)
    ledger = LedgerConfig(
        db_path=str(folder / LEDGER_FILE),
        actor_name=f"clusterattack-ledger-{app_suffix(config.experiment)}",
    )
    admin = LedgerAdmin(ledger)
    evaluator_key = derive_api_key(state["secret"], "evaluator")
    ensure_key(admin, EVALUATOR_KEY_NAME, evaluator_key, EVALUATOR_BUDGET)
    apps: list[str] = []
    experiments = state.setdefault("experiments", {})
    try:
        for spec, dataset in config.targets:
            model = target_name(spec)
            keys = [experiment_key(model, dataset, s) for s in config.gradient_sources]
            if all(experiments.get(k, {}).get("done") for k in keys):
                log.info("target %s-%s already swept: reusing its rows", model, dataset)
                for k in keys:
                    _collect(outcome, experiments[k])
                continue
            try:
                target = prepare_target(config, spec, dataset, ledger, folder)
            except DatasetNotFound as err:
                if not config.skip_missing_datasets:
                    raise
                log.warning("skipping %s-%s: %s", model, dataset, err)
                outcome.skipped.append(f"{model}-{dataset}")
                continue
            apps.append(target.app_name)
            for source, key in zip(config.gradient_sources, keys, strict=True):
                done = experiments.setdefault(key, {})
                if not done.get("done"):
                    context = SourceContext(config, state, folder, recorder, outcome, target, ledger, evaluator_key)
                    if not sweep_source(context, source, done, callbacks, resume):
                        outcome.interrupted = True
                        return
                _collect(outcome, done)
    finally:
        for name in apps:
            try:
                serve.delete(name)
            except Exception as err:  # cleanup must not hide the sweep's own error
                log.warning("could not delete Serve app %s: %s", name, err)
        if not serve_was_running:
            serve.shutdown()
        kill_ledger(ledger)
        # Its state stays on disk, where the query_detection analysis reads it back.
        kill_detector(ledger)


def _collect(outcome: SweepOutcome, done: dict[str, Any]) -> None:
    outcome.table1.extend(done["table1"])
    outcome.table2.extend(done["table2"])
    outcome.generators.update(done.get("generators", {}))


def _run_analyses(
    config: SweepConfig,
    state: dict[str, Any],
    folder: Path,
    outcome: SweepOutcome,
    tracking_uri: str,
    ray_address: str | None,
) -> dict[str, Any]:
    """The paper's analyses from this sweep's generators, each a child run of the parent; a
    failing one is recorded as failed and the others go on; finished ones are not redone on
    ``--resume`` (their status lives in the sweep state)."""
    from clusterattack.analyses.suite import (
        SweepAnalysisRequest,
        read_detector_state,
        run_sweep_analyses,
    )
    from clusterattack.tuning.targets import data_uri, sweep_detection

    # What the detector saw of each key, read here: the sqlite files lie in this machine's sweep folder.
    detector = (
        read_detector_state(folder / LEDGER_FILE, sweep_detection(config))
        if "query_detection" in config.analyses
        else None
    )
    request = SweepAnalysisRequest(
        sweep=config.experiment, parent_run_id=outcome.parent_run_id, tracking_uri=tracking_uri,
        rows=outcome.table1, table2=outcome.table2,
        data_uris={d: data_uri(config, d) for d in {r["dataset"] for r in outcome.table1}},
        eval_limit=config.eval_limit, seed=config.seed, analyses=config.analyses, preset=config.preset_name,
        cpus_per_task=config.cpus_per_trial, gpus_per_task=config.gpus_per_trial, device=config.attack.device,
        victim_preset=config.victim_preset, ray_address=ray_address, detector=detector,
        state=state, persist=lambda: write_state(folder, state),
    )  # fmt: skip
    statuses = run_sweep_analyses(request)
    failed = [name for name, status in statuses.items() if status.status == "FAILED"]
    if failed:
        log.warning("analyses that failed (the others stand): %s", ", ".join(sorted(failed)))
    return statuses


def _finish(config: SweepConfig, state: dict[str, Any], folder: Path, recorder: Any, outcome: SweepOutcome) -> None:
    from clusterattack.tuning.summary import TABLE1, TABLE2

    tables = folder / "tables"
    if outcome.table1:
        outcome.tables[TABLE1] = recorder.log_table(outcome.parent_run_id, outcome.table1, TABLE1, tables)
        outcome.tables[TABLE2] = recorder.log_table(outcome.parent_run_id, outcome.table2, TABLE2, tables)
    totals = {
        "rows": len(outcome.table1),
        "search_trials": sum(int(r.get("search_trials") or 0) for r in outcome.table2),
        "final_runs": sum(int(r.get("n_seeds") or 0) for r in outcome.table2),
        "image_queries": sum(int(r.get("sweep_image_queries") or 0) for r in outcome.table2),
        "wall_s": state["wall_s"],
    }
    recorder.log_metrics(outcome.parent_run_id, totals)
    recorder.set_tags(outcome.parent_run_id, {"status": "completed", "skipped": ",".join(outcome.skipped)})
    recorder.end_run(outcome.parent_run_id, "FINISHED")
    state["status"] = "completed"
    write_state(folder, state)
    log.info("sweep %s completed in %.0f s", config.experiment, outcome.wall_s)
