"""Write the static HTML report of ONE sweep and its analyses (one folder that opens offline) and log it to MLflow.

Reads the sweep's parent run from MLflow: Tables 1 and 2 and the child runs of its analyses
(``jobs/sweep.py --analyses``: breakdown, norm curves, transfer, detection, PCA, retraining,
baselines), writes ``<out>/index.html`` with its PNG figures beside it, logs the folder as
artifacts ``report/`` of a run in MLflow experiment ``reports`` (the sweep's parent run gets
tag ``report.run_id``), and prints the path of index.html. Every table and figure names the
victim version, generator run, code commit, seeds and selection objective behind it. A
section whose analysis failed says so and why; one the sweep did not request says how to
request it. ``--run-analyses`` first runs analyses on the sweep's own generators (as child
runs of its parent), e.g. for a sweep that ran without them.

Examples:
    python jobs/report.py                                  # the newest sweep
    python jobs/report.py --sweep demo-20261122-185539 --images 10
    python jobs/report.py --parent-run 0123abcd... --no-mlflow --out /tmp/report
    python jobs/report.py --sweep demo-20261122-185539 --run-analyses transfer,pca
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("jobs.report")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--sweep",
        default=None,
        help="sweep name (tag 'sweep' of its parent run); default: the newest",
    )
    which.add_argument("--parent-run", default=None, help="the sweep's parent run id (instead of --sweep)")
    p.add_argument(
        "--dataset",
        default=None,
        help="show only this data set's rows and analyses; default: all of the sweep's",
    )
    p.add_argument("--out", default=None, help="report folder (default: runs/reports/<sweep>)")
    p.add_argument(
        "--images", type=int, default=8, help="images in the clean/perturbed grid when the report recomputes it"
    )
    p.add_argument(
        "--no-breakdown",
        action="store_true",
        help="when the sweep ran no breakdown analysis, do not recompute confusion matrices and the image grid here",
    )
    p.add_argument(
        "--run-analyses",
        default=None,
        metavar="KINDS",
        help="first run these analyses on the sweep's generators ('all' or comma-separated: breakdown, "
        "norm_curves, transfer, detection, pca, retraining, baselines, query_detection: only for a sweep that "
        "asked for it, whose detector state is in its folder here), as child runs of its parent",
    )
    p.add_argument("--cpus", type=float, default=None, help="CPUs per analysis task (default: the sweep's per trial)")
    p.add_argument(
        "--no-mlflow", action="store_true", help="do not log the report folder to MLflow"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the recomputation")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images must be at least 1, got {args.images}")
    if args.run_analyses is not None:
        from clusterattack.analyses.suite import parse_analyses

        try:
            args.run_analyses = parse_analyses(args.run_analyses)
        except ValueError as err:
            p.error(f"--run-analyses: {err}")
    return args


def run_analyses(args: argparse.Namespace) -> str:
    """Run ``--run-analyses`` on the sweep; returns its parent run id."""
    from mlflow.tracking import MlflowClient

    from clusterattack.analyses.suite import request_from_sweep, run_sweep_analyses
    from clusterattack.tracking import configure
    from clusterattack.tracking.reports import find_sweep

    uri = configure()
    parent = args.parent_run or find_sweep(MlflowClient(tracking_uri=uri), args.sweep).info.run_id
    overrides = {} if args.cpus is None else {"cpus_per_task": args.cpus}
    statuses = run_sweep_analyses(request_from_sweep(parent, args.run_analyses, uri, **overrides))
    for name, status in statuses.items():
        log.info("analysis %s: %s (run %s)%s", name, status.status, status.run_id,
                 f": {status.error}" if status.error else "")  # fmt: skip
    return parent


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from clusterattack.reports import write_report
    from clusterattack.tracking.reports import SweepNotFound, gather_report, log_report

    torch.set_num_threads(max(1, args.threads))
    try:
        if args.run_analyses:
            args.parent_run = run_analyses(args)
        with tempfile.TemporaryDirectory(prefix="clusterattack-report-") as work:
            data = gather_report(
                args.sweep,
                args.dataset,
                images=args.images,
                breakdown=not args.no_breakdown,
                work_dir=work,
                parent_run_id=args.parent_run,
            )
            name = data.sweep.name if data.sweep is not None else (data.dataset or "analyses")
            out = Path(args.out) if args.out else Path("runs") / "reports" / name
            index = write_report(data, out)
    except SweepNotFound as err:
        log.error("%s", err)
        return 2
    if not args.no_mlflow:
        run_id = log_report(out, data)
        log.info("report logged: MLflow run %s (experiment 'reports', artifacts report/)", run_id)
    print(index.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
