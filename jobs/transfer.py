"""Transfer matrices (paper Fig. 4) and norm curves (Fig. 3) over the registered victims, as Ray tasks.

Examples:
    python jobs/transfer.py matrix --dataset fashion_mnist \
        --victims cc scan nnm spice mice ruc \
        --generator cc=generator-cc-fashion_mnist/1 --generator scan=generator-scan-fashion_mnist/1 \
        --eps 0.15 --gradient-source surrogate
    python jobs/transfer.py norm-curves --dataset fashion_mnist --victims cc ruc \
        --eps-values 0.05 0.1 0.2 --gradient-source whitebox

    python jobs/transfer.py matrix --dataset digits --victims mine=py:examples.sklearn_digits:build cc \
        --eps 0.1 --no-ray

A victim is a zoo model name (victim-<name>-<dataset> in the registry), NAME=SPEC, or any
victim specification (docs/own-model.md; named after it). A decision-only victim is scored
by its cluster ids; as a source it needs the surrogate gradient source.

Ray starts in-process unless RAY_ADDRESS names a cluster; --no-ray runs everything here.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any

import torch

from clusterattack.analyses.common import CHEAP_ATTACK
from clusterattack.attacks.config import ATTACK_LOSSES, GRADIENT_SOURCES, NORMS, AttackConfig
from clusterattack.cli import key_value

log = logging.getLogger("jobs.transfer")


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return key, value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dataset", required=True)
    common.add_argument("--victims", nargs="+", required=True,
                        help="zoo names (registry victim-<name>-<dataset>), NAME=SPEC or victim specs")
    common.add_argument("--victim-file", type=_pair, action="append", default=[], metavar="NAME=SPEC",
                        help="load victim NAME from a file or any victim specification")
    common.add_argument("--norm", choices=NORMS, default="linf")
    common.add_argument("--gradient-source", choices=GRADIENT_SOURCES, default=CHEAP_ATTACK.gradient_source,
                        help="gradient source of generators trained here (recorded with every result)")
    common.add_argument("--attack-loss", choices=ATTACK_LOSSES, default=None)
    common.add_argument("--epochs", type=int, default=None, help="generator epochs (default: CHEAP_ATTACK's)")
    common.add_argument("--train-limit", type=int, default=None, help="training images per generator")
    common.add_argument("--set", dest="overrides", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="any AttackConfig field of generators trained here")
    common.add_argument("--test-limit", type=int, default=None)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--no-ray", action="store_true", help="run in this process instead of Ray tasks")
    common.add_argument("--threads", type=int, default=1, help="torch threads per task")
    common.add_argument("--no-mlflow", action="store_true")
    common.add_argument("--quiet", action="store_true")

    m = sub.add_parser("matrix", parents=[common], help="post-attack scores per (source generator, target victim)")
    m.add_argument("--sources", nargs="+", default=None, help="source victims (default: --victims)")
    m.add_argument("--generator", type=_pair, action="append", default=[], metavar="SOURCE=REF",
                   help="generator file or registry name generator-<m>-<ds>[/<version>] for a source")
    m.add_argument("--eps", type=float, default=0.15, help="bound every generator is applied at")
    m.add_argument("--no-train-missing", action="store_true", help="fail for sources without --generator")
    m.add_argument("--out", default="runs/analyses/transfer", help="folder for generators trained here")

    n = sub.add_parser("norm-curves", parents=[common], help="scores against eps, one generator per (victim, eps)")
    n.add_argument("--eps-values", type=float, nargs="+", default=[0.05, 0.1, 0.15, 0.2])
    return p.parse_args(argv)


def attack_config(args: argparse.Namespace) -> AttackConfig:
    changes: dict[str, Any] = {"gradient_source": args.gradient_source, "norm": args.norm, "seed": args.seed}
    for flag in ("attack_loss", "epochs", "train_limit"):
        if getattr(args, flag) is not None:
            changes[flag] = getattr(args, flag)
    changes.update(dict(args.overrides))
    return CHEAP_ATTACK.override(**changes)


_ZOO_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def named_victims(entries: list[str], files: list[tuple[str, str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """(names, NAME=SPEC pairs): zoo names stay names; ``NAME=SPEC`` and bare specs get a name."""
    from clusterattack.victims.sources import parse_victim_spec

    names, pairs = [], list(files)
    for entry in entries:
        key, sep, value = entry.partition("=")
        if _ZOO_NAME.match(entry):
            names.append(entry)
            continue
        if sep and _ZOO_NAME.match(key):
            name, spec = key, value
        else:
            spec = entry
            name = re.sub(r"[^A-Za-z0-9_.-]+", "-", parse_victim_spec(spec).display_name).strip("-.")
        parse_victim_spec(spec)
        names.append(name)
        pairs.append((name, spec))
    return names, pairs


def check_sources(names: list[str], files: list[tuple[str, str]], dataset: str, gradient_source: str) -> None:
    """Refuse, before any work, a source victim given by spec that the gradient source cannot attack."""
    from clusterattack.victims.sources import for_gradient_source, parse_victim_spec, resolve_victim

    given = dict(files)
    for name in names:
        # Models of this package admit every gradient source; only other specs are loaded here.
        if name in given and parse_victim_spec(given[name]).kind not in ("registry", "file"):
            for_gradient_source(resolve_victim(given[name], dataset=dataset), gradient_source, name)


def build_config(args: argparse.Namespace):
    from clusterattack.analyses import NormCurvesConfig, TransferConfig

    victims, files = named_victims(args.victims, args.victim_file)
    sources: list[str] = []
    if getattr(args, "sources", None):
        sources, files = named_victims(args.sources, files)
    with_generator = dict(getattr(args, "generator", []))
    trained_here = [n for n in (sources or victims) if n not in with_generator]
    check_sources(trained_here, files, args.dataset, args.gradient_source)
    common = {
        "dataset": args.dataset,
        "victim_files": tuple(dict(files).items()),
        "norm": args.norm,
        "attack": attack_config(args),
        "seed": args.seed,
        "use_ray": not args.no_ray,
        "threads": args.threads,
        "progress": not args.quiet,
    }
    if args.command == "matrix":
        return TransferConfig(
            targets=tuple(victims),
            sources=tuple(sources),
            generators=tuple(args.generator),
            eps=args.eps,
            test_limit=args.test_limit or 8000,
            train_missing=not args.no_train_missing,
            out_dir=args.out,
            **common,
        )
    return NormCurvesConfig(
        victims=tuple(victims),
        eps_values=tuple(args.eps_values),
        test_limit=args.test_limit or 2000,
        **common,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    try:
        config = build_config(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from clusterattack.analyses import log_norm_curves, log_transfer, run_norm_curves, run_transfer

    if args.command == "matrix":
        result = run_transfer(config)
        for metric in ("nmi", "ari", "acc"):
            print(result.matrix_text(metric), end="\n\n")
        print(f"generators: {json.dumps(result.payload['generators'])}")
        print(f"gradient sources: {json.dumps(result.payload['gradient_sources'])}")
        print(f"image queries (training the generators): {result.payload['image_queries']}")
        run_id = None if args.no_mlflow else log_transfer(result)
    else:
        result = run_norm_curves(config)
        print(result.table_text())
        run_id = None if args.no_mlflow else log_norm_curves(result)
    if run_id:
        print(f"MLflow run {run_id} (experiment analyses)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
