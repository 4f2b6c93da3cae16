"""What a sweep's analyses are asked: their names, the request, what became of each, and a finished sweep's request.

See :mod:`clusterattack.analyses.suite` for the analyses and their sizes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clusterattack.analyses.suite.rows import _row_key, _unique
from clusterattack.analyses.suite.sizes import AnalysisSizes

__all__ = [
    "ANALYSES",
    "ROW_KEYS",
    "AnalysisStatus",
    "SweepAnalysisRequest",
    "parse_analyses",
    "request_from_sweep",
]

ANALYSES = (
    "breakdown", "norm_curves", "transfer", "detection", "pca", "retraining", "baselines", "query_detection",
)  # fmt: skip
ROW_KEYS = (
    "model", "dataset", "victim", "victim_version", "gradient_source", "norm", "eps", "selection", "seeds",
    "generator",
)  # fmt: skip


def parse_analyses(text: str | Iterable[str]) -> tuple[str, ...]:
    """``"all"``, ``"none"``/``""`` or comma-separated names (or a list of them) as a tuple in ``ANALYSES`` order."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p and p.strip()]
    if parts in (["all"],):
        return ANALYSES
    if parts in ([], ["none"]):
        return ()
    unknown = [p for p in parts if p not in ANALYSES]
    if unknown:
        raise ValueError(f"unknown analysis {unknown}: expected 'all', 'none' or names from {ANALYSES}")
    return tuple(a for a in ANALYSES if a in parts)


def _pairs(value: Mapping[str, str] | Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    return tuple(sorted((str(k), str(v)) for k, v in items))


@dataclass(frozen=True)
class SweepAnalysisRequest:
    """What the analyses of one sweep need, and where to record them.

    ``rows`` are the sweep's Table 1 rows (:data:`ROW_KEYS` at least; ``generator`` is the
    registered ``generator-<model>-<dataset>/<version>``); ``table2`` its Table 2 rows (only
    ``search_image_queries`` is read, by ``baselines``); ``data_uris`` maps each data set to
    its Parquet URI; ``eval_limit`` and ``seed`` give the sweep's test subset
    (``data.subset("test", limit=eval_limit, seed=seed)``). ``state`` is the sweep's mutable
    record of its analyses (``state["analyses"][name]``: status and run id), ``persist`` a
    callable that saves it (called after every change). ``sizes`` default to ``preset``'s.
    ``cpus_per_task`` Ray CPUs (and torch threads) per analysis, ``gpus_per_task`` its GPUs;
    ``device`` ("cpu", or "cuda" with ``gpus_per_task`` > 0) where the analyses that train
    generators (norm curves, the fresh attack of retraining) train them; the rest runs on CPU.
    ``use_ray`` False runs the analyses one after another in this process (debugging).
    ``registry_uri`` is the model registry the generators are read from (default: the one this
    process would use for ``tracking_uri``); the request carries it to the Ray workers.
    ``detector`` is what the sweep's query detector recorded of its keys
    (:func:`~clusterattack.analyses.suite.query_detection.read_detector_state`), read where the
    sweep's folder is; None when its deployments ran without detection (``query_detection``
    then fails, saying so).
    """

    sweep: str
    parent_run_id: str
    tracking_uri: str
    rows: tuple[Mapping[str, Any], ...]
    data_uris: tuple[tuple[str, str], ...]
    eval_limit: int
    seed: int
    analyses: tuple[str, ...] = ANALYSES
    preset: str = "demo"
    sizes: AnalysisSizes | None = None
    table2: tuple[Mapping[str, Any], ...] = ()
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    device: str = "cpu"
    victim_preset: str = "demo"
    ray_address: str | None = None
    use_ray: bool = True
    registry_uri: str | None = None
    detector: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    persist: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("sweep", "parent_run_id", "tracking_uri"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
        if not self.registry_uri:
            # Read where the request is made (the driver), not where it runs (a Ray worker).
            object.__setattr__(self, "registry_uri", os.environ.get("MLFLOW_REGISTRY_URI") or self.tracking_uri)
        object.__setattr__(self, "analyses", parse_analyses(self.analyses))
        object.__setattr__(self, "rows", tuple(dict(r) for r in self.rows))
        object.__setattr__(self, "table2", tuple(dict(r) for r in self.table2))
        object.__setattr__(self, "data_uris", _pairs(self.data_uris))
        if self.analyses and not self.rows:
            raise ValueError("the sweep has no Table 1 rows: there is nothing to analyse")
        for row in self.rows:
            missing = [k for k in ROW_KEYS if row.get(k) in (None, "")]
            if missing:
                raise ValueError(
                    f"Table 1 row {_row_key(row) if 'model' in row else row!r} lacks {missing}; analyses need "
                    f"{ROW_KEYS} (a sweep with register_generators off has no generator to analyse)"
                )
        missing_data = sorted({str(r["dataset"]) for r in self.rows} - set(dict(self.data_uris)))
        if missing_data:
            raise ValueError(f"no Parquet URI for data set(s) {missing_data}; data_uris names {sorted(dict(self.data_uris))}")
        if isinstance(self.eval_limit, bool) or not isinstance(self.eval_limit, int) or self.eval_limit < 2:
            raise ValueError(f"eval_limit must be an integer >= 2, got {self.eval_limit!r}")
        if not isinstance(self.cpus_per_task, int | float) or self.cpus_per_task <= 0:
            raise ValueError(f"cpus_per_task must be > 0, got {self.cpus_per_task!r}")
        if not isinstance(self.gpus_per_task, int | float) or self.gpus_per_task < 0:
            raise ValueError(f"gpus_per_task must be >= 0, got {self.gpus_per_task!r}")
        if self.device.startswith("cuda") != (self.gpus_per_task > 0):
            raise ValueError(
                f"device {self.device!r} and gpus_per_task {self.gpus_per_task!r} disagree: a task trains on "
                "cuda only when Ray gives it a GPU (gpus_per_task > 0), and a GPU given to a cpu task sits idle"
            )
        if self.detector is not None and not (
            isinstance(self.detector, Mapping) and "keys" in self.detector and "detector" in self.detector
        ):
            raise ValueError(
                "detector must be None or read_detector_state's mapping (with 'detector' and 'keys'), got "
                f"{type(self.detector).__name__}"
            )
        if self.sizes is None:
            object.__setattr__(self, "sizes", AnalysisSizes.preset(self.preset))
        elif not isinstance(self.sizes, AnalysisSizes):
            raise ValueError(f"sizes must be an AnalysisSizes, got {type(self.sizes).__name__}")

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_task))

    def detached(self) -> SweepAnalysisRequest:
        """A copy without the state and its saver, to ship to a Ray task."""
        return dataclasses.replace(self, state={}, persist=None)


