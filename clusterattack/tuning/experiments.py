"""One target's experiments with one gradient source: the search per eps, the seed runs, their table rows.

The search is one Tune experiment over every eps of the grid crossed with sampled alpha_a,
alpha_c (...), one ASHA per eps value (:class:`GroupedASHA`); the best trial of each eps is
then trained again from scratch with fresh seeds (a second, plain Tune experiment), whose
test-split scores make Table 1 and Table 2. ``done`` (this experiment's part of the sweep
state) records each finished phase, so a resumed sweep skips it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clusterattack.tuning.config import METRIC, MODE, SweepConfig
from clusterattack.tuning.state import storage_root, write_state

__all__ = ["SourceContext", "experiment_key", "row_key", "sweep_source", "trial_trainable"]

log = logging.getLogger(__name__)


def experiment_key(model: str, dataset: str, gradient_source: str) -> str:
    """Name of one target's experiments with one gradient source (Tune folders, state, MLflow)."""
    return f"{model}-{dataset}-{gradient_source}"


@dataclass
class SourceContext:
    """What the experiments of one prepared target share."""

    config: SweepConfig
    state: dict[str, Any]
    folder: Path
    recorder: Any
    outcome: Any
    target: Any
    ledger: Any
    evaluator_key: str


def sweep_source(ctx: SourceContext, source: str, done: dict[str, Any], callbacks: Sequence[Any], resume: bool) -> bool:
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
        write_state(ctx.folder, ctx.state)
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
    write_state(ctx.folder, ctx.state)
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
    ctx: SourceContext,
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

    from clusterattack.attacks.gradients.pretext import attacker_cache_dir
    from clusterattack.tuning.trainable import TrialContext, attack_trainable

    cache = attacker_cache_dir()
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
        attacker_cache=str(cache.resolve()) if cache else "",
    )
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    return tune.with_resources(tune.with_parameters(attack_trainable, context=context), resources)


def _summarise(ctx: SourceContext, source: str, attack: Any, done: dict[str, Any], finals: list[Any]) -> None:
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


def _register_generator(ctx: SourceContext, source: str, eps: float, runs: list[Any], row: dict[str, Any]) -> str:
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
