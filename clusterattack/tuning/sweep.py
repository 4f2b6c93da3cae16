"""The main job: per target, ensure data and victim, serve it with budgets, run ASHA over the attack, record it all.

``run_sweep(SweepConfig.preset("demo"))`` does, for each (model, dataset) target: ingest the
data set to Parquet (or reuse it), load the registered victim (or train and register it),
deploy it on Serve behind the budget ledger, and run a Tune experiment with ASHA over
the search space, each trial attacking the served victim through its own budgeted key.
The driver writes one MLflow parent run per sweep and a child run per trial, registers
the best generator per target as ``generator-<model>-<dataset>``, and logs Table 1
(pre/post NMI, ARI, ACC) and Table 2 (query complexity) as MLflow tables and as CSV and
Parquet files. ``resume=True`` continues an interrupted sweep from Tune's saved state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterattack.ray_session import init_ray
from clusterattack.tuning.config import METRIC, MODE, SweepConfig

__all__ = [
    "STATE_FILE",
    "SweepOutcome",
    "find_resumable",
    "load_state",
    "run_sweep",
    "sweep_dir",
    "trial_trainable",
]

log = logging.getLogger(__name__)

STATE_FILE = "sweep_state.json"
#: Image-queries of the evaluator key: scoring is not the attack's spend, so it is not capped.
EVALUATOR_BUDGET = 10**15


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
    table3: list[dict[str, Any]] = field(default_factory=list)
    tables: dict[str, dict[str, Path]] = field(default_factory=dict)
    generators: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def _is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def storage_root(config: SweepConfig) -> str:
    """Tune's storage path of the sweep: ``<storage>/<experiment>`` (absolute when local)."""
    if _is_uri(config.storage):
        return f"{config.storage.rstrip('/')}/{config.experiment}"
    return os.path.join(os.path.abspath(config.storage.removeprefix("file://")), config.experiment)


def sweep_dir(config: SweepConfig) -> Path:
    """Local folder of the sweep's state, ledger and tables (``storage_root`` when local)."""
    if _is_uri(config.storage):
        return Path.home() / ".clusterattack" / "sweeps" / config.experiment
    return Path(storage_root(config))


def load_state(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no sweep to resume at {folder}: {STATE_FILE} is missing (was --experiment or --storage wrong?)"
        ) from None


def _write_state(folder: Path, state: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE_FILE}.tmp"
    # The state holds the secret the per-trial API keys derive from: owner-only.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2, default=str)
    os.replace(tmp, folder / STATE_FILE)


def find_resumable(storage: str) -> str:
    """Name of the most recent sweep under local ``storage`` that has not completed."""
    root = Path(storage)
    candidates = []
    for path in root.glob(f"*/{STATE_FILE}"):
        try:
            status = json.loads(path.read_text()).get("status")
        except (OSError, ValueError):
            continue
        if status != "completed":
            candidates.append((path.stat().st_mtime, path.parent.name))
    if not candidates:
        raise FileNotFoundError(f"no unfinished sweep under {root.resolve()} to resume")
    return max(candidates)[1]


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
            raise FileExistsError(f"sweep {config.experiment!r} at {folder} has already completed: nothing to resume")
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
        "gradient_source": config.gradient_source,
        "norm": config.norm,
        "time_attr": config.time_attr,
        "storage": storage_root(config),
    }
    state["parent_run_id"] = recorder.start_parent(
        config.experiment, config.to_dict(), parent_tags, run_id=state.get("parent_run_id")
    )
    state["status"] = "running"
    _write_state(folder, state)
    outcome = SweepOutcome(config, state["parent_run_id"], tracking_uri, folder)
    if not resume:
        recorder.write_json(outcome.parent_run_id, config.to_dict(), "sweep_config.json")

    started_ray = init_ray(ray_address, config.object_store_mb)
    try:
        _run_targets(config, state, folder, recorder, outcome, callbacks, resume)
    except BaseException:
        state["status"] = "interrupted"
        state["wall_s"] = float(state.get("wall_s", 0.0)) + time.perf_counter() - started
        _write_state(folder, state)
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
        _write_state(folder, state)
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
    from clusterattack.serving.ledger_actor import kill_ledger
    from clusterattack.tuning.targets import prepare_target
    from clusterattack.tuning.trainable import derive_api_key, ensure_key

    serve_was_running = _serve_running()
    if not serve_was_running:
        start_serve(config.serve_host, config.serve_port)
    ledger = LedgerConfig(
        db_path=str(folder / "ledger.sqlite"),
        actor_name=f"clusterattack-ledger-{app_suffix(config.experiment)}",
    )
    admin = LedgerAdmin(ledger)
    evaluator_key = derive_api_key(state["secret"], "evaluator")
    ensure_key(admin, "sweep-evaluator", evaluator_key, EVALUATOR_BUDGET)
    apps: list[str] = []
    try:
        for model, dataset in config.targets:
            key = f"{model}-{dataset}"
            done = state["targets"].get(key, {})
            if done.get("done"):
                log.info("target %s already swept: reusing its rows", key)
                _collect(outcome, done)
                continue
            try:
                target = prepare_target(config, model, dataset, ledger, folder)
            except DatasetNotFound as err:
                if not config.skip_missing_datasets:
                    raise
                log.warning("skipping %s: %s", key, err)
                outcome.skipped.append(key)
                continue
            apps.append(target.app_name)
            grid = _tune_target(config, state, folder, recorder, outcome, target, ledger, evaluator_key, callbacks, resume)
            if grid is None:
                outcome.interrupted = True
                return
            done = _summarise_target(config, state, recorder, outcome, target, grid)
            state["targets"][key] = done
            _write_state(folder, state)
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


