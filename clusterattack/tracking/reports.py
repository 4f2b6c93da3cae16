"""What the HTML report shows, read from MLflow: one sweep's tables and its own analyses' child runs.

``gather_report`` returns a :class:`~clusterattack.reports.ReportData` (pure data) of one
sweep parent run: Tables 1-2 (each row with its registered generator and the run that made
it) and, per analysis, the newest child run of that parent (``clusterattack.analyses.suite``)
with its status, error, items and their arrays. Analyses logged elsewhere (stand-alone
``jobs/transfer.py`` or ``jobs/defend.py`` runs in experiment ``analyses``) are not shown.
``clusterattack.reports.write_report`` turns the data into a folder; ``log_report`` stores
that folder as the artifacts (``report/``) of a run in experiment ``reports`` and tags the
sweep's parent run with that run's id (``report.run_id``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clusterattack.reports.data import (
    AnalysisResult,
    ReportData,
    SweepTables,
    default_commands,
)
from clusterattack.tracking.analyses import (
    ERROR_TAG,
    REQUESTED_TAG,
    registered_generator_info,
    sweep_analysis_runs,
)
from clusterattack.tracking.store import configure, ensure_experiment, source_tags
from clusterattack.tracking.sweeps import PARENT_TAG, SWEEP_EXPERIMENT, TRIAL_TAG

__all__ = [
    "REPORT_EXPERIMENT",
    "REPORT_TAG",
    "SweepNotFound",
    "find_sweep",
    "gather_report",
    "log_report",
    "read_sweep",
    "read_sweep_analyses",
]

log = logging.getLogger(__name__)

REPORT_EXPERIMENT = "reports"
#: Tag on a sweep's parent run: the id of the newest report run made from it.
REPORT_TAG = "report.run_id"
TABLE1 = "table1_attack"
TABLE2 = "table2_queries"
TABLE3 = "table3_eps_tradeoff"
_DEFAULT_EVAL_LIMIT = 1000


class SweepNotFound(LookupError):
    """No sweep parent run (of that name) in the store."""


# ------------------------------------------------------------------ sweeps
def _parents(client: MlflowClient, name: str | None) -> list[Run]:
    exp = client.get_experiment_by_name(SWEEP_EXPERIMENT)
    if exp is None:
        return []
    query = "tags.sweep = '{}'".format(name.replace("'", "\\'")) if name else ""
    runs = client.search_runs([exp.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"],
                              max_results=1000)  # fmt: skip
    # A parent run is the one without a parent: children carry the sweep tag as well.
    return [r for r in runs if PARENT_TAG not in r.data.tags and "sweep" in r.data.tags]


def find_sweep(client: MlflowClient, name: str | None = None) -> Run:
    """The parent run of sweep ``name`` (newest started, when a name was reused), or of the newest sweep."""
    parents = _parents(client, name)
    if not parents:
        known = sorted({r.data.tags["sweep"] for r in _parents(client, None)})
        what = f"sweep {name!r}" if name else "any sweep"
        raise SweepNotFound(
            f"no parent run of {what} in experiment {SWEEP_EXPERIMENT!r} of {client.tracking_uri}; "
            f"sweeps there: {known or 'none'} (run: python jobs/sweep.py --preset demo)"
        )
    return parents[0]


def _download(client: MlflowClient, run_id: str, path: str, dst: str | Path) -> Path | None:
    try:
        return Path(client.download_artifacts(run_id, path, str(dst)))
    except (MlflowException, OSError) as err:
        log.debug("run %s has no artifact %s: %s", run_id, path, err)
        return None


def _records(frame: Any) -> list[dict[str, Any]]:
    rows = frame.astype(object).where(frame.notna(), None).to_dict("records")
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()} for r in rows]


def _read_table(client: MlflowClient, run_id: str, name: str, tmp: Path) -> list[dict[str, Any]]:
    """Rows of table ``name`` of a sweep: its Parquet artifact (full precision; MLflow's JSON table
    rounds floats to 10 digits), else ``tables/<name>.json``, else the CSV."""
    import pandas as pd

    path = _download(client, run_id, f"tables/{name}.parquet", tmp)
    if path is not None:
        return _records(pd.read_parquet(path))
    path = _download(client, run_id, f"tables/{name}.json", tmp)
    if path is not None:
        blob = json.loads(path.read_text())
        return [dict(zip(blob["columns"], row, strict=True)) for row in blob["data"]]
    path = _download(client, run_id, f"tables/{name}.csv", tmp)
    return _records(pd.read_csv(path)) if path is not None else []


def read_sweep(
    client: MlflowClient, parent: Run, dataset: str | None = None
) -> tuple[SweepTables, dict[str, Any]]:
    """The sweep's tables (rows of ``dataset`` only, when given), each row with its best trial's run id,
    and the sweep's config (``sweep_config.json``; empty when missing)."""
    run_id = parent.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        table1 = _read_table(client, run_id, TABLE1, Path(tmp))
        table2 = _read_table(client, run_id, TABLE2, Path(tmp))
        table3 = _read_table(client, run_id, TABLE3, Path(tmp))
        path = _download(client, run_id, "sweep_config.json", tmp)
        config = json.loads(path.read_text()) if path is not None else {}
    exp_id = parent.info.experiment_id
    children = client.search_runs(
        [exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{run_id}'", max_results=10_000
    )
    trial_runs = {r.data.tags.get(TRIAL_TAG): r.info.run_id for r in children}
    for row in (*table1, *table2):
        row["run_id"] = trial_runs.get(str(row.get("best_trial")))
    for row in table3:
        row["run_id"] = trial_runs.get(str(row.get("trial")))
    if dataset is not None:
        table1 = [r for r in table1 if r.get("dataset") == dataset]
        table2 = [r for r in table2 if r.get("dataset") == dataset]
        table3 = [r for r in table3 if r.get("dataset") == dataset]
    tags = dict(parent.data.tags)
    generators = {
        k.removeprefix("generator."): v for k, v in tags.items() if k.startswith("generator.")
    }
    tables = SweepTables(
        name=tags["sweep"],
        parent_run_id=run_id,
        table1=table1,
        table2=table2,
        generators=generators,
        tags={k: v for k, v in tags.items() if not k.startswith("mlflow.")},
        totals=dict(parent.data.metrics),
        table3=table3,
    )
    return tables, config


# ------------------------------------------------------------------ analyses
#: Kinds whose logged PNGs the report shows (it redraws the others from their payloads).
_LOGGED_FIGURES = ("detection",)


def _item_arrays(client: MlflowClient, run_id: str, path: Any, where: Path) -> dict[str, np.ndarray]:
    if not isinstance(path, str):
        return {}
    local = _download(client, run_id, path, where)
    if local is None:
        return {}
    with np.load(local) as npz:
        return {k: np.asarray(npz[k]) for k in npz.files}


def read_sweep_analyses(
    client: MlflowClient, parent_run_id: str, dst: str | Path, dataset: str | None = None
) -> dict[str, AnalysisResult]:
    """The newest child run of each analysis under a sweep's parent run: status, error, payload, and
    its items (of ``dataset`` only, when given) with their arrays and logged figures, under ``dst``."""
    out: dict[str, AnalysisResult] = {}
    for kind, run in sweep_analysis_runs(parent_run_id).items():
        run_id = run.info.run_id
        tags = dict(run.data.tags)
        where = Path(dst) / kind / run_id
        result = AnalysisResult(kind, run_id, {}, status=run.info.status, error=tags.get(ERROR_TAG, ""), tags=tags)
        path = _download(client, run_id, f"analysis/{kind}.json", where)
        if path is None:
            log.warning("analysis run %s (%s) has no analysis/%s.json", run_id, kind, kind)
            result.payload = {"items": []}
            out[kind] = result
            continue
        result.payload = json.loads(path.read_text())
        figures: list[str] = []
        if kind in _LOGGED_FIGURES:
            figures = [a.path for a in client.list_artifacts(run_id, "figures") if a.path.endswith(".png")]
        for item in result.payload.get("items", []):
            payload, key = dict(item.get("payload") or {}), str(item.get("key", ""))
            provenance = dict(item.get("provenance") or {})
            if dataset is not None and payload.get("dataset", provenance.get("dataset")) not in (None, dataset):
                continue
            sub = AnalysisResult(kind, run_id, payload, label=key, provenance=provenance, tags=tags)
            sub.arrays = _item_arrays(client, run_id, payload.get("points") or payload.get("arrays"), where)
            for fig in figures:
                stem = Path(fig).stem
                if stem.startswith(f"{key}__"):
                    local = _download(client, run_id, fig, where)
                    if local is not None:
                        sub.figure_files[stem.removeprefix(f"{key}__")] = local
            result.items.append(sub)
        out[kind] = result
    return out


def _stored_breakdowns(result: AnalysisResult) -> list[Any]:
    """The Breakdowns a breakdown analysis run stored, with the run and code that made them."""
    from clusterattack.reports.analysis_sections import code_text
    from clusterattack.reports.breakdown import breakdown_from_record

    out = []
    for item in result.items:
        try:
            b = breakdown_from_record(item.payload, item.arrays)
        except (TypeError, ValueError) as err:
            log.warning("breakdown item %s of run %s cannot be read: %s", item.label, result.run_id, err)
            continue
        b.run_id, b.code = result.run_id, code_text(result.tags)
        out.append(b)
    return out


# ------------------------------------------------------------------ breakdowns
def _test_sample(dataset: str, config: dict[str, Any]) -> Any:
    """The sweep's own test slice (its Parquet copy when present, else the registered reader)."""
    from clusterattack.data import load_dataset, parquet_dataset_exists, read_parquet_dataset

    data_dir = str(config.get("data_dir") or "")
    uri = (
        f"{data_dir.rstrip('/')}/{dataset}"
        if "://" in data_dir
        else os.path.join(data_dir, dataset)
    )
    if data_dir and parquet_dataset_exists(uri):
        data = read_parquet_dataset(uri, split="test")
    else:
        data = load_dataset(dataset)
    limit = int(config.get("eval_limit") or _DEFAULT_EVAL_LIMIT)
    return data.subset("test", limit=limit, seed=_sweep_seed(config))


def _sweep_seed(config: dict[str, Any]) -> int:
    """The seed of a sweep's test subset: its attack's seed (``SweepConfig.seed``)."""
    return int(config.get("seed", (config.get("attack") or {}).get("seed", 0)))


def _breakdowns(
    client: MlflowClient, tables: SweepTables, config: dict[str, Any], images: int, dst: Path
) -> tuple[list[Any], str]:
    """Confusion matrices and image grids of every row with a registered generator; (results, error text)."""
    from clusterattack.attacks.io import load_generator
    from clusterattack.data import DatasetError
    from clusterattack.reports.breakdown import compute_breakdown
    from clusterattack.victims.io import load_victim

    out, errors = [], []
    samples: dict[str, Any] = {}
    for row in tables.table1:
        key = f"{row['model']}-{row['dataset']}"
        # A row names its own generator (one per gradient source and eps); older sweeps had one per victim.
        registered = row.get("generator") or tables.generators.get(key)
        if row.get("generator"):
            key = f"{key}-{row.get('gradient_source')}-eps{float(row.get('eps') or 0):g}"
        if not registered:
            errors.append(f"{key}: the sweep registered no generator")
            continue
        name, _, version = registered.partition("/")
        try:
            info = registered_generator_info(name, version or None)
            path = _download(client, info["run_id"], "generator/generator.pt", dst / key)
            if path is None:
                raise FileNotFoundError(
                    f"run {info['run_id']} of {registered} has no generator/generator.pt"
                )
            generator, attack, _ = load_generator(path)
            attack = attack.override(device="cpu")
            victim_uri = f"models:/{row['victim']}/{row.get('victim_version') or 'latest'}"
            victim = load_victim(victim_uri)
            if row["dataset"] not in samples:
                samples[row["dataset"]] = _test_sample(row["dataset"], config)
            sample = samples[row["dataset"]]
            result = compute_breakdown(
                victim, generator, attack, sample.images, sample.labels,
                grid_images=images, sample_seed=_sweep_seed(config), class_names=sample.class_names,
                provenance={
                    "model": row["model"], "dataset": row["dataset"],
                    "victim": f"{row['victim']}/{row.get('victim_version') or 'latest'}",
                    "generator": registered, "generator_run_id": info["run_id"],
                    "gradient_source": attack.gradient_source, "norm": attack.norm, "eps": float(attack.eps),
                    "seed": int(attack.seed),
                },
            )  # fmt: skip
            result.selection, result.seeds = str(row.get("selection") or ""), str(row.get("seeds") or "")
            out.append(result)
        except (MlflowException, DatasetError, OSError, ValueError, RuntimeError, KeyError, UnpicklingError) as err:
            # One target that cannot be recomputed (data absent here, model deleted) must not stop the report.
            log.warning("no breakdown for %s: %s", key, err)
            errors.append(f"{key}: {err}")
    return out, "; ".join(errors)


# ------------------------------------------------------------------ the whole report
def _generator_runs(tables: SweepTables) -> None:
    """Each Table 1 row's ``generator_run_id``: the seed run that trained and registered its generator."""
    runs: dict[str, str | None] = {}
    for row in tables.table1:
        registered = row.get("generator")
        if not isinstance(registered, str) or not registered:
            continue
        if registered not in runs:
            name, _, version = registered.partition("/")
            try:
                runs[registered] = registered_generator_info(name, version or None)["run_id"]
            except (MlflowException, ValueError) as err:
                log.warning("generator %s of the sweep is not in the registry: %s", registered, err)
                runs[registered] = None
        row["generator_run_id"] = runs[registered]


def gather_report(
    sweep: str | None = None,
    dataset: str | None = None,
    images: int = 8,
    breakdown: bool = True,
    tracking_uri: str | None = None,
    work_dir: str | Path | None = None,
    parent_run_id: str | None = None,
) -> ReportData:
    """Everything the report of ONE sweep shows: the parent run ``parent_run_id``, else that of
    sweep ``sweep``, else the newest sweep's; rows and analysis items of ``dataset`` only when given.

    The analyses are the newest child run of each kind under that parent (never analysis runs
    of other sweeps); which ones the sweep asked for is its parent's ``analyses.requested``
    tag. When the sweep ran no breakdown analysis, ``breakdown`` True recomputes confusion
    matrices and the image grid here from its registered generators (False: that section says
    how to request it). A store without sweeps gives a report of placeholders;
    ``sweep``/``parent_run_id`` named but absent raise :class:`SweepNotFound`. ``work_dir``
    holds downloaded artifacts (a temporary folder when None; figures are copied out of it by
    the writer, so it may be removed after ``write_report``).
    """
    uri = configure(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    tables: SweepTables | None = None
    config: dict[str, Any] = {}
    try:
        if parent_run_id is not None:
            try:
                parent = client.get_run(parent_run_id)
            except MlflowException as err:
                raise SweepNotFound(f"no sweep parent run {parent_run_id!r} in {uri}: {err}") from None
        else:
            parent = find_sweep(client, sweep)
        tables, config = read_sweep(client, parent, dataset)
    except SweepNotFound:
        if sweep is not None or parent_run_id is not None:
            raise
        log.warning("no sweep in %s: the report shows placeholders", uri)
    if dataset is None and tables is not None and tables.table1:
        dataset = str(tables.table1[0]["dataset"]) if len({r["dataset"] for r in tables.table1}) == 1 else None
    dst = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="clusterattack-report-"))
    sweep_name = tables.name if tables is not None else (sweep or "<sweep>")
    preset = (tables.tags.get("preset") if tables is not None else None) or "demo"
    data = ReportData(
        title=f"clusterattack report: {sweep_name}" + (f" on {dataset}" if dataset else ""),
        tracking_uri=uri,
        generated_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        dataset=dataset,
        sweep=tables,
        commands=default_commands(tables.name if tables is not None else None, preset),
    )
    if tables is None:
        return data
    _generator_runs(tables)
    requested = tables.tags.get(REQUESTED_TAG, "")
    data.requested = tuple(k for k in requested.split(",") if k)
    data.analyses = read_sweep_analyses(client, tables.parent_run_id, dst / "analyses", dataset)
    if "breakdown" in data.analyses:
        data.breakdowns = _stored_breakdowns(data.analyses["breakdown"])
    elif breakdown:
        data.breakdowns, data.breakdown_error = _breakdowns(client, tables, config, images, dst / "generators")
    else:
        data.breakdown_error = "skipped (--no-breakdown)"
    return data


