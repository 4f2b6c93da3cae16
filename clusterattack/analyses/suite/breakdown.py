"""The sweep's ``breakdown`` analysis: per row, confusion matrices and cluster sizes before and after (Fig. 2)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterattack.analyses.suite.rows import _provenance, _row_key
from clusterattack.analyses.suite.task import _Loader, _Outcome

if TYPE_CHECKING:
    from clusterattack.analyses.suite.request import SweepAnalysisRequest


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
