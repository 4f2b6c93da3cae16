"""The paper's evaluation from one sweep's own generators and victims: every analysis a child run of the sweep.

``run_sweep_analyses(request)`` runs, after a sweep's seed runs, the analyses
``request.analyses`` names over the sweep's Table 1 rows (each row: a victim version, a
gradient source, an eps, the registered generator the attacker kept) and returns what each
did. Each analysis is one Ray task and one MLflow child run of the sweep's parent run
(tags ``mlflow.parentRunId``, ``analysis``, ``phase`` = "analysis", the victim versions,
generators, seeds, selection objective and code commit). An analysis that raises, or one of
whose items (rows, groups of rows) raises, ends FAILED with its error in tag ``error``; what
its other items computed is still logged, and the other analyses go on. ``request.state``
(persisted by the sweep) records each analysis's run and status, so a resumed sweep does not
redo finished ones.

The analyses, and their items:

============  =============================================================================
breakdown     every row: confusion matrices before/after and the cluster sizes on the sweep's
              test subset (Fig. 2), with the Fig. 1 image grid
norm_curves   every (data set, gradient source): NMI/ARI/ACC against an eps list, a generator
              trained per (victim, eps) with the sweep's chosen configuration of the nearest
              eps, black-box and white-box (the reference) side by side (Fig. 3)
transfer      every (data set, gradient source, eps): the matrix of the sweep's generators
              applied to each of the data set's victims (Fig. 4)
detection     every row: SSD detection, each test image perturbed with probability 1/2, over
              trials (section 6.2)
pca           every row: the first three principal components of clean and perturbed test
              images and their overlap (Fig. 5b)
retraining    every victim: retrained on images of all its generators, then scored clean,
              under those generators and under a fresh attack (footnote 12)
baselines     every (victim, gradient source) at its headline eps (nearest 0.1): the generator
              against NES, SPSA and Square at equal total image-queries over the whole test
              split (Appendix E; :mod:`clusterattack.analyses.baselines`)
============  =============================================================================

Sizes (:class:`AnalysisSizes`, chosen by the sweep's preset; the test subset is always the
sweep's own, ``eval_limit`` images seeded by ``seed``):

================  ====================  ==========================  =========================
                  tiny (8x8 digits)     demo (Fashion-MNIST)        paper
================  ====================  ==========================  =========================
norm_curves eps   the sweep's grid      0.05, 0.1, 0.2              0.05, 0.1, 0.15, 0.2 + grid
detection         200 images x 20       the 1,000 test images x     8,000 images x 100 trials,
                  trials, fit 800,      100 trials, fit 10,000,     fit 10,000, hold-out 2,000
                  hold-out 300          hold-out 2,000              (the paper's protocol)
pca               256 images            1,000 images                2,000 images
retraining        1 epoch, 512 images   1 epoch, 10,000 images      2 epochs, 20,000 images
baselines         64 images; 25, 100    1,000 images; 25, 100, 400  1,000 images; 25 .. 1,600
================  ====================  ==========================  =========================

Baselines also run at the equal-total budget (the generator's queries / test split size)
wherever one iteration fits in it. The demo preset takes subsets: detection on the sweep's
1,000 test images instead of the paper's 8,000, three eps values on the norm curves, one
retraining epoch on 10,000 images, and baselines on the 1,000 test images (their cost per
image extrapolated over the 10,000 of the split). Fit/hold-out images of the detector are
cut to what the training split holds (STL-10's 5,000).

Cost: all seven take about 35 s for the tiny sweep (2 busy cores). In the demo each norm-curve
point trains a generator with the sweep's settings (measured on one busy core against CC on
Fashion-MNIST: 56 s white-box, 84 s surrogate), so norm curves take about 14 minutes for CC
and SCAN in one task and bound the wall time; retraining takes about 7 (two fresh attacks per
victim); the baselines about two minutes per victim (NES, SPSA and Square at 25 to 400 queries
on 1,000 images); the rest seconds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ANALYSES",
    "AnalysisSizes",
    "AnalysisStatus",
    "SweepAnalysisRequest",
    "parse_analyses",
    "request_from_sweep",
    "run_sweep_analyses",
]

log = logging.getLogger(__name__)

ANALYSES = ("breakdown", "norm_curves", "transfer", "detection", "pca", "retraining", "baselines")
#: The order tasks are submitted in: the longest first, so that they do not finish last alone.
_ORDER = ("norm_curves", "retraining", "baselines", "detection", "transfer", "pca", "breakdown")
ROW_KEYS = (
    "model", "dataset", "victim", "victim_version", "gradient_source", "norm", "eps", "selection", "seeds",
    "generator",
)  # fmt: skip
HEADLINE_EPS = 0.1


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


@dataclass(frozen=True)
class AnalysisSizes:
    """How large each analysis is (see the module docstring for the presets' values).

    ``norm_eps`` None: the sweep's own eps grid; otherwise these values and the grid's.
    ``norm_epochs``/``retraining_fresh_epochs`` cap the generator epochs of the generators
    those analyses train (None: the sweep's). ``baseline_budgets`` are per-image budgets
    tried besides the one at equal total queries.
    """

    grid_images: int = 8
    norm_eps: tuple[float, ...] | None = (0.05, 0.1, 0.15, 0.2)
    norm_reference: str = "whitebox"
    norm_epochs: int | None = None
    detection_images: int = 8000
    detection_trials: int = 100
    detection_fit_images: int = 10_000
    detection_heldout_images: int = 2000
    pca_images: int = 2000
    retraining_epochs: int = 2
    retraining_train_limit: int | None = 20_000
    retraining_fresh_epochs: int | None = None
    baseline_images: int = 1000
    baseline_budgets: tuple[int, ...] = (25, 100, 400, 1600)
    baselines: tuple[str, ...] = ("nes", "spsa", "square")

    def __post_init__(self) -> None:
        from clusterattack.attacks.baselines import BASELINES
        from clusterattack.attacks.config import GRADIENT_SOURCES

        for name in ("grid_images", "detection_images", "detection_trials", "detection_fit_images",
                     "detection_heldout_images", "pca_images", "retraining_epochs", "baseline_images"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("norm_epochs", "retraining_train_limit", "retraining_fresh_epochs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if self.norm_eps is not None:
            eps = tuple(float(e) for e in self.norm_eps)
            if not eps or any(not math.isfinite(e) or e <= 0 for e in eps):
                raise ValueError(f"norm_eps must be positive radii or None (the sweep's grid), got {self.norm_eps!r}")
            object.__setattr__(self, "norm_eps", eps)
        if self.norm_reference not in GRADIENT_SOURCES:
            raise ValueError(f"norm_reference must be one of {GRADIENT_SOURCES}, got {self.norm_reference!r}")
        object.__setattr__(self, "baseline_budgets", tuple(self.baseline_budgets))
        if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in self.baseline_budgets):
            raise ValueError(f"baseline_budgets must be per-image image-queries >= 1, got {self.baseline_budgets!r}")
        object.__setattr__(self, "baselines", tuple(self.baselines))
        if not self.baselines or any(b not in BASELINES for b in self.baselines):
            raise ValueError(f"baselines must name some of {tuple(BASELINES)}, got {self.baselines!r}")

    @classmethod
    def preset(cls, name: str) -> AnalysisSizes:
        """The sizes of sweep preset ``name`` ("tiny", "demo", "paper")."""
        presets = {
            "tiny": cls(
                norm_eps=None, detection_images=200, detection_trials=20, detection_fit_images=800,
                detection_heldout_images=300, pca_images=256, retraining_epochs=1, retraining_train_limit=512,
                baseline_images=64, baseline_budgets=(25, 100),
            ),
            "demo": cls(
                norm_eps=(0.05, 0.1, 0.2), detection_images=1000, pca_images=1000, retraining_epochs=1,
                retraining_train_limit=10_000, baseline_images=1000, baseline_budgets=(25, 100, 400),
            ),
            "paper": cls(),
        }  # fmt: skip
        if name not in presets:
            raise ValueError(f"unknown preset {name!r} for analysis sizes, expected one of {tuple(presets)}")
        return presets[name]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    state: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    persist: Callable[[], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("sweep", "parent_run_id", "tracking_uri"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name} must be a non-empty string, got {getattr(self, name)!r}")
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


# ------------------------------------------------------------------ rows and groups
def _row_key(row: Mapping[str, Any]) -> str:
    """``<model>-<dataset>-<gradient source>-eps<eps>``, as the sweep names a row's metrics and generator."""
    from clusterattack.tuning.sweep import row_key

    return row_key(row)


def _target(row: Mapping[str, Any]) -> str:
    return f"{row['model']}-{row['dataset']}"


def _groups(rows: Sequence[Mapping[str, Any]], *keys: str) -> dict[tuple[Any, ...], list[Mapping[str, Any]]]:
    out: dict[tuple[Any, ...], list[Mapping[str, Any]]] = {}
    for row in rows:
        out.setdefault(tuple(row[k] for k in keys), []).append(row)
    return out


def _nearest(rows: Sequence[Mapping[str, Any]], eps: float) -> Mapping[str, Any]:
    """The row whose eps is nearest ``eps`` (the smaller on a tie)."""
    return min(rows, key=lambda r: (abs(float(r["eps"]) - eps), float(r["eps"])))


def _unique(values: Iterable[Any]) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values))


