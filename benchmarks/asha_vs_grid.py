"""ASHA against a full grid over the same attack configurations, in one run: best NMI found and compute spent.

Both runs train the same generator attack (the sweep's own Tune trainable, black-box
through a served, budgeted victim) on the same grid of (alpha_a, alpha_c, eps) points
with the same seed per trial, in the same shuffled order: the grid trains every point for
``--epochs`` generator epochs, ASHA (``--reduction-factor``, grace 1 epoch) stops the weak
points early. Compute is counted in generator epochs and in image-queries charged by the
ledger (the ``estimate`` gradient source queries in proportion to epochs). Targets: ASHA's
best post-attack NMI within 0.02 of the grid's best, for at most a third of the grid's
compute.

    python benchmarks/asha_vs_grid.py                           # cc on 8x8 digits, 27 points x 16 epochs
    python benchmarks/asha_vs_grid.py --points 2 --epochs 4     # a quick look

Victim, Parquet data and the MLflow store it is registered in stay in ``--workdir``
(default runs/bench/asha_vs_grid), so a second run reuses them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

TARGET_NMI_GAP = 0.02
TARGET_COMPUTE_RATIO = 1 / 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cc")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--victim-epochs", type=int, default=20, help="training epochs of the victim if it is not registered")
    p.add_argument("--gradient-source", choices=("estimate", "surrogate"), default="estimate",
                   help="estimate: image-queries grow with epochs, so both compute measures compare")
    p.add_argument("--points", type=int, default=3, help="grid points per dimension (3 dimensions)")
    # Ray's default reduction factor (4) and max_t = 4^2 epochs: rungs at 1, 4 and 16 epochs.
    p.add_argument("--epochs", type=int, default=16, help="generator epochs of a full trial (ASHA's max_t)")
    p.add_argument("--reduction-factor", type=float, default=4.0)
    p.add_argument("--train-limit", type=int, default=384, help="training images the generator sees")
    p.add_argument("--eval-limit", type=int, default=360, help="test images scored after each epoch")
    p.add_argument("--workdir", default="runs/bench/asha_vs_grid")
    p.add_argument("--serve-port", type=int, default=8123)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _summaries(grid: Any) -> list[dict[str, Any]]:
    out = []
    for result in grid:
        frame = result.metrics_dataframe
        last = result.metrics or {}
        out.append(
            {
                "config": dict(result.config),
                "epochs": int(last.get("epoch", 0)),
                "image_queries": int(last.get("image_queries", 0)),
                "nmi_post": float(last.get("nmi_post", float("nan"))),
                "nmi_pre": float(last.get("nmi_pre", float("nan"))),
                "reports": 0 if frame is None else len(frame),
            }
        )
    return out


def _run(
    name: str, trainable: Any, space: dict, points: list[dict], scheduler: Any, storage: str
) -> tuple[list[dict], float]:
    """Run every configuration of ``points``, in that order, under ``scheduler``."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    from clusterattack.tuning.config import METRIC, MODE

    started = time.perf_counter()
    # points_to_evaluate with as many samples as points: exactly the grid, in our order.
    search = BasicVariantGenerator(points_to_evaluate=[dict(p) for p in points])
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode=MODE, scheduler=scheduler, search_alg=search, num_samples=len(points),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=0,
        ),
    )
    grid = tuner.fit()
    if grid.errors:
        raise RuntimeError(f"{len(grid.errors)} trial(s) of the {name} run failed: {grid.errors[0]}")
    return _summaries(grid), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    os.environ.setdefault("CLUSTERATTACK_ARTIFACT_ROOT", str(workdir / "mlartifacts"))

    import ray
    from ray import serve
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from clusterattack.serving import LedgerAdmin, LedgerConfig
    from clusterattack.serving.deployment import start_serve
    from clusterattack.tuning.config import SweepConfig
    from clusterattack.tuning.space import grid_configs, tune_space
    from clusterattack.tuning.sweep import trial_trainable
    from clusterattack.tuning.targets import prepare_target
    from clusterattack.tuning.trainable import derive_api_key, ensure_key

    experiment = f"asha-vs-grid-{time.strftime('%Y%m%d-%H%M%S')}"
    config = SweepConfig.preset(
        "tiny",
        targets=((args.model, args.dataset),),
        experiment=experiment,
        storage=str(workdir / "tune"),
        data_dir=str(workdir / "data"),
        gradient_source=args.gradient_source,
        epochs=args.epochs,
        train_limit=args.train_limit,
        eval_limit=args.eval_limit,
        victim_epochs=args.victim_epochs,
        budget=10**12,  # compute is what is measured here, not a budget's effect
        seed=args.seed,
        **{"estimator.samples": 2, "estimator.resolution": 0.5},
    )
    ray.init(include_dashboard=False, object_store_memory=256 * 1024 * 1024, configure_logging=False)
    start_serve("127.0.0.1", args.serve_port)
    ledger = LedgerConfig(db_path=str(workdir / f"{experiment}-ledger.sqlite"), actor_name=f"ledger-{experiment}")
    secret = secrets.token_urlsafe(24)
    evaluator = derive_api_key(secret, "evaluator")
    ensure_key(LedgerAdmin(ledger), "evaluator", evaluator, 10**15)
    target = prepare_target(config, args.model, args.dataset, ledger, workdir)
    trainable = trial_trainable(config, target, ledger, secret, evaluator)

    points = grid_configs(config.space, args.points)
    # ASHA is asynchronous: the first trials at a rung go on unopposed, so a grid in its
    # systematic order (each point stronger than the one before) would be its worst case.
    # Both runs see the points in the same shuffled order, as a random search would draw them.
    random.Random(args.seed).shuffle(points)
    space = tune_space(config.space)
    storage = str(workdir / "tune" / experiment)
    print(f"victim {target.victim_name} v{target.victim_version} {target.victim_scores}; "
          f"{len(points)} configurations x {args.epochs} epochs, gradient source {args.gradient_source}")  # fmt: skip

    grid, grid_s = _run("grid", trainable, space, points, FIFOScheduler(), storage)
    asha_scheduler = ASHAScheduler(
        time_attr="epoch", max_t=args.epochs, grace_period=1, reduction_factor=args.reduction_factor
    )
    asha, asha_s = _run("asha", trainable, space, points, asha_scheduler, storage)
    serve.shutdown()
    ray.shutdown()

    def best(rows: list[dict]) -> dict:
        return min(rows, key=lambda r: r["nmi_post"])

    grid_best, asha_best = best(grid), best(asha)
    grid_epochs, asha_epochs = sum(r["epochs"] for r in grid), sum(r["epochs"] for r in asha)
    grid_queries, asha_queries = sum(r["image_queries"] for r in grid), sum(r["image_queries"] for r in asha)
    gap = asha_best["nmi_post"] - grid_best["nmi_post"]
    epoch_ratio = asha_epochs / grid_epochs
    query_ratio = asha_queries / grid_queries if grid_queries else float("nan")
    ranked = sorted(grid, key=lambda r: r["nmi_post"])
    rank = next(i for i, r in enumerate(ranked) if r["config"] == asha_best["config"]) + 1
    result = {
        "victim": f"{target.victim_name}/{target.victim_version}",
        "nmi_pre": grid_best["nmi_pre"],
        "configurations": len(points),
        "epochs_per_trial": args.epochs,
        "gradient_source": args.gradient_source,
        "grid": {"best_nmi_post": grid_best["nmi_post"], "best_config": grid_best["config"],
                 "generator_epochs": grid_epochs, "image_queries": grid_queries, "wall_s": grid_s},
        "asha": {"best_nmi_post": asha_best["nmi_post"], "best_config": asha_best["config"],
                 "generator_epochs": asha_epochs, "image_queries": asha_queries, "wall_s": asha_s,
                 "trials_to_max_t": sum(r["epochs"] == args.epochs for r in asha),
                 "best_config_rank_in_grid": rank},
        "nmi_gap": gap,
        "epoch_ratio": epoch_ratio,
        "query_ratio": query_ratio,
        "targets": {"nmi_gap_le_0.02": gap <= TARGET_NMI_GAP,
                    "epoch_ratio_le_1/3": epoch_ratio <= TARGET_COMPUTE_RATIO,
                    "query_ratio_le_1/3": query_ratio <= TARGET_COMPUTE_RATIO},
    }  # fmt: skip
    (workdir / f"{experiment}.json").write_text(json.dumps(result, indent=2))

    print(f"\nvictim {result['victim']}: NMI before the attack {grid_best['nmi_pre']:.4f}")
    print(f"{'':6} {'best NMI after':>15} {'generator epochs':>17} {'image-queries':>14} {'wall s':>8}")
    for name, rows, wall in (("grid", grid, grid_s), ("ASHA", asha, asha_s)):
        b = best(rows)
        epochs, queries = sum(r["epochs"] for r in rows), sum(r["image_queries"] for r in rows)
        print(f"{name:6} {b['nmi_post']:15.4f} {epochs:17d} {queries:14,d} {wall:8.0f}")
    print(f"\nASHA best - grid best NMI: {gap:+.4f} (target <= {TARGET_NMI_GAP}); ASHA's best is rank {rank} "
          f"of {len(grid)} in the grid; {result['asha']['trials_to_max_t']} ASHA trials ran all {args.epochs} epochs")
    print(f"compute ASHA / grid: {epoch_ratio:.3f} in generator epochs, {query_ratio:.3f} in image-queries "
          f"(target <= {TARGET_COMPUTE_RATIO:.3f})")
    met = result["targets"]["nmi_gap_le_0.02"] and (
        result["targets"]["epoch_ratio_le_1/3"] or result["targets"]["query_ratio_le_1/3"]
    )
    print(f"targets {'met' if met else 'NOT met'}: {result['targets']}")
    print(f"figures: {workdir / (experiment + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
