"""Export a victim of this package as an ONNX or TorchScript file that says what it is.

    python examples/export_victim.py victim-cc-digits runs/export/cc.onnx
    python examples/export_victim.py runs/checkpoints/cc.pt runs/export/cc.ts --torchscript

The file keeps the number of clusters, the input shape and the output kind (logits) in
its metadata, so ``--victim onnx:runs/export/cc.onnx`` (or ``torchscript:...``) needs no
options. Any victim spec of a torch model of the Victim contract can be exported.
"""

from __future__ import annotations

import argparse
import logging

from clusterattack.victims.io import load_victim
from clusterattack.victims.sources.export import export_onnx, export_torchscript


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("victim", help="victim spec of a torch model (zoo name, save_victim file, py:...)")
    p.add_argument("out", help="file to write (.onnx, or .ts/.pt with --torchscript)")
    p.add_argument("--torchscript", action="store_true", help="write TorchScript instead of ONNX")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    model = load_victim(args.victim)
    (export_torchscript if args.torchscript else export_onnx)(model, args.out)
    print(f"{'torchscript' if args.torchscript else 'onnx'}:{args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
