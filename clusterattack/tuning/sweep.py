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

import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterattack.ray_session import init_ray
from clusterattack.tuning.config import METRIC, MODE, SweepConfig, target_name

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
    analyses: dict[str, Any] = field(default_factory=dict)
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
    _write_state(folder, state)
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
                    context = _Context(config, state, folder, recorder, outcome, target, ledger, evaluator_key)
                    if not _sweep_source(context, source, done, callbacks, resume):
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


def experiment_key(model: str, dataset: str, gradient_source: str) -> str:
    """Name of one target's experiments with one gradient source (Tune folders, state, MLflow)."""
    return f"{model}-{dataset}-{gradient_source}"


def app_suffix(experiment: str) -> str:
    """A short, stable suffix naming a sweep's cluster-wide objects (its ledger actor)."""
    return hashlib.sha1(experiment.encode()).hexdigest()[:10]


def _collect(outcome: SweepOutcome, done: dict[str, Any]) -> None:
    outcome.table1.extend(done["table1"])
    outcome.table2.extend(done["table2"])
    outcome.generators.update(done.get("generators", {}))


@dataclass
class _Context:
    """What the experiments of one prepared target share."""

    config: SweepConfig
    state: dict[str, Any]
    folder: Path
    recorder: Any
    outcome: SweepOutcome
    target: Any
    ledger: Any
    evaluator_key: str


def _sweep_source(ctx: _Context, source: str, done: dict[str, Any], callbacks: Sequence[Any], resume: bool) -> bool:
    """Search, then seed runs, of one target with one gradient source; False when interrupted.

    ``done`` (this experiment's part of the sweep state) records each finished phase, so a
    resumed sweep skips it: the search's choice per eps, then the finished rows.
    """
    from ray import tune

    from clusterattack.tuning.summary import best_per_eps, search_totals
    from clusterattack.tuning.trainable import FINAL_KEY

    config, target = ctx.config, ctx.target
    attack = config.attack_for(source)
    key = experiment_key(target.model, target.dataset, source)
    if "chosen" not in done:
        grid = _run_tune(ctx, attack, "search", key, _search_space(config), callbacks, resume)
        if grid is None:
            return False
        trials = _summaries(grid)
        best = best_per_eps(trials)
        missing = [eps for eps in config.eps_grid if eps not in best]
        if missing:
            raise RuntimeError(f"no trial of {key} at eps {missing} reported an objective: {grid.errors}")
        done["chosen"] = {
            repr(eps): {
                "trial_id": trial.trial_id,
                "params": trial.config,
                "objective": trial.best_objective,
                "history": trial.history,
                "search": search_totals([t for t in trials if float(t.config["eps"]) == eps]),
            }
            for eps, trial in best.items()
        }
        _write_state(ctx.folder, ctx.state)
        for eps, trial in best.items():
            log.info("%s eps %g: trial %s chosen (objective %.4f)", key, eps, trial.trial_id, trial.best_objective)
    runs = [
        {**chosen["params"], "seed": seed}
        for chosen in done["chosen"].values()
        for seed in config.final_seeds()
    ]
    grid = _run_tune(ctx, attack, "final", f"{key}-final", {FINAL_KEY: tune.grid_search(runs)}, callbacks, resume)
    if grid is None:
        return False
    finals = _summaries(grid)
    _summarise(ctx, source, attack, done, finals)
    done["done"] = True
    _write_state(ctx.folder, ctx.state)
    return True


def _search_space(config: SweepConfig) -> dict[str, Any]:
    from ray import tune

    from clusterattack.tuning.space import tune_space

    return {**tune_space(config.space), "eps": tune.grid_search(list(config.eps_grid))}


def _summaries(grid: Any) -> list[Any]:
    from clusterattack.tuning.summary import TrialSummary
    from clusterattack.tuning.trainable import trial_params

    out = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        out.append(TrialSummary.from_frame(trial_id, trial_params(result.config or {}), result.metrics_dataframe))
    return out


