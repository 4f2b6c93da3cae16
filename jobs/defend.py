"""Defenses against trained generators: SSD detection, PCA overlap, adversarial retraining (footnote 12).

Examples:
    python jobs/defend.py detect --dataset fashion_mnist --victim cc \
        --generator generator-cc-fashion_mnist/1 --target-fpr 0.05
    python jobs/defend.py pca --dataset fashion_mnist --victim cc --generator generator-cc-fashion_mnist/1
    python jobs/defend.py retrain --dataset fashion_mnist --victim cc \
        --generator generator-cc-fashion_mnist/1 --epochs 2 --train-limit 20000 --gradient-source whitebox
    python jobs/defend.py detect --dataset digits --victim py:examples.sklearn_digits:build \
        --encoder cc --generator runs/digits-gmm/generator.pt --images 300 --fit-images 800 --heldout-images 300

``--victim`` is a zoo model name or any victim specification (docs/own-model.md). ``detect``
needs features: the victim's own backbone (a model of this package, or a torch model with
``features``), else ``--encoder``; ``pca`` needs none; ``retrain`` retrains a model of this
package only.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys

import torch

from clusterattack.analyses.common import CHEAP_ATTACK
from clusterattack.attacks.config import GRADIENT_SOURCES, NORMS
from clusterattack.cli import key_value

log = logging.getLogger("jobs.defend")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dataset", required=True)
    common.add_argument("--victim", required=True,
                        help="zoo name (registry victim-<name>-<dataset>) or any victim specification")
    common.add_argument("--victim-file", default=None, help="load the victim from this file or spec instead")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    common.add_argument("--no-mlflow", action="store_true")
    common.add_argument("--quiet", action="store_true")
    bound = argparse.ArgumentParser(add_help=False)
    bound.add_argument("--generator", required=True, help="generator file or generator-<m>-<ds>[/<version>]")
    bound.add_argument("--eps", type=float, default=None, help="apply at this eps (default: the generator's)")
    bound.add_argument("--norm", choices=NORMS, default=None, help="apply under this norm (default: the generator's)")

    d = sub.add_parser("detect", parents=[common, bound], help="SSD detector, 8,000 images x 100 trials")
    d.add_argument("--target-fpr", type=float, default=0.05)
    d.add_argument("--images", type=int, default=8000)
    d.add_argument("--trials", type=int, default=100)
    d.add_argument("--fit-images", type=int, default=10000, help="clean training images fitting the detector")
    d.add_argument("--heldout-images", type=int, default=2000, help="clean held-out images setting the threshold")
    d.add_argument("--clusters", choices=("kmeans", "victim"), default="kmeans")
    d.add_argument("--num-clusters", type=int, default=None)
    d.add_argument("--encoder", default=None, help="victim name or file whose backbone gives the features")

    c = sub.add_parser("pca", parents=[common, bound], help="first 3 PCs of clean vs adversarial images")
    c.add_argument("--images", type=int, default=2000)
    c.add_argument("--out", default=None, help="folder for points.npz")

    r = sub.add_parser("retrain", parents=[common], help="adversarial retraining, then old and fresh attacks")
    r.add_argument("--generator", action="append", required=True, help="repeatable: generators to retrain against")
    r.add_argument("--mix", type=float, default=0.5, help="fraction of training images replaced by adversarial ones")
    r.add_argument("--epochs", type=int, default=2, help="recipe epochs of the retraining")
    r.add_argument("--train-limit", type=int, default=20000)
    r.add_argument("--test-limit", type=int, default=8000)
    r.add_argument("--gradient-source", choices=GRADIENT_SOURCES, default=CHEAP_ATTACK.gradient_source,
                   help="gradient source of the fresh attack")
    r.add_argument("--fresh-eps", type=float, default=CHEAP_ATTACK.eps)
    r.add_argument("--fresh-norm", choices=NORMS, default=CHEAP_ATTACK.norm)
    r.add_argument("--set", dest="overrides", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any AttackConfig field of the fresh attack")
    return p.parse_args(argv)


_ZOO_NAME = re.compile(r"^[A-Za-z0-9_]+$")


def split_victim(args: argparse.Namespace) -> None:
    """A spec in ``--victim`` becomes ``--victim-file`` under a short name for the records."""
    if _ZOO_NAME.match(args.victim):
        return
    from clusterattack.victims.sources import parse_victim_spec

    spec = parse_victim_spec(args.victim)
    if args.victim_file:
        raise ValueError(f"--victim {args.victim!r} is a spec already: drop --victim-file")
    args.victim_file = args.victim
    args.victim = re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.display_name).strip("-.")


def check_victim(args: argparse.Namespace):
    """A victim given by another kind of spec, loaded once, if this defense can use it;
    ValueError saying what it lacks. None for a model of this package (the analysis loads
    it as it always did) and for ``pca``, which needs no model at all."""
    if args.victim_file is None or args.command == "pca":
        return None
    from clusterattack.analyses.common import load_victim_named
    from clusterattack.victims.base import ClusteringModel
    from clusterattack.victims.sources import parse_victim_spec

    if parse_victim_spec(args.victim_file).kind in ("registry", "file"):
        return None  # a model of this package: every defense takes it, loaded by the analysis

    victim = load_victim_named(args.victim, args.dataset, {args.victim: args.victim_file})
    if args.command == "detect" and args.encoder is None and not callable(getattr(victim, "features", None)):
        raise ValueError(
            f"victim {args.victim_file!r} has no features(): the SSD detector needs an embedding; pass "
            "--encoder (a zoo name or file whose backbone gives the features)"
        )
    if args.command == "retrain" and not isinstance(victim, ClusteringModel):
        raise ValueError(
            f"victim {args.victim_file!r} is a {type(victim).__name__}: adversarial retraining retrains a "
            "model of this package (a zoo name or a save_victim file); use detect or pca for other models"
        )
    return victim


def build_config(args: argparse.Namespace):
    from clusterattack.analyses import DetectionConfig, PCAConfig, RetrainingConfig

    if args.command == "detect":
        return DetectionConfig(
            dataset=args.dataset, victim=args.victim, generator=args.generator, eps=args.eps, norm=args.norm,
            target_fpr=args.target_fpr, images=args.images, trials=args.trials, fit_images=args.fit_images,
            heldout_images=args.heldout_images, clusters=args.clusters, num_clusters=args.num_clusters,
            encoder=args.encoder, victim_file=args.victim_file, seed=args.seed,
        )
    if args.command == "pca":
        return PCAConfig(
            dataset=args.dataset, generator=args.generator, victim=args.victim, eps=args.eps, norm=args.norm,
            images=args.images, seed=args.seed, out_dir=args.out,
        )
    fresh = CHEAP_ATTACK.override(
        gradient_source=args.gradient_source, eps=args.fresh_eps, norm=args.fresh_norm, seed=args.seed,
        **dict(args.overrides),
    )
    return RetrainingConfig(
        dataset=args.dataset, victim=args.victim, generators=tuple(args.generator), mix=args.mix,
        epochs=args.epochs, train_limit=args.train_limit, test_limit=args.test_limit, fresh_attack=fresh,
        victim_file=args.victim_file, seed=args.seed, threads=args.threads, progress=not args.quiet,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    try:
        split_victim(args)
        config = build_config(args)
        victim = check_victim(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from clusterattack.analyses import log_result, run_detection, run_pca, run_retraining
    from clusterattack.analyses.defenses import retraining_text

    if args.command == "detect":
        result = run_detection(config, victim=victim)
        p = result.payload
        print(
            f"SSD on {p['victim']} ({p['encoder']}) vs {p['generator']} ({p['norm']} eps {p['eps']:g}, "
            f"{p['gradient_source']}): detection rate {100 * p['detection_rate_mean']:.2f}% "
            f"+- {100 * p['detection_rate_std']:.2f}, FPR {100 * p['fpr_mean']:.2f}% +- {100 * p['fpr_std']:.2f} "
            f"(target {100 * p['target_fpr']:.0f}%, {p['images']} images x {p['trials']} trials)"
        )
    elif args.command == "pca":
        result = run_pca(config)
        p = result.payload
        print(
            f"PCA clean vs adversarial ({p['generator']}, {p['norm']} eps {p['eps']:g}): explained variance "
            f"{[round(v, 4) for v in p['explained_variance']]}, overlap ({p['overlap_method']}) {p['overlap']:.3f}"
        )
    else:
        result = run_retraining(config, victim=victim)
        print(retraining_text(result.payload))
        print(f"fresh attack: {json.dumps(result.payload['fresh_attack'])}")
    if not args.no_mlflow:
        run_id = log_result(result)
        print(f"MLflow run {run_id} (experiment analyses)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
