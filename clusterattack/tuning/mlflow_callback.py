"""A Tune callback in the sweep driver that writes one MLflow child run per trial under the sweep's parent run.

Only the driver writes to the store (trials never import mlflow), so a local sqlite
store sees one writer. Parameter names are the AttackConfig's flat field names
(``alpha_a``, ``eps``, ``surrogate.width`` ...) and metric names are the trial's reported
keys, the same in every run, so the MLflow UI compares trials across sweeps, victims and
gradient sources (tags ``victim``, ``gradient_source``, ``eps``, ``phase`` group them).

With the data set's Parquet URI, every run (and the parent) lists its split as an input:
the attacker's pool as ``training``, the test split as ``evaluation`` for runs that score.
A seed run's generator is logged as an MLflow logged model of its run when it completes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ray.tune import Callback

from clusterattack.attacks.config import AttackConfig
from clusterattack.tracking.datasets import EVALUATION, TRAINING, DatasetUse
from clusterattack.tracking.sweeps import RECORDING_ERRORS, SweepRecorder, generator_name
from clusterattack.tuning.trainable import EVALUATION_METRICS, GENERATOR_FILE, trial_params

__all__ = ["TRIAL_METRICS", "MLflowSweepCallback"]

log = logging.getLogger(__name__)

#: Reported keys logged as metrics at step ``epoch`` (besides every ``train.*`` key).
TRIAL_METRICS = (
    *EVALUATION_METRICS,
    "epoch", "image_queries", "calls", "budget_remaining", "restarts", "budget_exhausted", "time_total_s",
    "objective", "select_score", "selection_image_queries", "scoring_image_queries", "selected_epoch", "final",
    "mi_temperature_used",
)  # fmt: skip


class MLflowSweepCallback(Callback):
    """Child run per trial: params at start, metrics per epoch, status at the end.

    Args:
        recorder: the sweep's :class:`SweepRecorder`.
        parent_run_id: the sweep's parent run.
        model, dataset: the victim every trial of this Tune experiment attacks.
        attack: the base attack (sampled fields override it in each run's params).
        params, tags: logged on every child run as well (budget, victim version, ...).
        max_epochs: a trial that ends before it is tagged ``stopped_early`` (ASHA).
        data_uri: the target's Parquet data set (local path or s3://): each run lists it
            as inputs (None: no inputs).
        data_images: images of each split the trials hold (``{"train": ..., "test": ...}``),
            drawn with ``data_seed``; recorded as input tags.
        log_models: log each seed run's generator as a logged model of its run.
    """

    def __init__(
        self,
        recorder: SweepRecorder,
        parent_run_id: str,
        model: str,
        dataset: str,
        attack: AttackConfig,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        max_epochs: int,
        data_uri: str | None = None,
        data_images: Mapping[str, int] | None = None,
        data_seed: int | None = None,
        log_models: bool = True,
    ) -> None:
        self.recorder = recorder
        self.parent_run_id = parent_run_id
        self.model = model
        self.dataset = dataset
        # Kept as a dict: the callback is pickled with the Tune experiment, and a dict
        # still loads after AttackConfig gains a field (new fields take their defaults).
        self.attack = attack.to_dict()
        self.params = dict(params)
        self.tags = dict(tags)
        self.max_epochs = max_epochs
        self.data_uri = data_uri
        self.data_images = dict(data_images or {})
        self.data_seed = data_seed
        self.log_models = log_models
        self._runs: dict[str, str] = {}
        self._steps: dict[str, int] = {}
        self._open: set[str] = set()
        self._parent_inputs = False

    def __getstate__(self) -> dict[str, Any]:
        # Saved with the Tune experiment: run ids are looked up again after a restore.
        state = self.__dict__.copy()
        state["_runs"], state["_steps"], state["_open"] = {}, {}, set()
        state["_parent_inputs"] = False
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A callback pickled before these fields existed (a sweep resumed across versions).
        self.__dict__.update({"data_uri": None, "data_images": {}, "data_seed": None, "log_models": True, **state})

    # ------------------------------------------------------------------ MLflow records
    def _uses(self, scores: bool) -> list[DatasetUse]:
        def use(split: str, context: str) -> DatasetUse:
            images = self.data_images.get(split)
            return DatasetUse(split, context, images, self.data_seed if images is not None else None)

        return [use("train", TRAINING), *([use("test", EVALUATION)] if scores else [])]

    def _log_inputs(self, run_id: str, scores: bool) -> None:
        """The data set's splits as inputs of ``run_id``; a failure is logged, never fatal to the sweep."""
        if self.data_uri is None:
            return
        try:
            self.recorder.log_datasets(run_id, self.data_uri, self._uses(scores))
        except RECORDING_ERRORS as err:
            log.warning("run %s: could not log data set %s as an input: %s", run_id, self.data_uri, err)

    def _scores(self) -> bool:
        """Whether this experiment's runs are scored on the test split (seed runs; oracle search)."""
        return self.tags.get("phase") == "final" or self.tags.get("selection") == "oracle"

    def _attack_tags(self, attack: AttackConfig) -> dict[str, str]:
        """Tags the MLflow UI groups and filters runs by: victim, gradient source, eps, Table 1 row."""
        return {
            "model": self.model,
            "dataset": self.dataset,
            "victim": f"victim-{self.model}-{self.dataset}",
            "gradient_source": attack.gradient_source,
            "norm": attack.norm,
            "eps": f"{attack.eps:g}",
            "black_box": str(attack.black_box),
            "seed": str(attack.seed),
            # One Table 1 row (tuning.sweep.row_key): grouping by it averages a row's seed runs.
            "table_row": f"{self.model}-{self.dataset}-{attack.gradient_source}-eps{attack.eps:g}",
        }

    def _log_generator(self, trial: Any, run_id: str, tags: Mapping[str, Any]) -> None:
        """The generator of a completed seed run (its last checkpoint) as a logged model of its run."""
        from clusterattack.attacks.io import load_generator

        checkpoint = trial.checkpoint
        if checkpoint is None:
            log.warning("seed run %s left no checkpoint: its generator is not logged as a model", trial.trial_id)
            return
        try:
            with checkpoint.as_directory() as folder:
                generator, _, _ = load_generator(f"{folder}/{GENERATOR_FILE}")
            self.recorder.log_generator_model(
                run_id, generator, generator_name(self.model, self.dataset), tags=tags,
                step=self._steps.get(trial.trial_id, 0),
            )  # fmt: skip
        except (*RECORDING_ERRORS, RuntimeError) as err:
            log.warning("seed run %s: could not log its generator as a model: %s", trial.trial_id, err)

    def _run_id(self, trial: Any) -> str:
        run_id = self._runs.get(trial.trial_id)
        if run_id is not None:
            return run_id
        attack = AttackConfig.from_dict(self.attack).override(**trial_params(trial.config))
        params = {
            "model": self.model,
            "dataset": self.dataset,
            "victim": f"victim-{self.model}-{self.dataset}",
            "trial_id": trial.trial_id,
            **self.params,
            **attack.flat(),
        }
        tags = {**self.tags, **self._attack_tags(attack)}
        # Named alike across victims and sources, so the UI's run list reads as a table.
        run_name = f"{self.model}-{self.dataset}-{attack.gradient_source}-eps{attack.eps:g}-" + (
            f"seed{attack.seed}" if self.tags.get("phase") == "final" else trial.trial_id
        )
        run_id = self.recorder.trial_run(self.parent_run_id, trial.trial_id, run_name, params, tags)
        if not self._parent_inputs:
            self._log_inputs(self.parent_run_id, scores=True)
            self._parent_inputs = True
        self._log_inputs(run_id, scores=self._scores())
        self._runs[trial.trial_id] = run_id
        self._open.add(trial.trial_id)
        last = self.recorder.last_step(run_id)
        self._steps[trial.trial_id] = -1 if last is None else last
        return run_id

    # ------------------------------------------------------------------ Tune hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_id(trial)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        self.recorder.set_tags(run_id, {"failures": trial.num_failures})
        log.warning("trial %s failed (%d so far); Tune retries it from its checkpoint", trial.trial_id, trial.num_failures)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self._run_id(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        # A trial retried from its checkpoint reports its epochs again only if it had
        # reported past that checkpoint; the charts keep the first value of each step.
        # A final run's scored result shares the step of its last epoch: always logged.
        if step <= self._steps.get(trial.trial_id, -1) and not result.get("final"):
            return
        self._steps[trial.trial_id] = step
        metrics = {k: v for k, v in result.items() if k in TRIAL_METRICS or k.startswith("train.")}
        self.recorder.log_metrics(run_id, metrics, step=step)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        last = trial.last_result or {}
        epochs = int(last.get("epoch", 0))
        if self.log_models and self.tags.get("phase") == "final":
            attack = AttackConfig.from_dict(self.attack).override(**trial_params(trial.config))
            model_tags = {**self._attack_tags(attack), "trial_id": trial.trial_id, **self.tags}
            self._log_generator(trial, run_id, model_tags)
        self.recorder.set_tags(
            run_id,
            {
                "epochs_run": epochs,
                "stopped_early": str(epochs < self.max_epochs and not last.get("budget_exhausted")),
                "budget_exhausted": str(bool(last.get("budget_exhausted"))),
                "failures": trial.num_failures,
                "status": "completed",
            },
        )
        self.recorder.end_run(run_id, "FINISHED")
        self._open.discard(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._run_id(trial)
        self.recorder.set_tags(run_id, {"status": "error", "failures": trial.num_failures})
        self.recorder.end_run(run_id, "FAILED")
        self._open.discard(trial.trial_id)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Runs still open here belong to trials that neither completed nor failed: the
        # sweep was interrupted (Tune then stops them all, so their status says nothing).
        # KILLED until a resume reopens them.
        for trial_id in sorted(self._open):
            run_id = self._runs[trial_id]
            self.recorder.set_tags(run_id, {"status": "interrupted"})
            self.recorder.end_run(run_id, "KILLED")
        self._open.clear()
