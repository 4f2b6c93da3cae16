"""ASHA that compares trials only with trials of the same value of one config key (eps).

A sweep explores eps as a grid crossed with sampled alpha_a, alpha_c: a trial at a larger
eps nearly always reaches a lower score, so one ASHA over all of them would stop every
small-eps trial at its first rung and the small radii would never get a full trial. One
Tune experiment per eps value would keep them apart too, but would run the values one
after another, leaving CPUs idle while the last trials of a value finish. This scheduler
keeps one experiment (every trial shares the cluster) with one ASHA per value of ``key``:
each rung of each value compares like with like.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

__all__ = ["GroupedASHA"]


class GroupedASHA(FIFOScheduler):
    """One :class:`AsyncHyperBandScheduler` per value of ``trial.config[key]``.

    Args:
        key: the config key whose values separate the groups (``"eps"``).
        time_attr, max_t, grace_period, reduction_factor: as in ASHA, for every group.
        metric, mode: as in ASHA (or set by ``tune.TuneConfig``).
    """

    def __init__(
        self,
        key: str,
        *,
        time_attr: str = "training_iteration",
        max_t: int = 100,
        grace_period: int = 1,
        reduction_factor: float = 3.0,
        metric: str | None = None,
        mode: str | None = None,
    ) -> None:
        super().__init__()
        if not key:
            raise ValueError("GroupedASHA needs the config key that names a trial's group, got an empty key")
        self.key = key
        self._asha = {
            "time_attr": time_attr,
            "max_t": max_t,
            "grace_period": grace_period,
            "reduction_factor": reduction_factor,
        }
        # Checked now, as ASHA checks them, so that a bad setting fails before any trial runs.
        AsyncHyperBandScheduler(**self._asha)
        self._metric = metric
        self._mode = mode
        self._groups: dict[Any, AsyncHyperBandScheduler] = {}
        self._group_of: dict[str, Any] = {}

    # ------------------------------------------------------------------ groups
    def group_value(self, trial: Any) -> Any:
        config = getattr(trial, "config", None) or {}
        if self.key not in config:
            raise ValueError(f"trial {trial.trial_id} has no {self.key!r} in its config {sorted(config)}")
        return config[self.key]

    def _group(self, value: Any) -> AsyncHyperBandScheduler:
        if value not in self._groups:
            self._groups[value] = AsyncHyperBandScheduler(metric=self._metric, mode=self._mode, **self._asha)
        return self._groups[value]

    @property
    def groups(self) -> dict[Any, AsyncHyperBandScheduler]:
        return dict(self._groups)

    # ------------------------------------------------------------------ Tune's scheduler API
    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if (self._metric and metric) or (self._mode and mode):
            return False
        self._metric = metric or self._metric
        self._mode = mode or self._mode
        for group in self._groups.values():
            group.set_search_properties(metric, mode, **spec)
        return True

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        value = self.group_value(trial)
        self._group_of[trial.trial_id] = value
        self._group(value).on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        value = self._group_of.get(trial.trial_id)
        if value is None:
            return TrialScheduler.CONTINUE
        return self._groups[value].on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        value = self._group_of.pop(trial.trial_id, None)
        if value is not None:
            self._groups[value].on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        value = self._group_of.pop(trial.trial_id, None)
        if value is not None:
            self._groups[value].on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        parts = [f"ASHA per {self.key}:"]
        for value, group in sorted(self._groups.items(), key=lambda kv: str(kv[0])):
            parts.append(f"  {self.key}={value}: {group.debug_string()}")
        return "\n".join(parts)
