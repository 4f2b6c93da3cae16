"""Sweep progress as Ray metrics, so Prometheus and the Grafana dashboard follow a sweep live.

Two gauges, tagged with the sweep's ``experiment`` name and the victim's ``model`` and
``dataset``; Ray exports them with a ``ray_`` prefix on every node's metrics port:

- ``clusterattack_tune_trials`` (extra tag ``status``): trials per Tune status, lower-cased:
  ``pending``, ``running``, ``paused``, ``terminated`` (finished) and ``error`` (failed).
  Every status is published, zeros included, so a panel never loses its series.
- ``clusterattack_tune_best_nmi_drop``: the best relative NMI drop any trial has reached,
  (NMI_clean - NMI_adv) / NMI_clean as :func:`clusterattack.metrics.relative_drop` computes it.

The sweep driver adds :class:`SweepMetricsCallback` to its ``tune.RunConfig(callbacks=...)``,
or calls :func:`record_sweep_progress` itself. Gauges live in the process that sets them
(the driver), and disappear from the export when it exits.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

from ray.tune import Callback
from ray.util.metrics import Gauge

logger = logging.getLogger(__name__)

__all__ = [
    "BEST_NMI_DROP_METRIC",
    "TAG_KEYS",
    "TRIALS_METRIC",
    "TRIAL_STATUSES",
    "SweepMetricsCallback",
    "record_sweep_progress",
]

TRIALS_METRIC = "clusterattack_tune_trials"
BEST_NMI_DROP_METRIC = "clusterattack_tune_best_nmi_drop"
TAG_KEYS = ("experiment", "model", "dataset")
#: Tune's trial statuses (``Trial.PENDING`` ... ``Trial.ERROR``), lower-cased as exported.
TRIAL_STATUSES = ("pending", "running", "paused", "terminated", "error")

_lock = threading.Lock()

#: (model, dataset) of a victim.
VictimKey = tuple[str, str]


@lru_cache(maxsize=1)
def _gauges() -> tuple[Gauge, Gauge]:
    trials = Gauge(
        TRIALS_METRIC,
        description="Trials of a sweep per Tune status: pending, running, paused, "
        "terminated (finished), error (failed).",
        tag_keys=(*TAG_KEYS, "status"),
    )
    best = Gauge(
        BEST_NMI_DROP_METRIC,
        description="Best relative NMI drop (NMI_clean - NMI_adv) / NMI_clean reached by "
        "any trial of the sweep so far.",
        tag_keys=TAG_KEYS,
    )
    return trials, best


def _check_tag(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string (a metric tag), got {value!r}")
    return value


def record_sweep_progress(
    *,
    experiment: str,
    model: str,
    dataset: str,
    trials_by_status: Mapping[str, int],
    best_nmi_drop: float | None = None,
) -> None:
    """Publish the trial counts of one victim's sweep and, when known, its best NMI drop.

    ``trials_by_status`` maps statuses of :data:`TRIAL_STATUSES` (any case) to counts;
    statuses left out are published as 0. ``best_nmi_drop`` is None until a trial reports.
    """
    tags = {
        "experiment": _check_tag("experiment", experiment),
        "model": _check_tag("model", model),
        "dataset": _check_tag("dataset", dataset),
    }
    counts = dict.fromkeys(TRIAL_STATUSES, 0)
    for status, count in trials_by_status.items():
        key = str(status).lower()
        if key not in counts:
            raise ValueError(f"unknown trial status {status!r}; expected one of {TRIAL_STATUSES}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"trial count of status {status!r} must be an int >= 0, got {count!r}")
        counts[key] = count
    if best_nmi_drop is not None and not math.isfinite(best_nmi_drop):
        raise ValueError(f"best_nmi_drop must be a finite number or None, got {best_nmi_drop!r}")
    with _lock:
        trials_gauge, best_gauge = _gauges()
    for status, count in counts.items():
        trials_gauge.set(count, tags={**tags, "status": status})
    if best_nmi_drop is not None:
        best_gauge.set(float(best_nmi_drop), tags=tags)


class SweepMetricsCallback(Callback):
    """Publishes a Tune run's trial counts and best NMI drop after every trial event.

    Args:
        experiment: the run's name (``tune.RunConfig(name=...)``); tells sweeps apart.
        victim: ``(model, dataset)`` of every trial, or a function from a trial's config to
            it, for a search space that spans victims.
        metric: the key of the relative NMI drop in reported results (higher is a stronger
            attack). Results without it are counted but leave the best drop unchanged.
        min_interval_s: least time between two publications from ``on_step_end``; trial
            starts, results, completions and errors always publish.
    """

    def __init__(
        self,
        experiment: str,
        victim: VictimKey | Callable[[Mapping[str, Any]], VictimKey],
        *,
        metric: str = "nmi_drop",
        min_interval_s: float = 5.0,
    ) -> None:
        self.experiment = _check_tag("experiment", experiment)
        if callable(victim):
            self._victim_of_config = victim
        else:
            fixed = self._check_victim(victim)
            self._victim_of_config = lambda _config: fixed
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must name a reported result key, got {metric!r}")
        if not min_interval_s >= 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s!r}")
        self.metric = metric
        self.min_interval_s = float(min_interval_s)
        self.best: dict[VictimKey, float] = {}
        self._last_publish = -math.inf

    @staticmethod
    def _check_victim(victim: Any) -> VictimKey:
        if not (isinstance(victim, tuple) and len(victim) == 2):
            raise ValueError(f"victim must be a (model, dataset) pair, got {victim!r}")
        return _check_tag("model", victim[0]), _check_tag("dataset", victim[1])

    def _victim(self, trial: Any) -> VictimKey:
        try:
            return self._check_victim(self._victim_of_config(trial.config))
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"cannot tell the victim of trial {trial.trial_id} from its config keys "
                f"{sorted(trial.config)}: {exc!r}"
            ) from exc

    def publish(self, trials: Iterable[Any]) -> None:
        """Count ``trials`` per victim and status and publish them with the best drops."""
        counts: dict[VictimKey, Counter[str]] = {}
        for trial in trials:
            counts.setdefault(self._victim(trial), Counter())[str(trial.status).lower()] += 1
        for victim in self.best:
            counts.setdefault(victim, Counter())
        for (model, dataset), by_status in counts.items():
            record_sweep_progress(
                experiment=self.experiment,
                model=model,
                dataset=dataset,
                trials_by_status=by_status,
                best_nmi_drop=self.best.get((model, dataset)),
            )
        self._last_publish = time.monotonic()

    # ------------------------------------------------------------------ Tune hooks
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.publish(trials)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        value = result.get(self.metric)
        if value is not None:
            try:
                drop = float(value)
            except (TypeError, ValueError):
                drop = math.nan
            if math.isfinite(drop):
                victim = self._victim(trial)
                self.best[victim] = max(drop, self.best.get(victim, -math.inf))
            else:
                # One diverged trial must not stop the sweep: its value is left out.
                logger.warning(
                    "trial %s reported %s=%r, not a finite number; left out of the best drop",
                    trial.trial_id, self.metric, value,
                )
        self.publish(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.publish(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.publish(trials)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.monotonic() - self._last_publish >= self.min_interval_s:
            self.publish(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.publish(trials)