def _run_tune(
    ctx: _Context,
    attack: Any,
    phase: str,
    name: str,
    param_space: dict[str, Any],
    callbacks: Sequence[Any],
    resume: bool,
) -> Any:
    """Run (or restore and continue) one Tune experiment of a target; None when interrupted.

    The search runs one ASHA per eps value (:class:`GroupedASHA`: trials are compared with
    trials of their own eps only) over ``num_samples`` draws per value; the seed runs are a
    plain grid, each run to its last epoch.
    """
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from clusterattack.tuning.metrics import SweepMetricsCallback
    from clusterattack.tuning.mlflow_callback import MLflowSweepCallback
    from clusterattack.tuning.schedulers import GroupedASHA

    config, target = ctx.config, ctx.target
    trainable = trial_trainable(config, target, ctx.ledger, ctx.state["secret"], ctx.evaluator_key, attack, phase)
    path = f"{storage_root(config)}/{name}"
    if resume and tune.Tuner.can_restore(path):
        log.info("restoring the Tune experiment at %s", path)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        tags = {
            "sweep": config.experiment,
            "victim_version": target.victim_version,
            "phase": phase,
            "selection": config.objective,
            "recipe": config.recipe,
        }
        mlflow_callback = MLflowSweepCallback(
            ctx.recorder,
            ctx.outcome.parent_run_id,
            target.model,
            target.dataset,
            attack,
            params={
                "budget": config.budget, "time_attr": config.time_attr, "victim_version": target.victim_version,
                "selection": config.objective, "recipe": config.recipe, "phase": phase,
                "victim": target.victim_name,
            },  # fmt: skip
            tags=tags,
            max_epochs=attack.epochs,
            # Each run lists the target's Parquet data set as its inputs (tracking.datasets).
            data_uri=target.data_uri,
            data_images={"train": len(target.train_images), "test": len(target.test_images)},
            data_seed=config.seed,
            log_models=config.register_generators,
        )
        search = phase == "search"
        scheduler = (
            GroupedASHA(
                "eps",
                time_attr=config.time_attr,
                max_t=config.asha_max_t,
                grace_period=config.grace_period,
                reduction_factor=config.reduction_factor,
            )
            if search
            else None
        )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=METRIC if search else None,
                mode=MODE if search else None,
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(random_state=config.seed),
                num_samples=config.num_samples if search else 1,
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
        log.warning("%s interrupted with %d trial(s) unfinished: %s", name, len(unfinished), unfinished)
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


def trial_trainable(
    config: SweepConfig,
    target: Any,
    ledger: Any,
    secret: str,
    evaluator_key: str,
    attack: Any,
    phase: str,
) -> Any:
    """The Tune trainable of one prepared target and phase: data and keys bound, resources requested.

    Only runs that score receive the test split: final runs, and search trials under the
    oracle objective. A label-free search trial holds no label and no scoring key.
    """
    from ray import tune

    from clusterattack.tuning.trainable import TrialContext, attack_trainable

    scores = phase == "final" or config.objective == "oracle"
    context = TrialContext(
        model=target.model,
        dataset=target.dataset,
        app_name=target.app_name,
        ledger=ledger,
        key_secret=secret,
        evaluator_key=evaluator_key,
        budget=config.budget,
        attack=attack.to_dict(),
        train_images=target.train_images,
        test_images=target.test_images if scores else None,
        test_labels=target.test_labels if scores else None,
        torch_threads=max(1, int(config.cpus_per_trial)),
        phase=phase,
        objective=config.objective,
    )
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(attack_trainable, context=context), resources)


def _summarise(ctx: _Context, source: str, attack: Any, done: dict[str, Any], finals: list[Any]) -> None:
    """Table rows per eps from the seed runs, and the registered generator of each eps."""
    from clusterattack.tuning.summary import TrialSummary, seed_rows

    config, target = ctx.config, ctx.target
    done["table1"], done["table2"], done["generators"] = [], [], {}
    metrics: dict[str, Any] = {}
    for eps_text, chosen in done["chosen"].items():
        eps = float(eps_text)
        chosen_trial = TrialSummary(chosen["trial_id"], chosen["params"], chosen["history"])
        runs = [f for f in finals if float(f.config["eps"]) == eps and f.final]
        if not runs:
            raise RuntimeError(f"no seed run of {target.model}-{target.dataset} ({source}, eps {eps:g}) was scored")
        row1, row2 = seed_rows(
            model=target.model, dataset=target.dataset, victim=target.victim_name,
            victim_version=target.victim_version, attack=attack,
            chosen=chosen_trial, finals=runs, objective=config.objective, recipe=config.recipe,
            budget=config.budget, search=chosen["search"],
        )  # fmt: skip
        row1["victim_nmi"] = target.victim_scores.get("nmi")
        if config.register_generators:
            row1["generator"] = _register_generator(ctx, source, eps, runs, row1)
            done["generators"][row_key(row1)] = row1["generator"]
        done["table1"].append(row1)
        done["table2"].append(row2)
        prefix = row_key(row1)
        # Two numbers per row, so that parent runs compare across sweeps without burying the
        # UI's default charts under a bar per table cell (the tables hold the rest).
        metrics[f"{prefix}.nmi_drop"] = row1["nmi_drop"]
        metrics[f"{prefix}.image_queries"] = row2["image_queries"]
    ctx.recorder.log_metrics(ctx.outcome.parent_run_id, metrics)


