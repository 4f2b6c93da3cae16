"""The sweep's ``baselines`` analysis: per (victim, gradient source) at the headline eps, the generator against per-image attacks (Appendix E)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterattack.analyses.suite.rows import HEADLINE_EPS, _groups, _nearest, _provenance, _row_key
from clusterattack.analyses.suite.task import _Loader, _Outcome

if TYPE_CHECKING:
    from clusterattack.analyses.suite.request import SweepAnalysisRequest


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
