"""Write the static HTML report of a sweep and its analyses (one folder that opens offline) and log it to MLflow.

Reads the sweep's tables and the newest analysis runs of its data set from MLflow,
recomputes confusion matrices and the image grid from the registered generators (the
victims are queried locally for that), writes ``<out>/index.html`` with its PNG figures
beside it, logs the folder as artifacts ``report/`` of a run in MLflow experiment
``reports`` (the sweep's parent run gets tag ``report.run_id``), and prints the path of
index.html. Sections whose inputs do not exist say "not run yet" and name the command.

Examples:
    python jobs/report.py                                  # the newest sweep
    python jobs/report.py --sweep demo-20261122-185539 --images 10
    python jobs/report.py --no-mlflow --out /tmp/report
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
    p.add_argument(
        "--sweep",
        default=None,
        help="sweep name (tag 'sweep' of its parent run); default: the newest",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="data set of the analyses and rows shown; default: the sweep's first",
    )
    p.add_argument("--out", default=None, help="report folder (default: runs/reports/<sweep>)")
    p.add_argument(
        "--images", type=int, default=8, help="images in the clean/perturbed grid (Fig. 1)"
    )
    p.add_argument(
        "--no-breakdown",
        action="store_true",
        help="do not recompute confusion matrices and the image grid (they load victims, generators and data)",
    )
    p.add_argument(
        "--no-mlflow", action="store_true", help="do not log the report folder to MLflow"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads for the recomputation")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error(f"--images must be at least 1, got {args.images}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from clusterattack.reports import write_report
    from clusterattack.tracking.reports import SweepNotFound, gather_report, log_report

    torch.set_num_threads(max(1, args.threads))
    with tempfile.TemporaryDirectory(prefix="clusterattack-report-") as work:
        try:
            data = gather_report(
                args.sweep,
                args.dataset,
                images=args.images,
                breakdown=not args.no_breakdown,
                work_dir=work,
            )
        except SweepNotFound as err:
            log.error("%s", err)
            return 2
        name = data.sweep.name if data.sweep is not None else (data.dataset or "analyses")
        out = Path(args.out) if args.out else Path("runs") / "reports" / name
        index = write_report(data, out)
    if not args.no_mlflow:
        run_id = log_report(out, data)
        log.info("report logged: MLflow run %s (experiment 'reports', artifacts report/)", run_id)
    print(index.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
