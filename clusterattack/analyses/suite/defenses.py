"""The sweep's defense analyses: ``detection`` (SSD, section 6.2), ``pca`` (Fig. 5b) and ``retraining`` (footnote 12)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterattack.analyses.suite.rows import (
    HEADLINE_EPS,
    _group_provenance,
    _groups,
    _nearest,
    _provenance,
    _row_key,
)
from clusterattack.analyses.suite.task import _Loader, _Outcome

if TYPE_CHECKING:
    from clusterattack.analyses.suite.request import SweepAnalysisRequest


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
