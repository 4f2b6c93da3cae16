"""ASHA against a full grid over the same attack configurations, in one run: best objective found and compute spent.

Both runs train the same generator attack (the sweep's own Tune trainable in its search
phase, black-box through a served, budgeted victim) on the same grid of (alpha_a, alpha_c)
points at each eps of ``--eps``, with the same seed per trial, in the same shuffled order:
the grid trains every point for ``--epochs`` generator epochs, ASHA (the sweep's
``GroupedASHA``: one ASHA per eps, ``--reduction-factor``, grace 1 epoch) stops the weak
points early. What both optimise is the sweep's label-free objective (the NMI between the
victim's clean and perturbed assignments of the attacker's hold-out, lower is stronger),
compared per eps as the sweep chooses. Compute is counted in generator epochs and in
image-queries charged by the ledger (the ``estimate`` gradient source queries in proportion
to epochs). Targets: at every eps, ASHA's best objective within 0.02 of the grid's best, for
at most a third of the grid's compute.

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
    p.add_argument("--points", type=int, default=3, help="grid points per sampled dimension (alpha_a, alpha_c)")
    p.add_argument("--eps", default="0.05,0.1,0.2", help="radii, each a group of its own (default 0.05,0.1,0.2)")
    # Ray's default reduction factor (4) and max_t = 4^2 epochs: rungs at 1, 4 and 16 epochs.
    p.add_argument("--epochs", type=int, default=16, help="generator epochs of a full trial (ASHA's max_t)")
    p.add_argument("--reduction-factor", type=float, default=4.0)
    p.add_argument("--train-limit", type=int, default=384, help="training images the generator sees")
    p.add_argument("--select-images", type=int, default=64, help="the attacker's hold-out the objective is measured on")
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
                "objective": float(last.get("objective", float("nan"))),
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
    from ray.tune.schedulers import FIFOScheduler

    from clusterattack.serving import LedgerAdmin, LedgerConfig
    from clusterattack.serving.deployment import start_serve
    from clusterattack.tuning.config import SweepConfig
    from clusterattack.tuning.schedulers import GroupedASHA
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
        select_images=args.select_images,
        eps_grid=tuple(float(e) for e in args.eps.split(",")),
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
    trainable = trial_trainable(
        config, target, ledger, secret, evaluator, config.attack_for(args.gradient_source), "search"
    )

    points = [{**p, "eps": eps} for eps in config.eps_grid for p in grid_configs(config.space, args.points)]
    # ASHA is asynchronous: the first trials at a rung go on unopposed, so a grid in its
    # systematic order (each point stronger than the one before) would be its worst case.
    # Both runs see the points in the same shuffled order, as a random search would draw them.
    random.Random(args.seed).shuffle(points)
    from ray import tune

    space = {**tune_space(config.space), "eps": tune.choice(list(config.eps_grid))}
    storage = str(workdir / "tune" / experiment)
    print(f"victim {target.victim_name} v{target.victim_version} {target.victim_scores}; "
          f"{len(points)} configurations x {args.epochs} epochs, gradient source {args.gradient_source}")  # fmt: skip

    grid, grid_s = _run("grid", trainable, space, points, FIFOScheduler(), storage)
    asha_scheduler = GroupedASHA(
        "eps", time_attr="epoch", max_t=args.epochs, grace_period=1, reduction_factor=args.reduction_factor
    )
    asha, asha_s = _run("asha", trainable, space, points, asha_scheduler, storage)
    serve.shutdown()
    ray.shutdown()

    def best(rows: list[dict], eps: float) -> dict:
        return min((r for r in rows if r["config"]["eps"] == eps), key=lambda r: r["objective"])

    per_eps = {}
    for eps in config.eps_grid:
        g, a = best(grid, eps), best(asha, eps)
        ranked = sorted((r for r in grid if r["config"]["eps"] == eps), key=lambda r: r["objective"])
        rank = next(i for i, r in enumerate(ranked) if r["config"] == a["config"]) + 1
        per_eps[eps] = {"grid_best": g["objective"], "asha_best": a["objective"], "gap": a["objective"] - g["objective"],
                        "asha_best_config": a["config"], "asha_best_rank_in_grid": rank, "of": len(ranked)}  # fmt: skip
    gap = max(v["gap"] for v in per_eps.values())
    grid_epochs, asha_epochs = sum(r["epochs"] for r in grid), sum(r["epochs"] for r in asha)
    grid_queries, asha_queries = sum(r["image_queries"] for r in grid), sum(r["image_queries"] for r in asha)
    epoch_ratio = asha_epochs / grid_epochs
    query_ratio = asha_queries / grid_queries if grid_queries else float("nan")
    result = {
        "victim": f"{target.victim_name}/{target.victim_version}",
        "objective": "label_free (NMI between clean and perturbed assignments of the attacker's hold-out)",
        "configurations": len(points),
        "epochs_per_trial": args.epochs,
        "gradient_source": args.gradient_source,
        "per_eps": {f"{k:g}": v for k, v in per_eps.items()},
        "grid": {"generator_epochs": grid_epochs, "image_queries": grid_queries, "wall_s": grid_s},
        "asha": {"generator_epochs": asha_epochs, "image_queries": asha_queries, "wall_s": asha_s,
                 "trials_to_max_t": sum(r["epochs"] == args.epochs for r in asha)},
        "objective_gap": gap,
        "epoch_ratio": epoch_ratio,
        "query_ratio": query_ratio,
        "targets": {"objective_gap_le_0.02": gap <= TARGET_NMI_GAP,
                    "epoch_ratio_le_1/3": epoch_ratio <= TARGET_COMPUTE_RATIO,
                    "query_ratio_le_1/3": query_ratio <= TARGET_COMPUTE_RATIO},
    }  # fmt: skip
    (workdir / f"{experiment}.json").write_text(json.dumps(result, indent=2))

    print(f"\nvictim {result['victim']}; objective: lower is a stronger attack")
    print(f"{'eps':>6} {'grid best':>10} {'ASHA best':>10} {'gap':>8} {'ASHA best rank in grid':>23}")
    for eps, v in per_eps.items():
        print(f"{eps:6g} {v['grid_best']:10.4f} {v['asha_best']:10.4f} {v['gap']:+8.4f} "
              f"{v['asha_best_rank_in_grid']:>17} of {v['of']}")  # fmt: skip
    print(f"\n{'':6} {'generator epochs':>17} {'image-queries':>14} {'wall s':>8}")
    for name, rows, wall in (("grid", grid, grid_s), ("ASHA", asha, asha_s)):
        epochs, queries = sum(r["epochs"] for r in rows), sum(r["image_queries"] for r in rows)
        print(f"{name:6} {epochs:17d} {queries:14,d} {wall:8.0f}")
    print(f"\nlargest ASHA - grid gap over eps: {gap:+.4f} (target <= {TARGET_NMI_GAP}); "
          f"{result['asha']['trials_to_max_t']} ASHA trials ran all {args.epochs} epochs")
    print(f"compute ASHA / grid: {epoch_ratio:.3f} in generator epochs, {query_ratio:.3f} in image-queries "
          f"(target <= {TARGET_COMPUTE_RATIO:.3f})")
    met = result["targets"]["objective_gap_le_0.02"] and (
        result["targets"]["epoch_ratio_le_1/3"] or result["targets"]["query_ratio_le_1/3"]
    )
    print(f"targets {'met' if met else 'NOT met'}: {result['targets']}")
    print(f"figures: {workdir / (experiment + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
