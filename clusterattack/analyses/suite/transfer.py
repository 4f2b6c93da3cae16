"""The sweep's ``transfer`` analysis: per (data set, gradient source, eps), the sweep's generators on each victim (Fig. 4)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from clusterattack.analyses.suite.rows import _group_provenance, _groups
from clusterattack.analyses.suite.task import _Loader, _Outcome

if TYPE_CHECKING:
    from clusterattack.analyses.suite.request import SweepAnalysisRequest


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
