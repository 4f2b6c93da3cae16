"""What the HTML report shows, read from MLflow: a sweep's tables, the newest analyses, and the registered generators.

``gather_report`` returns a :class:`~clusterattack.reports.ReportData` (pure data) that
``clusterattack.reports.write_report`` turns into a folder; ``log_report`` stores that
folder as the artifacts (``report/``) of a run in experiment ``reports`` and tags the
sweep's parent run with that run's id (``report.run_id``), so the sweep links to its
newest report while the sweep's own artifacts stay as the sweep wrote them.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clusterattack.reports.report import (
    ANALYSIS_KINDS,
    AnalysisResult,
    ReportData,
    SweepTables,
    default_commands,
)
from clusterattack.tracking.analyses import (
    ANALYSIS_EXPERIMENT,
    TAG_ANALYSIS,
    TAG_DATASET,
    registered_generator_info,
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
    "read_analyses",
    "read_sweep",
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
def read_analyses(client: MlflowClient, dataset: str, dst: str | Path) -> dict[str, AnalysisResult]:
    """The newest run of each analysis kind for ``dataset``: payload, PCA points and logged figures
    (downloaded under ``dst``)."""
    exp = client.get_experiment_by_name(ANALYSIS_EXPERIMENT)
    if exp is None:
        return {}
    out: dict[str, AnalysisResult] = {}
    for kind in ANALYSIS_KINDS:
        runs = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{TAG_ANALYSIS}` = '{kind}' and tags.`{TAG_DATASET}` = '{dataset}'",
            order_by=["attributes.start_time DESC"],
            max_results=20,
        )
        for run in runs:  # the newest run that has its payload (a crashed one may not)
            run_id = run.info.run_id
            where = Path(dst) / kind / run_id
            path = _download(client, run_id, f"analysis/{kind}.json", where)
            if path is None:
                log.warning(
                    "analysis run %s (%s) has no analysis/%s.json: skipped", run_id, kind, kind
                )
                continue
            payload = json.loads(path.read_text())
            result = AnalysisResult(kind, run_id, payload)
            points = payload.get("points") if kind == "pca" else None
            if isinstance(points, str):
                local = _download(client, run_id, points, where)
                if local is not None:
                    with np.load(local) as npz:
                        result.arrays = {k: np.asarray(npz[k]) for k in npz.files}
            for item in client.list_artifacts(run_id, "figures"):
                if item.path.endswith(".png"):
                    local = _download(client, run_id, item.path, where)
                    if local is not None:
                        result.figure_files[Path(item.path).stem] = local
            out[kind] = result
            break
    return out


def _newest_analysis_dataset(client: MlflowClient) -> str | None:
    exp = client.get_experiment_by_name(ANALYSIS_EXPERIMENT)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].data.tags.get(TAG_DATASET) if runs else None


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
    return data.subset("test", limit=limit, seed=int(config.get("seed", 0)))


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
            victim_uri = f"models:/{row['victim']}/{row.get('victim_version') or 'latest'}"
            victim = load_victim(victim_uri)
            if row["dataset"] not in samples:
                samples[row["dataset"]] = _test_sample(row["dataset"], config)
            sample = samples[row["dataset"]]
            result = compute_breakdown(
                victim, generator, attack, sample.images, sample.labels,
                grid_images=images, sample_seed=int(config.get("seed", 0)), class_names=sample.class_names,
                provenance={
                    "model": row["model"], "dataset": row["dataset"],
                    "victim": f"{row['victim']}/{row.get('victim_version') or 'latest'}",
                    "generator": registered, "generator_run_id": info["run_id"],
                    "gradient_source": attack.gradient_source, "norm": attack.norm, "eps": float(attack.eps),
                    "seed": int(attack.seed),
                },
            )  # fmt: skip
            out.append(result)
        except (MlflowException, DatasetError, OSError, ValueError, RuntimeError, KeyError) as err:
            # One target that cannot be recomputed (data absent here, model deleted) must not stop the report.
            log.warning("no breakdown for %s: %s", key, err)
            errors.append(f"{key}: {err}")
    return out, "; ".join(errors)


# ------------------------------------------------------------------ the whole report
def _commands(tables: SweepTables | None, dataset: str | None) -> dict[str, str]:
    """The commands of the missing sections, with the sweep's victims and registered generators filled in."""
    if tables is None or not tables.table1:
        return default_commands(dataset or "<dataset>")
    rows = [r for r in tables.table1 if dataset is None or r.get("dataset") == dataset]
    victims = list(dict.fromkeys(str(r["model"]) for r in rows))
    generators: dict[str, str] = {}
    # The headline radius (eps 0.1 where the sweep has it) names each victim's generator.
    for row in sorted(rows, key=lambda r: abs(float(r.get("eps") or 0.0) - 0.1)):
        registered = row.get("generator") or tables.generators.get(f"{row['model']}-{dataset}")
        if registered and isinstance(registered, str):
            generators.setdefault(str(row["model"]), registered)
    return default_commands(dataset or "<dataset>", victims, generators)


def gather_report(
    sweep: str | None = None,
    dataset: str | None = None,
    images: int = 8,
    breakdown: bool = True,
    tracking_uri: str | None = None,
    work_dir: str | Path | None = None,
) -> ReportData:
    """Everything the report shows for sweep ``sweep`` (default: the newest) and ``dataset``
    (default: the sweep's first target's, else that of the newest analysis run).

    A store without sweeps still gives a report (its analyses, the rest marked not run);
    ``sweep`` named but absent raises :class:`SweepNotFound`. ``breakdown`` False skips
    recomputing confusion matrices and the image grid (which loads models and data).
    ``work_dir`` holds downloaded artifacts (a temporary folder when None; figures are
    copied out of it by the writer, so it may be removed after ``write_report``).
    """
    uri = configure(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    tables: SweepTables | None = None
    config: dict[str, Any] = {}
    try:
        tables, config = read_sweep(client, find_sweep(client, sweep), dataset)
    except SweepNotFound:
        if sweep is not None:
            raise
        log.warning("no sweep in %s: the report shows the analyses only", uri)
    if dataset is None and tables is not None and tables.table1:
        dataset = str(tables.table1[0]["dataset"])
    dataset = dataset or _newest_analysis_dataset(client)
    dst = (
        Path(work_dir)
        if work_dir is not None
        else Path(tempfile.mkdtemp(prefix="clusterattack-report-"))
    )
    sweep_name = tables.name if tables is not None else (sweep or "<sweep>")
    data = ReportData(
        title=f"clusterattack report: {sweep_name}" + (f" on {dataset}" if dataset else ""),
        tracking_uri=uri,
        generated_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        dataset=dataset,
        sweep=tables,
        analyses=read_analyses(client, dataset, dst / "analyses") if dataset else {},
        commands=_commands(tables, dataset),
    )
    if tables is not None and breakdown:
        data.breakdowns, data.breakdown_error = _breakdowns(
            client, tables, config, images, dst / "generators"
        )
    elif tables is not None:
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
