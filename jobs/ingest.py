"""Ingest a data set into Parquet at a local path or s3:// URI, then read it back and count rows."""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from clusterattack.cli import key_value
from clusterattack.data import DatasetError, ingest_dataset, list_datasets, read_parquet_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True, help=f"one of {', '.join(list_datasets())}")
    parser.add_argument("--out", required=True, help="local path or s3://bucket/prefix")
    parser.add_argument(
        "--root",
        default=None,
        help="folder of user-provided data sets (default: "
        "$CLUSTERATTACK_DATA_DIR or ~/.cache/clusterattack/data)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a data set at --out")
    parser.add_argument(
        "--opt",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="reader option, repeatable, e.g. --opt size=32 --opt 'exclude=[\"*Ambient*\"]'",
    )
    parser.add_argument("--rows-per-part", type=int, default=None, help="rows per Parquet file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        uri = ingest_dataset(
            args.dataset,
            args.out,
            root=args.root,
            overwrite=args.overwrite,
            rows_per_part=args.rows_per_part,
            **dict(args.opt),
        )
    except (DatasetError, ValueError) as err:  # not installed, exists, bad option: no traceback
        print(f"ingest: {err}", file=sys.stderr)
        return 2
    ds = read_parquet_dataset(uri)
    print(f"{ds.name} at {uri}: {len(ds)} rows, images {ds.shape[0]}x{ds.shape[1]}x{ds.shape[2]}")
    for split in np.unique(ds.split):
        print(f"  split {split}: {int((ds.split == split).sum())}")
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    for cls, count in zip(ds.class_names, counts, strict=True):
        print(f"  class {cls}: {int(count)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
