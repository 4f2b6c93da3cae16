"""A Tune callback in the sweep driver that writes one MLflow child run per trial under the sweep's parent run.

Only the driver writes to the store (trials never import mlflow), so a local sqlite
store sees one writer. Parameter names are the AttackConfig's flat field names
(``alpha_a``, ``eps``, ``surrogate.width`` ...) and metric names are the trial's reported
keys, the same in every run, so the MLflow UI compares trials across sweeps.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ray.tune import Callback

from clusterattack.attacks.config import AttackConfig
from clusterattack.tracking.sweeps import SweepRecorder
from clusterattack.tuning.trainable import EVALUATION_METRICS, trial_params

__all__ = ["TRIAL_METRICS", "MLflowSweepCallback"]

log = logging.getLogger(__name__)

#: Reported keys logged as metrics at step ``epoch`` (besides every ``train.*`` key).
TRIAL_METRICS = (
    *EVALUATION_METRICS,
    "epoch", "image_queries", "calls", "budget_remaining", "restarts", "budget_exhausted", "time_total_s",
    "objective", "select_score", "selection_image_queries", "scoring_image_queries", "selected_epoch", "final",
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
        self._runs: dict[str, str] = {}
        self._steps: dict[str, int] = {}
        self._open: set[str] = set()

    def __getstate__(self) -> dict[str, Any]:
        # Saved with the Tune experiment: run ids are looked up again after a restore.
        state = self.__dict__.copy()
        state["_runs"], state["_steps"], state["_open"] = {}, {}, set()
        return state

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
        tags = {
            **self.tags,
            "model": self.model,
            "dataset": self.dataset,
            "victim": f"victim-{self.model}-{self.dataset}",
            "gradient_source": attack.gradient_source,
            "norm": attack.norm,
            "eps": f"{attack.eps:g}",
            "black_box": str(attack.black_box),
            "seed": str(attack.seed),
        }
        # Named alike across victims and sources, so the UI's run list reads as a table.
        run_name = f"{self.model}-{self.dataset}-{attack.gradient_source}-eps{attack.eps:g}-" + (
            f"seed{attack.seed}" if self.tags.get("phase") == "final" else trial.trial_id
        )
        run_id = self.recorder.trial_run(self.parent_run_id, trial.trial_id, run_name, params, tags)
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
