"""The sweep's ``norm_curves`` analysis: per (data set, gradient source), scores against eps beside the white-box reference (Fig. 3)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterattack.analyses.suite.rows import _group_provenance, _groups, _nearest, _row_key
from clusterattack.analyses.suite.task import _Loader, _Outcome

if TYPE_CHECKING:
    from clusterattack.analyses.suite.request import SweepAnalysisRequest


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
