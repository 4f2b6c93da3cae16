"""A sweep's Table 1 rows as the analyses use them: keys, groups, the run tags and the provenance of each item."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clusterattack.analyses.suite.request import SweepAnalysisRequest

#: The eps whose row stands for its group where an analysis takes one (baselines, the fresh attack of retraining).
HEADLINE_EPS = 0.1


def _row_key(row: Mapping[str, Any]) -> str:
    """``<model>-<dataset>-<gradient source>-eps<eps>``, as the sweep names a row's metrics and generator."""
    from clusterattack.tuning.sweep import row_key

    return row_key(row)


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
