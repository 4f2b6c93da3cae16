"""Train deep clustering victims on a registered dataset and register them in MLflow.

    python jobs/train_victims.py --model cc --dataset fashion_mnist --preset demo
    python jobs/train_victims.py --model all --dataset fashion_mnist --preset demo --seed 0

Each run logs its config and per-epoch NMI/ARI/ACC (test split) to MLflow and registers
the model as ``victim-<model>-<dataset>``; later jobs load it with
``clusterattack.victims.load_victim("victim-cc-fashion_mnist")``. The store is the local
``sqlite:///mlruns/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from clusterattack.precision import PRECISIONS
from clusterattack.tracking import ui_command
from clusterattack.victims import PRESETS, VICTIMS, TrainJob, run_train_job
from clusterattack.victims.training import DEFAULT_CACHE_DIR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", required=True, choices=[*VICTIMS, "all"], help="victim to train, or all in turn"
    )
    p.add_argument("--dataset", default="fashion_mnist", help="registered dataset name")
    p.add_argument(
        "--preset",
        default="demo",
        choices=PRESETS,
        help="demo: minutes on a CPU; full: the GPU recipe",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ..."
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="override the recipe's main-stage epochs"
    )
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="default runs/checkpoints/<model>-<dataset>-<preset>-s<seed>",
    )
    p.add_argument(
        "--cache-dir", default=DEFAULT_CACHE_DIR, help="shared pretext / SCAN results ('' disables)"
    )
    p.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir"
    )
    p.add_argument(
        "--no-register", action="store_true", help="log the run but do not register the model"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    p.add_argument(
        "--train-limit", type=int, default=None, help="train on a seeded subset of this many images"
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="bf16: training steps under bf16 autocast (GPUs with bf16: A100, H100, ...); "
        "evaluation stays fp32",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # force: importing mlflow has already attached a handler (at WARNING) to the root logger.
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    args = parse_args(argv)
    # A plain SIGTERM would kill the process with its MLflow run left "RUNNING" forever;
    # as SystemExit the run is closed (FAILED) and the last checkpoint stays resumable.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    models = list(VICTIMS) if args.model == "all" else [args.model]
    if args.model == "all" and args.checkpoint_dir:
        raise SystemExit("--checkpoint-dir names one run's folder; leave it out with --model all")
    results = []
    for name in models:
        job = TrainJob(
            model=name,
            dataset=args.dataset,
            preset=args.preset,
            seed=args.seed,
            device=args.device,
            epochs=args.epochs,
            checkpoint_dir=args.checkpoint_dir,
            cache_dir=args.cache_dir or None,
            resume=args.resume,
            register=not args.no_register,
            num_threads=args.threads,
            train_limit=args.train_limit,
            progress=not args.no_progress,
            precision=args.precision,
        )
        results.append(run_train_job(job))
    for r in results:
        where = f" -> {r.registered_name} v{r.model_version}" if r.model_version else ""
        print(f"RESULT {r.summary()}{where}")
    print(f"MLflow UI: {ui_command()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