@dataclass(frozen=True)
class AnalysisStatus:
    """What became of one analysis: FINISHED, FAILED (``error`` says why), or SKIPPED (finished before)."""

    name: str
    status: str
    run_id: str | None
    error: str = ""
    items: int = 0
    failed_items: tuple[str, ...] = ()
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["failed_items"] = list(self.failed_items)
        return out


def request_from_sweep(
    parent_run_id: str,
    analyses: str | Iterable[str],
    tracking_uri: str | None = None,
    **overrides: Any,
) -> SweepAnalysisRequest:
    """The request of a finished sweep, read back from its parent run (tables and ``sweep_config.json``).

    For analyses added to a sweep after it ran (``jobs/report.py --run-analyses``);
    ``overrides`` replace request fields (``sizes``, ``cpus_per_task`` ...). For
    ``query_detection`` the detector state is read from the sweep's folder on this machine
    (there only when the sweep asked for it from the start, which turned detection on).
    """
    from mlflow.tracking import MlflowClient

    from clusterattack.tracking.reports import read_sweep
    from clusterattack.tracking.store import configure

    uri = configure(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    tables, config = read_sweep(client, client.get_run(parent_run_id))
    if not config:
        raise ValueError(f"sweep run {parent_run_id} has no sweep_config.json: its test subset cannot be rebuilt")
    data_dir = str(config.get("data_dir") or "data/parquet")
    datasets = _unique(r["dataset"] for r in tables.table1)

    def uri_of(name: str) -> str:
        return f"{data_dir.rstrip('/')}/{name}" if "://" in data_dir else os.path.join(os.path.abspath(data_dir), name)

    fields: dict[str, Any] = {
        "sweep": tables.name, "parent_run_id": parent_run_id, "tracking_uri": uri, "rows": tuple(tables.table1),
        "table2": tuple(tables.table2), "data_uris": {d: uri_of(d) for d in datasets},
        "eval_limit": int(config.get("eval_limit", 1000)), "seed": int((config.get("attack") or {}).get("seed", 0)),
        "analyses": parse_analyses(analyses), "preset": str(config.get("preset_name", "demo")),
        "cpus_per_task": float(config.get("cpus_per_trial", 1.0)), "victim_preset": str(config.get("victim_preset", "demo")),
    }  # fmt: skip
    if "query_detection" in fields["analyses"] and "detector" not in overrides:
        fields["detector"] = _sweep_detector(config)
    fields.update(overrides)
    return SweepAnalysisRequest(**fields)


def _sweep_detector(config: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The detector state a sweep (its ``sweep_config.json``) left in its folder, or None."""
    import logging

    from clusterattack.analyses.suite.query_detection import read_detector_state
    from clusterattack.tuning.config import SweepConfig
    from clusterattack.tuning.state import LEDGER_FILE, sweep_dir
    from clusterattack.tuning.targets import sweep_detection

    try:
        sweep = SweepConfig.from_dict(dict(config))
    except (KeyError, TypeError, ValueError) as err:
        logging.getLogger(__name__).warning("cannot rebuild the sweep's config to find its detector state: %s", err)
        return None
    return read_detector_state(sweep_dir(sweep) / LEDGER_FILE, sweep_detection(sweep))
