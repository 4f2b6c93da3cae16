"""The main job: search the generator attack's hyper-parameters with Ray Tune (ASHA) against served victims.

    python jobs/sweep.py --preset demo                      # Fashion-MNIST, CC and SCAN, eps 0.1, 2 seeds
    python jobs/sweep.py --preset tiny --storage /tmp/sw    # digits 8x8, a few minutes (tests)
    python jobs/sweep.py --preset paper                     # all six victims, every data set present, GPUs
    python jobs/sweep.py --recipe strong --eps 0.05,0.1 --gradient-source surrogate,estimate
    python jobs/sweep.py --objective oracle                 # label-based selection, to compare with the paper
    python jobs/sweep.py --resume                           # continue the latest interrupted sweep
    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow-host:5000"}}' \
        -- python jobs/sweep.py --preset paper --storage s3://bucket/sweeps

For each (model, dataset) it ingests the data set (or reuses it), loads the registered
victim (or trains and registers it) and serves it on Ray Serve with a query budget per
trial. For each gradient source, Tune runs every eps of --eps crossed with --num-samples
draws of alpha_a and alpha_c, ASHA comparing trials of the same eps only;
each trial attacks the served victim in a black-box gradient mode through its own key.
The selection objective is label-free by default: the NMI between the victim's clean and
perturbed assignments of images the attacker holds out of its own pool (select_images),
asked with queries charged to the trial and counted in Table 2. The best trial of each eps
is trained again with --seeds fresh seeds and scored on the test split, the only place
labels are read. MLflow gets one parent run per sweep, one child run per trial and seed
run, each eps's generator (a version of generator-<model>-<dataset>) and the tables
(Table 1: pre/post NMI, ARI, ACC, mean and std over seeds; Table 2: query complexity). With
RAY_ADDRESS set (as under `ray job submit`) it joins that cluster; otherwise it starts a
local Ray. MLFLOW_TRACKING_URI selects the MLflow store (default: sqlite:///mlruns/mlflow.db
in the working directory, which under `ray job submit` is a temporary copy: give the job a
tracking server, and a --storage every node sees, such as s3://, to keep what it writes).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # trials log per epoch; bars would interleave


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from clusterattack.attacks.config import NORMS
    from clusterattack.attacks.recipes import RECIPES
    from clusterattack.cli import key_value
    from clusterattack.precision import PRECISIONS
    from clusterattack.tuning.config import OBJECTIVES, PRESETS, TIME_ATTRS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="demo", help="sweep size (default: demo)")
    p.add_argument("--models", default=None, help="comma-separated victims, e.g. cc,scan,spice (default: the preset's)")
    p.add_argument("--datasets", default=None, help="comma-separated data sets, e.g. fashion_mnist (default: the preset's)")
    p.add_argument(
        "--victim", dest="own_victims", action="append", default=[], metavar="SPEC",
        help="a model of one's own as a victim spec (py:pkg.mod:factory, onnx:PATH, torchscript:PATH, an "
        "MLflow URI, adapter:FILE; docs/own-model.md), repeatable; swept on each --datasets data set (the "
        "one it was trained on); without --models, only these are swept",
    )
    p.add_argument(
        "--gradient-source", default=None, metavar="SOURCES",
        help="black-box gradient source(s) of the attack term, comma-separated: surrogate, estimate "
        "(each swept on its own; every row says which)",
    )
    p.add_argument(
        "--recipe", choices=tuple(RECIPES), default=None,
        help="named attack settings replacing the preset's own recipe (fast for demo and paper, default for "
        "tiny), the preset's device and hold-out kept; flags and --set win: "
        + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values()),
    )
    p.add_argument(
        "--set", dest="overrides", type=key_value, action="append", default=[], metavar="KEY=VALUE",
        help="any AttackConfig field, repeatable: --set surrogate.ensemble=2 --set select_images=2000",
    )
    p.add_argument("--norm", choices=NORMS, default=None, help="perturbation norm (--eps radii are in it)")
    p.add_argument(
        "--eps", default=None, metavar="E1,E2,...",
        help="radii swept as a grid, one best trial and one table row per value (default: the preset's; "
        "L2 sweeps default to 0.5,1,2)",
    )
    p.add_argument(
        "--objective", choices=OBJECTIVES, default=None,
        help="how trials and epochs are chosen: label_free (default: the attacker's own score on its hold-out, "
        "paid in queries) or oracle (test-set NMI with labels, the paper's protocol, for comparison only)",
    )
    p.add_argument("--seeds", type=int, default=None, help="fresh seeds each eps's best configuration is run with")
    p.add_argument(
        "--analyses", default=None, metavar="all|none|A,B",
        help="the paper's analyses after the seed runs, from this sweep's generators, each a child run: "
        "breakdown, norm_curves, transfer, detection (SSD), pca, retraining, baselines, query_detection (what "
        "the stateful query detector saw of each trial's key; turns detection on in flag mode on the sweep's "
        "deployments) (default: the preset's; paper all, demo breakdown, transfer, detection, pca, baselines; "
        "tiny none)",
    )
    p.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="NAME=KIND:ARGS",
        help="add or replace a search dimension, repeatable: alpha_a=loguniform:1:50, "
        "mi_temperature=choice:0.3,1 (eps is --eps)",
    )
    p.add_argument("--num-samples", type=int, default=None, help="trials per target, gradient source and eps")
    p.add_argument("--epochs", type=int, default=None, help="generator epochs per trial (ASHA's max_t in epochs)")
    p.add_argument("--budget", type=int, default=None, help="image-query budget of each trial's API key")
    p.add_argument("--time-attr", choices=TIME_ATTRS, default=None, help="ASHA resource (default: epoch)")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA grace period in --time-attr units")
    p.add_argument("--reduction-factor", type=float, default=None, help="ASHA reduction factor")
    p.add_argument("--cpus-per-trial", type=float, default=None)
    p.add_argument("--gpus-per-trial", type=float, default=None, help="> 0 runs the attack on CUDA")
    p.add_argument(
        "--precision", choices=PRECISIONS, default=None,
        help="bf16: generator and surrogate steps under bf16 autocast (for GPU trials; default fp32)",
    )
    p.add_argument("--max-concurrent", type=int, default=None, help="cap on trials at once (default: what fits)")
    p.add_argument("--max-failures", type=int, default=None, help="retries of a failed trial from its checkpoint")
    p.add_argument("--storage", default=None, help="Tune storage path or URI (default: runs/sweeps)")
    p.add_argument("--experiment", default=None, help="sweep name (default: <preset>-<date>-<time>)")
    p.add_argument("--data-dir", default=None, help="where data sets are stored as Parquet (default: data/parquet)")
    p.add_argument("--serve-port", type=int, default=None, help="Ray Serve HTTP port (default: 8000)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--record", default=None, metavar="NAME",
        help="write the finished sweep's Tables 1 and 2 as docs/results/NAME.json (a results record with its "
        "provenance; then `make results` regenerates docs/results.md); with --resume on a completed sweep, "
        "only that export",
    )
    p.add_argument("--record-headline", action="store_true", help="mark that record as the README's headline")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep (latest one, or --experiment)")
    p.add_argument("--ray-address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> Any:
    """The SweepConfig the flags describe (validated); targets are models x datasets."""
    from clusterattack.tuning.config import SweepConfig
    from clusterattack.tuning.space import parse_space

    base = SweepConfig.preset(args.preset)
    changes: dict[str, Any] = {}
    if args.models or args.datasets or args.own_victims:
        zoo = sorted({m for m, _ in base.targets}) if not args.own_victims else []
        models = [m.strip() for m in args.models.split(",")] if args.models else zoo
        datasets = args.datasets.split(",") if args.datasets else sorted({d for _, d in base.targets})
        changes["targets"] = tuple((m, d.strip()) for d in datasets for m in [*models, *args.own_victims])
    if args.space:
        if any(text.partition("=")[0].strip() == "eps" for text in args.space):
            raise ValueError("eps is not sampled: give the radii as a grid with --eps 0.05,0.1 (one row per value)")
        changes["space"] = parse_space(args.space, base.space)
    if args.gradient_source:
        changes["gradient_sources"] = tuple(s.strip() for s in args.gradient_source.split(",") if s.strip())
    if args.eps:
        try:
            changes["eps_grid"] = tuple(float(e) for e in args.eps.split(",") if e.strip())
        except ValueError:
            raise ValueError(f"--eps takes comma-separated numbers, got {args.eps!r}") from None
    if args.recipe:
        changes["recipe"] = args.recipe
    if args.analyses is not None:
        from clusterattack.analyses.suite import parse_analyses

        changes["analyses"] = parse_analyses(args.analyses)
    for flag, name in (
        ("objective", "objective"),
        ("seeds", "seeds"),
        ("norm", "norm"),
        ("num_samples", "num_samples"),
        ("epochs", "epochs"),
        ("budget", "budget"),
        ("time_attr", "time_attr"),
        ("grace_period", "grace_period"),
        ("reduction_factor", "reduction_factor"),
        ("cpus_per_trial", "cpus_per_trial"),
        ("gpus_per_trial", "gpus_per_trial"),
        ("precision", "precision"),
        ("max_concurrent", "max_concurrent"),
        ("max_failures", "max_failures"),
        ("storage", "storage"),
        ("experiment", "experiment"),
        ("data_dir", "data_dir"),
        ("serve_port", "serve_port"),
        ("seed", "seed"),
    ):
        value = getattr(args, flag)
        if value is not None:
            changes[name] = value
    if args.gpus_per_trial is not None:
        changes["device"] = "cuda" if args.gpus_per_trial > 0 else "cpu"
        if args.gpus_per_trial == 0:
            changes["replica_gpus"] = 0.0  # a CPU cluster: the victims are served on CPUs too
    if args.epochs is not None and "grace_period" not in changes and base.time_attr == "epoch":
        changes["grace_period"] = min(base.grace_period, args.epochs)
    for key, value in args.overrides:
        if key in ("eps", "gradient_source"):
            raise ValueError(f"--set {key} is not taken: use --{key.replace('_', '-')} (a sweep takes a list)")
        changes[key] = tuple(value) if key == "lr_milestones" else value
    return SweepConfig.preset(args.preset, **changes)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str) -> None:
    print(f"\n{title}")
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def report(outcome: Any) -> None:
    """Print the tables and where to look."""
    from clusterattack.tracking import ui_command

    print(f"\nsweep {outcome.config.experiment}: {outcome.wall_s:.0f} s, MLflow parent run {outcome.parent_run_id}")
    if outcome.interrupted:
        print(f"interrupted: continue with  python jobs/sweep.py --resume --experiment {outcome.config.experiment} "
              f"--storage {outcome.config.storage}")
        return
    selection = outcome.config.objective
    print_table(
        outcome.table1,
        ["model", "dataset", "gradient_source", "norm", "eps", "selection", "n_seeds", "alpha_a", "alpha_c",
         "nmi_pre", "nmi_post", "nmi_post_std", "ari_post", "acc_post", "nmi_drop", "nmi_drop_std",
         "changed_fraction"],
        f"Table 1: clustering before -> after the attack (one row per eps; mean and std over seeds, test split; "
        f"selection={selection})",
    )  # fmt: skip
    print_table(
        outcome.table2,
        ["model", "dataset", "gradient_source", "eps", "image_queries", "image_queries_std", "calls_256",
         "selection_image_queries", "scoring_image_queries", "calls_256_at_convergence", "search_trials",
         "search_image_queries", "sweep_image_queries"],
        "Table 2: query complexity (mean per seed run; selection queries included; calls_256 = image-queries / 256, "
        "the paper's unit; scoring queries are the experimenter's, counted apart)",
    )  # fmt: skip
    if outcome.analyses:
        print("\nanalyses (child runs of the parent; jobs/report.py shows them):")
        for name, status in outcome.analyses.items():
            detail = f": {status.error}" if status.error else ""
            print(f"  {name:12} {status.status.lower()}{detail}")
    if outcome.skipped:
        print(f"\nskipped (data set not present): {', '.join(outcome.skipped)}")
    print("\nregistered generators: " + (", ".join(outcome.generators.values()) or "none"))
    for name, paths in outcome.tables.items():
        print(f"{name}: {paths['csv']}  {paths['parquet']}")
    print(f"sweep state and Tune results: {outcome.state_dir}")
    print(f"MLflow UI: {ui_command(outcome.tracking_uri, port=5001)}   then open (experiment 'sweeps', "
          f"run {outcome.config.experiment}; MLflow 3 opens experiments in its GenAI view until 'Model training' "
          "is clicked once, these links open the training view):")
    from mlflow.exceptions import MlflowException

    from clusterattack.tracking.sweeps import SweepRecorder

    try:
        links = SweepRecorder(outcome.tracking_uri).ui_links(outcome.parent_run_id, "http://127.0.0.1:5001")
    except (MlflowException, OSError, KeyError) as err:  # the tables above stand without the links
        print(f"  (links unavailable: {err})")
        links = {}
    for title, url in links.items():
        print(f"  {title}: {url}")


def _completed(config) -> bool:
    from clusterattack.tuning.state import STATE_FILE, load_state, sweep_dir

    folder = sweep_dir(config)
    return (folder / STATE_FILE).exists() and load_state(folder).get("status") == "completed"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from clusterattack.tuning.config import SweepConfig
    from clusterattack.tuning.sweep import find_resumable, run_sweep

    try:
        if args.resume:
            storage = args.storage or SweepConfig().storage
            experiment = args.experiment or find_resumable(storage)
            config = SweepConfig.preset(args.preset, storage=storage, experiment=experiment)
        else:
            config = build_config(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.resume and args.record and _completed(config):
        # Nothing to run: export the finished sweep's tables as a record.
        from clusterattack.tuning.export import completed_outcome, export_sweep_record

        outcome = completed_outcome(config)
        print(f"sweep {config.experiment} has completed; its tables as a record: "
              f"{export_sweep_record(outcome, args.record, headline=args.record_headline)}")
        return 0
    try:
        outcome = run_sweep(config, resume=args.resume, ray_address=args.ray_address)
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Interrupted outside Tune (data, victim training, deployment): the state is saved.
        print(f"\ninterrupted: continue with  python jobs/sweep.py --resume --experiment {config.experiment} "
              f"--storage {config.storage}", file=sys.stderr)
        return 130
    report(outcome)
    if args.record and not outcome.interrupted:
        from clusterattack.tuning.export import export_sweep_record

        print(f"record: {export_sweep_record(outcome, args.record, headline=args.record_headline)}")
    return 130 if outcome.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