def _seeds(rows: Sequence[Mapping[str, Any]]) -> str:
    seeds = {int(s) for r in rows for s in str(r["seeds"]).split(",") if s.strip()}
    return ",".join(str(s) for s in sorted(seeds))


def _run_tags(request: SweepAnalysisRequest) -> dict[str, str]:
    rows = request.rows
    return {
        "sweep": request.sweep,
        "victim_version": ",".join(_unique(f"{r['victim']}/{r['victim_version']}" for r in rows)),
        "generator": ",".join(_unique(r["generator"] for r in rows)),
        "seeds": _seeds(rows),
        "selection": ",".join(_unique(r["selection"] for r in rows)),
        "gradient_source": ",".join(_unique(r["gradient_source"] for r in rows)),
        "norm": ",".join(_unique(r["norm"] for r in rows)),
        "eps": ",".join(_unique(f"{float(r['eps']):g}" for r in rows)),
        "clusterattack.dataset": ",".join(_unique(r["dataset"] for r in rows)),
        "eval_limit": str(request.eval_limit),
        "eval_seed": str(request.seed),
        "preset": request.preset,
    }


# ------------------------------------------------------------------ what a task loads
class _Loader:
    """Data sets, test subsets, victims and generators of one task, each loaded once."""

    def __init__(self, request: SweepAnalysisRequest) -> None:
        self.request = request
        self._data: dict[str, Any] = {}
        self._victims: dict[tuple[str, str], Any] = {}
        self._generators: dict[str, tuple[Any, str]] = {}

    def dataset(self, name: str) -> Any:
        if name not in self._data:
            from clusterattack.data import read_parquet_dataset

            self._data[name] = read_parquet_dataset(dict(self.request.data_uris)[name])
        return self._data[name]

    def test_sample(self, name: str) -> Any:
        """The sweep's test subset (uint8 images, labels, class names)."""
        return self.dataset(name).subset("test", limit=self.request.eval_limit, seed=self.request.seed)

    def test(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.test_sample(name).as_float()

    def train(self, name: str, limit: int | None) -> torch.Tensor:
        return self.dataset(name).subset("train", limit=limit, seed=self.request.seed).as_float()[0]

    def split_size(self, name: str, split: str) -> int:
        return int((self.dataset(name).split == split).sum())

    def victim(self, row: Mapping[str, Any]) -> Any:
        key = (str(row["victim"]), str(row["victim_version"]))
        if key not in self._victims:
            from clusterattack.victims.io import load_victim

            model = load_victim(f"models:/{key[0]}/{key[1]}", device="cpu")
            if isinstance(model, torch.nn.Module):
                model.requires_grad_(False)  # gradients may flow to images (white-box), never into weights
            self._victims[key] = model
        return self._victims[key]

    def generator(self, row: Mapping[str, Any]) -> tuple[Any, str]:
        """(LoadedGenerator, run id of the seed run that registered it) of the row."""
        ref = str(row["generator"])
        if ref not in self._generators:
            from clusterattack.analyses.common import resolve_generator
            from clusterattack.tracking.analyses import registered_generator_info

            name, _, version = ref.partition("/")
            info = registered_generator_info(name, version or None)
            try:
                loaded = resolve_generator(ref)
            except Exception as err:  # torch.load raises several types; each means the same to the reader
                raise ValueError(
                    f"cannot load generator {ref} (file generator/generator.pt of run {info['run_id']}): "
                    f"{type(err).__name__}: {str(err)[:300]}"
                ) from err
            self._generators[ref] = (loaded, info["run_id"])
        return self._generators[ref]


def _provenance(row: Mapping[str, Any], generator_run_id: str | None = None) -> dict[str, Any]:
    """What names a row's figures: victim version, generator and its run, seeds, selection, bound."""
    out = {
        "row": _row_key(row),
        "model": row["model"],
        "dataset": row["dataset"],
        "victim": f"{row['victim']}/{row['victim_version']}",
        "generator": row["generator"],
        "gradient_source": row["gradient_source"],
        "norm": row["norm"],
        "eps": float(row["eps"]),
        "selection": row["selection"],
        "seeds": str(row["seeds"]),
    }
    if generator_run_id:
        out["generator_run_id"] = generator_run_id
    return out


def _group_provenance(rows: Sequence[Mapping[str, Any]], runs: Mapping[str, str]) -> dict[str, Any]:
    return {
        "rows": [_row_key(r) for r in rows],
        "victims": _unique(f"{r['victim']}/{r['victim_version']}" for r in rows),
        "generators": {r["generator"]: runs.get(str(r["generator"])) for r in rows},
        "selection": ",".join(_unique(r["selection"] for r in rows)),
        "seeds": _seeds(rows),
    }


@dataclass
class _Outcome:
    """What one analysis logs: its items (payloads), failed items, figures, tables, files, metrics."""

    items: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    def add(self, key: str, payload: Mapping[str, Any], provenance: Mapping[str, Any], result: Any = None) -> None:
        """One item; ``result`` (an ``AnalysisResult``) adds its figures, tables and metrics under ``key``."""
        self.items.append({"key": key, "provenance": dict(provenance), "payload": dict(payload)})
        if result is None:
            return
        for name, fig in result.figures.items():
            self.figures[f"{key}__{name}"] = fig
        for name, rows in result.tables.items():
            self.tables.setdefault(name, []).extend({"item": key, **r} for r in rows)
        self.metrics.update({f"{key}.{k}": v for k, v in result.metrics.items()})

    def attempt(self, key: str, fn: Callable[[], None]) -> None:
        """Run one item; an error is recorded against it and the next item goes on."""
        try:
            fn()
        except Exception as err:  # one bad row (a generator that will not load) must not sink the rest
            log.warning("analysis item %s failed: %r", key, err)
            self.failed.append({"key": key, "error": f"{type(err).__name__}: {err}"})


# ------------------------------------------------------------------ the analyses
def _breakdown(request: SweepAnalysisRequest, loader: _Loader, work: Path, out: _Outcome) -> None:
    import numpy as np

    from clusterattack.reports.breakdown import breakdown_to_record, compute_breakdown
    from clusterattack.reports.figures import confusion_pair_figure

    for row in request.rows:
        key = _row_key(row)

        def item(row: Mapping[str, Any] = row, key: str = key) -> None:
            gen, run_id = loader.generator(row)
            sample = loader.test_sample(str(row["dataset"]))
            attack = gen.config.override(device="cpu")
            prov = _provenance(row, run_id)
            b = compute_breakdown(
                loader.victim(row), gen.generator, attack, sample.images, sample.labels,
                grid_images=request.sizes.grid_images, sample_seed=request.seed, class_names=sample.class_names,
                provenance={
                    "model": row["model"], "dataset": row["dataset"], "victim": prov["victim"],
                    "generator": row["generator"], "generator_run_id": run_id, "gradient_source": attack.gradient_source,
                    "norm": attack.norm, "eps": float(attack.eps), "seed": int(attack.seed),
                },
            )  # fmt: skip
            b.selection, b.seeds = str(row["selection"]), str(row["seeds"])
            fields, arrays = breakdown_to_record(b)
            path = work / "breakdown" / key / "arrays.npz"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(path, **arrays)
            fields["arrays"] = f"breakdown/{key}/arrays.npz"
            out.files[fields["arrays"]] = str(path)
            s = b.scores
            out.figures[f"{key}__confusion"] = confusion_pair_figure(
                b.confusion_pre, b.confusion_post,
                (f"before (NMI {s['nmi_pre']:.3f})", f"after (NMI {s['nmi_post']:.3f})"), b.class_names, b.cluster_order,
            )  # fmt: skip
            for m in ("nmi_pre", "nmi_post", "largest_cluster_fraction_post", "clusters_used_post", "changed_fraction"):
                out.metrics[f"{key}.{m}"] = float(s[m])
            out.add(key, fields, prov)

        out.attempt(key, item)


def _norm_curves(request: SweepAnalysisRequest, loader: _Loader, work: Path, out: _Outcome) -> None:
    from clusterattack.analyses.common import attack_pool_size
    from clusterattack.analyses.norm_curves import NormCurvesConfig, run_norm_curves
    from clusterattack.reports.analysis_figures import norm_curves_figure

    sizes = request.sizes
    for (dataset, source), rows in _groups(request.rows, "dataset", "gradient_source").items():
        key = f"{dataset}-{source}"

        def item(dataset: str = dataset, source: str = source, rows: list = rows, key: str = key) -> None:
            grid = {float(r["eps"]) for r in rows}
            eps_values = tuple(sorted(grid if sizes.norm_eps is None else grid | set(sizes.norm_eps)))
            test_x, test_y = loader.test(dataset)
            points, chosen, runs = [], {}, {}
            for model, mine in _groups(rows, "model").items():
                per_eps = []
                for eps in eps_values:
                    row = _nearest(mine, eps)
                    gen, run_id = loader.generator(row)
                    runs[str(row["generator"])] = run_id
                    changes: dict[str, Any] = {"device": request.device}
                    if sizes.norm_epochs is not None:
                        changes["epochs"] = min(gen.config.epochs, sizes.norm_epochs)
                    per_eps.append((eps, gen.config.override(**changes)))
                    chosen.setdefault(model[0], {})[f"{eps:g}"] = {
                        "row": _row_key(row), "alpha_a": gen.config.alpha_a, "alpha_c": gen.config.alpha_c,
                        "attack_loss": gen.config.attack_loss, "epochs": per_eps[-1][1].epochs,
                    }  # fmt: skip
                pool = max(attack_pool_size(a) or 0 for _, a in per_eps) + max(a.select_images for _, a in per_eps)
                config = NormCurvesConfig(
                    dataset=dataset, victims=(str(model[0]),), eps_values=eps_values, norm=str(mine[0]["norm"]),
                    attack=per_eps[0][1], eps_attacks=tuple(per_eps), reference_source=sizes.norm_reference,
                    test_limit=None, seed=request.seed, use_ray=False, threads=request.threads, progress=False,
                )  # fmt: skip
                result = run_norm_curves(
                    config, victims={str(model[0]): loader.victim(mine[0])}, data=(loader.train(dataset, pool), test_x, test_y)
                )
                points.extend(result.payload["rows"])
            payload = {
                "dataset": dataset, "norm": str(rows[0]["norm"]), "gradient_source": source,
                "reference_source": sizes.norm_reference, "eps_values": list(eps_values), "sweep_eps": sorted(grid),
                "rows": points, "chosen": chosen, "seed": request.seed, "test_images": int(test_x.shape[0]),
            }  # fmt: skip
            out.figures[f"{key}__norm_curves"] = norm_curves_figure(
                points, payload["norm"], f"{dataset}: scores vs eps ({source}, {sizes.norm_reference} dashed)"
            )
            for p in points:
                out.metrics[f"{key}.{p['victim']}.{p['gradient_source']}.eps{p['eps']:g}.nmi_post"] = p["nmi_post"]
            out.tables.setdefault("norm_curves", []).extend({"item": key, **p} for p in points)
            out.add(key, payload, _group_provenance(rows, runs))

        out.attempt(key, item)


def _transfer(request: SweepAnalysisRequest, loader: _Loader, work: Path, out: _Outcome) -> None:
    from clusterattack.analyses.transfer import TransferConfig, run_transfer

    for (dataset, source, eps), rows in _groups(request.rows, "dataset", "gradient_source", "eps").items():
        key = f"{dataset}-{source}-eps{float(eps):g}"

        def item(dataset: str = dataset, eps: float = eps, rows: list = rows, key: str = key) -> None:
            everyone = {str(r["model"]): r for r in request.rows if r["dataset"] == dataset}
            sources = {str(r["model"]): r for r in rows}
            victims = {m: loader.victim(r) for m, r in everyone.items()}
            runs = {str(r["generator"]): loader.generator(r)[1] for r in rows}
            test_x, test_y = loader.test(dataset)
            config = TransferConfig(
                dataset=dataset, targets=tuple(everyone), sources=tuple(sources),
                generators={m: str(r["generator"]) for m, r in sources.items()}, norm=str(rows[0]["norm"]),
                eps=float(eps), test_limit=None, train_missing=False, out_dir=str(work / "transfer"),
                seed=request.seed, use_ray=False, threads=request.threads, progress=False,
            )  # fmt: skip
            result = run_transfer(config, victims=victims, data=(test_x[:0], test_x, test_y))
            payload = {**result.payload, "victim_versions": {m: f"{r['victim']}/{r['victim_version']}" for m, r in everyone.items()}}
            for name, fig in result.figures.items():
                out.figures[f"{key}__{name}"] = fig
            for pair in result.tables["transfer_pairs"]:
                out.metrics[f"{key}.{pair['source']}.{pair['target']}.nmi_post"] = pair["nmi_post"]
            out.tables.setdefault("transfer_pairs", []).extend({"item": key, **p} for p in result.tables["transfer_pairs"])
            out.add(key, payload, _group_provenance(rows, runs))

        out.attempt(key, item)


def _detection(request: SweepAnalysisRequest, loader: _Loader, work: Path, out: _Outcome) -> None:
    from clusterattack.analyses.defenses import DetectionConfig, run_detection

    sizes = request.sizes
    for row in request.rows:
        key = _row_key(row)

        def item(row: Mapping[str, Any] = row, key: str = key) -> None:
            dataset = str(row["dataset"])
            gen, run_id = loader.generator(row)
            fit, held = sizes.detection_fit_images, sizes.detection_heldout_images
            available = loader.split_size(dataset, "train")
            if fit + held > available:
                # The training split is smaller than the protocol's: keep its fit/hold-out proportion.
                fit = max(1, (available * fit) // (fit + held))
                held = max(1, available - fit)
            test_x, _ = loader.test(dataset)
            images = min(sizes.detection_images, int(test_x.shape[0]))
            config = DetectionConfig(
                dataset=dataset, victim=str(row["model"]), generator=str(row["generator"]), images=images,
                trials=sizes.detection_trials, fit_images=fit, heldout_images=held, seed=request.seed,
            )  # fmt: skip
            result = run_detection(config, victim=loader.victim(row), generator=gen, data=(loader.train(dataset, fit + held), test_x))
            out.add(key, result.payload, _provenance(row, run_id), result)

        out.attempt(key, item)


def _pca(request: SweepAnalysisRequest, loader: _Loader, work: Path, out: _Outcome) -> None:
    from clusterattack.analyses.defenses import PCAConfig, run_pca

    for row in request.rows:
        key = _row_key(row)

        def item(row: Mapping[str, Any] = row, key: str = key) -> None:
            gen, run_id = loader.generator(row)
            test_x, _ = loader.test(str(row["dataset"]))
            images = min(request.sizes.pca_images, int(test_x.shape[0]), 2000)
            config = PCAConfig(
                dataset=str(row["dataset"]), generator=str(row["generator"]), victim=str(row["model"]), images=images,
                seed=request.seed, out_dir=str(work / "pca" / key),
            )  # fmt: skip
            result = run_pca(config, generator=gen, images=test_x)
            payload = {**result.payload, "points": f"pca/{key}/points.npz"}
            out.files[payload["points"]] = result.files["pca/points.npz"]
            result.files = {}
            out.add(key, payload, _provenance(row, run_id), result)

        out.attempt(key, item)


def _retraining(request: SweepAnalysisRequest, loader: _Loader, work: Path, out: _Outcome) -> None:
    from clusterattack.analyses.defenses import RetrainingConfig, run_retraining

    sizes = request.sizes
    for (model, dataset), rows in _groups(request.rows, "model", "dataset").items():
        key = f"{model}-{dataset}"

        def item(dataset: str = dataset, rows: list = rows, key: str = key) -> None:
            loaded = [loader.generator(r) for r in rows]
            runs = {str(r["generator"]): run for r, (_, run) in zip(rows, loaded, strict=True)}
            head = _nearest(rows, HEADLINE_EPS)
            fresh = loader.generator(head)[0].config
            changes: dict[str, Any] = {"device": request.device, "seed": request.seed}
            if sizes.retraining_fresh_epochs is not None:
                changes["epochs"] = min(fresh.epochs, sizes.retraining_fresh_epochs)
            config = RetrainingConfig(
                dataset=dataset, victim=str(rows[0]["model"]), generators=tuple(str(r["generator"]) for r in rows),
                epochs=sizes.retraining_epochs, train_limit=sizes.retraining_train_limit, test_limit=request.eval_limit,
                fresh_attack=fresh.override(**changes), preset=request.victim_preset, seed=request.seed,
                threads=request.threads, progress=False,
            )  # fmt: skip
            result = run_retraining(
                config, victim=loader.victim(rows[0]), generators=[g for g, _ in loaded], dataset=loader.dataset(dataset)
            )
            for r in result.payload["rows"]:
                for m in ("nmi_clean", "nmi_old_generators", "nmi_fresh_attack"):
                    out.metrics[f"{key}.{r['model']}.{m}"] = r[m]
            out.add(key, {**result.payload, "fresh_attack_from": _row_key(head)}, _group_provenance(rows, runs), result)
            result.models.clear()

        out.attempt(key, item)


def _baselines(request: SweepAnalysisRequest, loader: _Loader, work: Path, out: _Outcome) -> None:
    from clusterattack.analyses.baselines import BaselinesConfig, run_baselines

    sizes = request.sizes
    search = {_row_key(r): r.get("search_image_queries") for r in request.table2 if "model" in r}
    for _, rows in _groups(request.rows, "model", "dataset", "gradient_source").items():
        row = _nearest(rows, HEADLINE_EPS)
        key = _row_key(row)

        def item(row: Mapping[str, Any] = row, key: str = key) -> None:
            dataset = str(row["dataset"])
            gen, run_id = loader.generator(row)
            test_x, test_y = loader.test(dataset)
            n = min(sizes.baseline_images, int(test_x.shape[0]))
            spent = search.get(key)
            config = BaselinesConfig(
                dataset=dataset, victim=str(row["model"]), generator=str(row["generator"]),
                split_images=loader.split_size(dataset, "test"), budgets=sizes.baseline_budgets,
                baselines=sizes.baselines, search_image_queries=None if spent is None else int(spent), seed=request.seed,
            )  # fmt: skip
            result = run_baselines(config, loader.victim(row), gen, test_x[:n], test_y[:n])
            out.add(key, result.payload, _provenance(row, run_id), result)

        out.attempt(key, item)


_ANALYSES: dict[str, Callable[[SweepAnalysisRequest, _Loader, Path, _Outcome], None]] = {
    "breakdown": _breakdown,
    "norm_curves": _norm_curves,
    "transfer": _transfer,
    "detection": _detection,
    "pca": _pca,
    "retraining": _retraining,
    "baselines": _baselines,
}


def run_analysis(name: str, request: SweepAnalysisRequest, run_id: str) -> dict[str, Any]:
    """One analysis of ``request`` logged into its child run ``run_id`` (left open); what it did.

    The body of each Ray task (callable in-process too). Raises when nothing could be
    computed or logged; items that failed are listed in the returned ``failed``.
    """
    from clusterattack.tracking.analyses import log_analysis_artifacts
    from clusterattack.tracking.store import configure, source_tags

    if name not in _ANALYSES:
        raise ValueError(f"unknown analysis {name!r}, expected one of {ANALYSES}")
    configure(request.tracking_uri)
    torch.set_num_threads(request.threads)
    started = time.perf_counter()
    out = _Outcome()
    with tempfile.TemporaryDirectory(prefix=f"ca-{name}-") as tmp:
        _ANALYSES[name](request, _Loader(request), Path(tmp), out)
        payload = {
            "kind": name, "sweep": request.sweep, "parent_run_id": request.parent_run_id, "preset": request.preset,
            "sizes": request.sizes.to_dict(), "eval_limit": request.eval_limit, "seed": request.seed,
            "code": source_tags(), "items": out.items, "failed": out.failed,
            "wall_s": round(time.perf_counter() - started, 1),
        }  # fmt: skip
        out.metrics["items"], out.metrics["failed_items"] = len(out.items), len(out.failed)
        out.metrics["wall_s"] = payload["wall_s"]
        log_analysis_artifacts(
            run_id, name, payload, figures=out.figures, tables=out.tables, files=out.files, metrics=out.metrics
        )
    if not out.items and out.failed:
        raise RuntimeError(f"{name}: every item failed: " + "; ".join(f"{f['key']}: {f['error']}" for f in out.failed))
    return {"items": len(out.items), "failed": out.failed, "wall_s": payload["wall_s"]}


# ------------------------------------------------------------------ the driver
def run_sweep_analyses(request: SweepAnalysisRequest) -> dict[str, AnalysisStatus]:
    """Run the analyses ``request`` names as Ray tasks, each in its own child run; see the module docstring.

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

    configure(request.tracking_uri)
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
        run_id = start_analysis_run(request.parent_run_id, name, tags, params, run_name=f"{request.sweep}-{name}")
        record[name] = {"status": "RUNNING", "run_id": run_id}
    save()

    runner = TaskRunner(
        request.use_ray, request.threads, request.ray_address, num_cpus=request.cpus_per_task,
        num_gpus=request.gpus_per_task, max_retries=0,
    )  # fmt: skip
    started = time.perf_counter()
    try:
        shipped = runner.put(request.detached())
        handles = [runner.submit(run_analysis, name, shipped, record[name]["run_id"]) for name in todo]
        for i, result, err in runner.as_completed(handles):
            name = todo[i]
            run_id = record[name]["run_id"]
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


def request_from_sweep(
    parent_run_id: str,
    analyses: str | Iterable[str],
    tracking_uri: str | None = None,
    **overrides: Any,
) -> SweepAnalysisRequest:
    """The request of a finished sweep, read back from its parent run (tables and ``sweep_config.json``).

    For analyses added to a sweep after it ran (``jobs/report.py --run-analyses``);
    ``overrides`` replace request fields (``sizes``, ``cpus_per_task`` ...).
    """
    import os

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
    fields.update(overrides)
    return SweepAnalysisRequest(**fields)