def row_key(row: dict[str, Any]) -> str:
    """``<model>-<dataset>-<gradient source>-eps<eps>``: one Table 1 row, its generator, its metrics."""
    return f"{row['model']}-{row['dataset']}-{row['gradient_source']}-eps{float(row['eps']):g}"


def _register_generator(ctx: _Context, source: str, eps: float, runs: list[Any], row: dict[str, Any]) -> str:
    """Register the generator of the seed run the attacker itself would keep (its best objective).

    That choice is the selection objective's too: label-free, the hold-out score; oracle,
    the test NMI. It names which generator analyses and transfer use, never a table figure.
    """
    from clusterattack.attacks.io import load_generator
    from clusterattack.tracking.sweeps import generator_name
    from clusterattack.tuning.trainable import GENERATOR_FILE

    config, target, recorder = ctx.config, ctx.target, ctx.recorder
    key = "nmi_post" if config.objective == "oracle" else "select_score"
    keep = min(runs, key=lambda r: (float(r.final.get(key, math.inf)), r.trial_id))
    run = recorder.find_trial_run(ctx.outcome.parent_run_id, keep.trial_id)
    if run is None:
        raise RuntimeError(f"no MLflow run of the seed run {keep.trial_id} under {ctx.outcome.parent_run_id}")
    run_id = run.info.run_id
    checkpoint = _final_checkpoint(config, experiment_key(target.model, target.dataset, source), keep.trial_id)
    name = generator_name(target.model, target.dataset)
    generator, _, _ = load_generator(checkpoint / GENERATOR_FILE)
    tags = {
        "gradient_source": source, "norm": row["norm"], "eps": eps, "selection": config.objective,
        "recipe": config.recipe, "seed": keep.config.get("seed"), "alpha_a": row["alpha_a"],
        "alpha_c": row["alpha_c"], "nmi_post": keep.final.get("nmi_post"), "nmi_drop": keep.final.get("nmi_drop"),
        "victim": target.victim_name, "victim_version": target.victim_version, "sweep": config.experiment,
        "trial_id": keep.trial_id,
    }  # fmt: skip
    version = recorder.log_generator(run_id, generator, name, checkpoint / GENERATOR_FILE, tags)
    recorder.set_tags(ctx.outcome.parent_run_id, {f"generator.{row_key(row)}": f"{name}/{version.version}"})
    return f"{name}/{version.version}"


def _final_checkpoint(config: SweepConfig, key: str, trial_id: str) -> Path:
    """The newest checkpoint folder of a seed run (its scored generator), local or fetched from storage."""
    from ray import tune

    analysis = tune.ExperimentAnalysis(f"{storage_root(config)}/{key}-final")
    trial = next((t for t in analysis.trials if t.trial_id == trial_id), None)
    if trial is None or trial.checkpoint is None:
        raise RuntimeError(f"seed run {trial_id} of {key} left no checkpoint")
    return Path(trial.checkpoint.to_directory())


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
    from clusterattack.analyses.suite import SweepAnalysisRequest, run_sweep_analyses
    from clusterattack.tuning.targets import data_uri

    request = SweepAnalysisRequest(
        sweep=config.experiment, parent_run_id=outcome.parent_run_id, tracking_uri=tracking_uri,
        rows=outcome.table1, table2=outcome.table2,
        data_uris={d: data_uri(config, d) for d in {r["dataset"] for r in outcome.table1}},
        eval_limit=config.eval_limit, seed=config.seed, analyses=config.analyses, preset=config.preset_name,
        cpus_per_task=config.cpus_per_trial, gpus_per_task=config.gpus_per_trial, device=config.attack.device,
        victim_preset=config.victim_preset, ray_address=ray_address,
        state=state, persist=lambda: _write_state(folder, state),
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
    _write_state(folder, state)
    log.info("sweep %s completed in %.0f s", config.experiment, outcome.wall_s)
