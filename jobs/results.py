"""Regenerate docs/results.md and the README's headline table from the records in docs/results/*.json."""

from __future__ import annotations

import argparse
import logging
import sys

from clusterattack.reports.records import README, RESULTS_DIR, RESULTS_PAGE, RecordError, regenerate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is stale; write nothing")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="folder of the JSON records")
    parser.add_argument("--page", default=str(RESULTS_PAGE), help="generated results page")
    parser.add_argument("--readme", default=str(README), help="README holding the headline markers")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        changed = regenerate(args.results_dir, args.page, args.readme, check=args.check)
    except (RecordError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        for path in changed:
            print(f"stale: {path} (run `make results`)")
        return 1 if changed else 0
    print("up to date" if not changed else "\n".join(f"wrote {p}" for p in changed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