def log_report(folder: str | Path, data: ReportData, tracking_uri: str | None = None) -> str:
    """Log the report ``folder`` as artifacts ``report/`` of a new run in experiment ``reports``; returns its id.

    The run is tagged with the sweep, its parent run and the analysis runs it shows; the
    sweep's parent run gets tag ``report.run_id`` pointing back at it.
    """
    uri = configure(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    tags = {
        **source_tags(),
        "dataset": data.dataset or "",
        "mlflow.note.content": "HTML report; open report/index.html",
    }
    if data.sweep is not None:
        tags.update(sweep=data.sweep.name, sweep_parent_run_id=data.sweep.parent_run_id)
    tags.update({f"analysis.{k}": a.run_id for k, a in data.analyses.items()})
    name = f"report-{data.sweep.name if data.sweep is not None else data.dataset or 'analyses'}"
    run = client.create_run(ensure_experiment(REPORT_EXPERIMENT), tags=tags, run_name=name)
    run_id = run.info.run_id
    try:
        client.log_artifacts(run_id, str(folder), artifact_path="report")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    if data.sweep is not None:
        client.set_tag(data.sweep.parent_run_id, REPORT_TAG, run_id)
    log.info("report logged to run %s in experiment %r", run_id, REPORT_EXPERIMENT)
    return run_id