def app_suffix(experiment: str) -> str:
    """A short, stable suffix naming a sweep's cluster-wide objects (its ledger actor)."""
    return hashlib.sha1(experiment.encode()).hexdigest()[:10]


def _collect(outcome: SweepOutcome, done: dict[str, Any]) -> None:
    outcome.table1.append(done["table1"])
    outcome.table2.append(done["table2"])
    outcome.table3.extend(done.get("table3", []))  # absent in a sweep state saved before it existed
    if done.get("generator"):
        outcome.generators[f"{done['table1']['model']}-{done['table1']['dataset']}"] = done["generator"]


def _tune_target(
    config: SweepConfig,
    state: dict[str, Any],
    folder: Path,
    recorder: Any,
    outcome: SweepOutcome,
    target: Any,
    ledger: Any,
    evaluator_key: str,
    callbacks: Sequence[Any],
    resume: bool,
) -> Any:
    """Run (or restore and continue) the Tune experiment of one target; None when interrupted."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    from clusterattack.tuning.metrics import SweepMetricsCallback
    from clusterattack.tuning.mlflow_callback import MLflowSweepCallback
    from clusterattack.tuning.space import tune_space

    name = f"{target.model}-{target.dataset}"
    trainable = trial_trainable(config, target, ledger, state["secret"], evaluator_key)
    path = f"{storage_root(config)}/{name}"
    if resume and tune.Tuner.can_restore(path):
        log.info("restoring the Tune experiment at %s", path)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        mlflow_callback = MLflowSweepCallback(
            recorder,
            outcome.parent_run_id,
            target.model,
            target.dataset,
            config.attack,
            params={"budget": config.budget, "time_attr": config.time_attr, "victim_version": target.victim_version},
            tags={"sweep": config.experiment, "victim_version": target.victim_version},
            max_epochs=config.attack.epochs,
        )
        scheduler = ASHAScheduler(
            time_attr=config.time_attr,
            max_t=config.asha_max_t,
            grace_period=config.grace_period,
            reduction_factor=config.reduction_factor,
        )
        tuner = tune.Tuner(
            trainable,
            param_space=tune_space(config.space),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode=MODE,
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=config.seed),
                num_samples=config.num_samples,
                max_concurrent_trials=config.max_concurrent,
                # One worker process runs trial after trial: starting a process that imports
                # torch and Ray costs seconds, as long as a whole epoch of a small attack.
                reuse_actors=True,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_root(config),
                failure_config=tune.FailureConfig(max_failures=config.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                callbacks=[
                    mlflow_callback,
                    SweepMetricsCallback(config.experiment, (target.model, target.dataset)),
                    *callbacks,
                ],
                verbose=1,
            ),
        )
    grid = tuner.fit()
    unfinished = _unfinished_trials(path)
    if unfinished:
        log.warning("sweep of %s interrupted with %d trial(s) unfinished: %s", name, len(unfinished), unfinished)
        return None
    if grid.num_errors:
        log.warning("%d trial(s) of %s failed for good: %s", grid.num_errors, name, grid.errors)
    return grid


def _unfinished_trials(path: str) -> list[str]:
    """Trials not finished in the experiment state Tune saved last.

    After Ctrl-C, Tune saves the state and then stops every trial, so the trials it
    returns all look TERMINATED; the saved state still says which were running or pending.
    """
    from ray import tune

    analysis = tune.ExperimentAnalysis(path)
    return [t.trial_id for t in analysis.trials if str(t.status) not in ("TERMINATED", "ERROR")]


def trial_trainable(config: SweepConfig, target: Any, ledger: Any, secret: str, evaluator_key: str) -> Any:
    """The Tune trainable of one prepared target: data and keys bound, resources requested."""
    from ray import tune

    from clusterattack.tuning.trainable import TrialContext, attack_trainable

    context = TrialContext(
        model=target.model,
        dataset=target.dataset,
        app_name=target.app_name,
        ledger=ledger,
        key_secret=secret,
        evaluator_key=evaluator_key,
        budget=config.budget,
        attack=config.attack.to_dict(),
        train_images=target.train_images,
        test_images=target.test_images,
        test_labels=target.test_labels,
        torch_threads=max(1, int(config.cpus_per_trial)),
    )
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(attack_trainable, context=context), resources)


def _summarise_target(
    config: SweepConfig,
    state: dict[str, Any],
    recorder: Any,
    outcome: SweepOutcome,
    target: Any,
    grid: Any,
) -> dict[str, Any]:
    """Best trial, table rows and the registered generator of one finished target."""
    from clusterattack.tuning.summary import TrialSummary, eps_tradeoff_rows, query_row, result_row

    trials = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        trials.append(TrialSummary.from_frame(trial_id, result.config or {}, result.metrics_dataframe))
    reported = [t for t in trials if t.history]
    if not reported:
        raise RuntimeError(f"no trial of {target.model}-{target.dataset} reported a result: {grid.errors}")
    best_result = grid.get_best_result(metric=METRIC, mode=MODE, scope="last")
    best_id = best_result.metrics["trial_id"]
    best = next(t for t in reported if t.trial_id == best_id)
    row1 = result_row(target.model, target.dataset, target.victim_version, best, config.attack, len(trials))
    row1["victim_nmi"] = target.victim_scores.get("nmi")
    row2 = query_row(target.model, target.dataset, best, config.attack, config.budget, trials)
    done: dict[str, Any] = {
        "done": True,
        "table1": row1,
        "table2": row2,
        "table3": eps_tradeoff_rows(target.model, target.dataset, reported, config.attack),
        "best_trial": best_id,
    }
    if config.register_generators and best_result.checkpoint is not None:
        done["generator"] = _register_generator(config, recorder, outcome, target, best_result, row1)
    prefix = f"{target.model}-{target.dataset}"
    metrics = {f"{prefix}.{k}": v for k, v in row1.items() if k.endswith(("_pre", "_post", "_drop"))}
    metrics.update({f"{prefix}.{k}": v for k, v in row2.items() if k.startswith(("image_queries", "calls", "sweep_"))})
    recorder.log_metrics(outcome.parent_run_id, metrics)
    return done


def _register_generator(
    config: SweepConfig, recorder: Any, outcome: SweepOutcome, target: Any, best: Any, row: dict[str, Any]
) -> str:
    from clusterattack.attacks.io import load_generator
    from clusterattack.tracking.sweeps import generator_name
    from clusterattack.tuning.trainable import GENERATOR_FILE

    name = generator_name(target.model, target.dataset)
    run = recorder.find_trial_run(outcome.parent_run_id, row["best_trial"])
    if run is None:
        raise RuntimeError(f"no MLflow run of the best trial {row['best_trial']} under {outcome.parent_run_id}")
    run_id = run.info.run_id
    with best.checkpoint.as_directory() as folder:
        path = Path(folder) / GENERATOR_FILE
        generator, _, _ = load_generator(path)
        tags = {
            k: row[k]
            for k in ("nmi_pre", "nmi_post", "nmi_drop", "gradient_source", "norm", "eps", "alpha_a", "alpha_c", "seed")
        }
        tags.update(victim=target.victim_name, victim_version=target.victim_version, sweep=config.experiment,
                    trial_id=row["best_trial"])  # fmt: skip
        version = recorder.log_generator(run_id, generator, name, path, tags)
    recorder.end_run(run_id, "FINISHED")
    recorder.set_tags(outcome.parent_run_id, {f"generator.{target.model}-{target.dataset}": f"{name}/{version.version}"})
    return f"{name}/{version.version}"


def _finish(config: SweepConfig, state: dict[str, Any], folder: Path, recorder: Any, outcome: SweepOutcome) -> None:
    from clusterattack.tuning.summary import TABLE1, TABLE2, TABLE3

    tables = folder / "tables"
    if outcome.table1:
        outcome.tables[TABLE1] = recorder.log_table(outcome.parent_run_id, outcome.table1, TABLE1, tables)
        outcome.tables[TABLE2] = recorder.log_table(outcome.parent_run_id, outcome.table2, TABLE2, tables)
    if outcome.table3:
        outcome.tables[TABLE3] = recorder.log_table(outcome.parent_run_id, outcome.table3, TABLE3, tables)
    totals = {
        "trials": sum(r["sweep_trials"] for r in outcome.table2),
        "generator_epochs": sum(r["sweep_generator_epochs"] for r in outcome.table2),
        "image_queries": sum(r["sweep_image_queries"] for r in outcome.table2),
        "wall_s": state["wall_s"],
    }
    recorder.log_metrics(outcome.parent_run_id, totals)
    recorder.set_tags(outcome.parent_run_id, {"status": "completed", "skipped": ",".join(outcome.skipped)})
    recorder.end_run(outcome.parent_run_id, "FINISHED")
    state["status"] = "completed"
    _write_state(folder, state)
    log.info("sweep %s completed in %.0f s", config.experiment, outcome.wall_s)
