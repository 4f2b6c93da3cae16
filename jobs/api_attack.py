"""Attack the decision-only album API as the paper attacked Face++: own surrogate, generator, albums.

The attacker trains its own CC model on the training split and the generator against it,
without any query; only then does it upload, per draw, an album of clean test images and
an album of their perturbed versions, and scores the service's groups (NMI/ARI/ACC,
mean ± std over the draws, with the group-size breakdown).

Examples:
    # a local service backed by a registered victim the attacker is not told about
    python jobs/api_attack.py --dataset fashion_mnist --service-model victim-scan-fashion_mnist \\
        --surrogate-epochs 3 --eps 0.1 --draws 10 --per-class 10 --seed 0
    # a service already running elsewhere (jobs started with the album app)
    python jobs/api_attack.py --dataset fashion_mnist --url http://host:8000/albums --api-key KEY
    # any image folder (e.g. Extended Yale B, 38 people, resized to 32 x 32)
    python jobs/api_attack.py --dataset folder:/data/CroppedYale --dataset-option size=32 \
        --service-model runs/checkpoints/scan-yale/victim.pt
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from clusterattack.api.attack import ApiAttackConfig, attack_service, train_offline
from clusterattack.api.grouping import GROUPING_METHODS, GroupingSpec
from clusterattack.attacks.config import ATTACK_LOSSES, NORMS, AttackConfig
from clusterattack.cli import key_value

log = logging.getLogger("jobs.api_attack")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist", help="registered data set or folder:PATH")
    p.add_argument("--dataset-option", dest="dataset_options", type=key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="reader option, repeatable: --dataset-option size=32 "
                   "--dataset-option 'exclude=[\"*Ambient*\"]' (image folders)")
    service = p.add_argument_group("the service (hidden from the attack, recorded for the experimenter)")
    service.add_argument(
        "--service-model",
        default=None,
        help="model behind a local service: registered name, models:/ URI or victim file "
        "(default victim-scan-<dataset>); with --url, only recorded",
    )
    service.add_argument("--grouping", choices=GROUPING_METHODS, default="labels",
                         help="labels: the model's cluster ids; kmeans/agglomerative: its features, clustered")
    service.add_argument("--num-groups", type=int, default=None, help="kmeans/agglomerative: fixed group count")
    service.add_argument("--url", default=None, help="album service already running (http://host:port/<app>)")
    service.add_argument("--api-key", default=None, help="attacker key of the --url service")
    service.add_argument("--budget", type=int, default=None,
                         help="image-queries of the local key (default: exactly what the draws need)")
    service.add_argument("--port", type=int, default=None, help="local service port (default: a free one)")
    attacker = p.add_argument_group("the attacker")
    attacker.add_argument("--surrogate-epochs", type=int, default=None, help="CC epochs (default: the demo preset's)")
    attacker.add_argument("--surrogate-train-limit", type=int, default=None, help="train the surrogate on N images")
    attacker.add_argument("--surrogate-width", type=int, default=None, help="backbone width of the surrogate")
    attacker.add_argument("--surrogate-path", default=None, help="reuse a surrogate saved by --save-surrogate")
    attacker.add_argument("--save-surrogate", default=None, help="write the trained surrogate to this file")
    attacker.add_argument("--norm", choices=NORMS, default="linf")
    attacker.add_argument("--eps", type=float, default=0.1)
    attacker.add_argument("--attack-loss", choices=ATTACK_LOSSES, default="mutual_info")
    attacker.add_argument("--alpha-a", type=float, default=None, help="weight of the attack term (alpha_a)")
    attacker.add_argument("--attack-epochs", type=int, default=5, help="generator epochs")
    attacker.add_argument("--attack-train-limit", type=int, default=None, help="training images the generator sees")
    attacker.add_argument("--set", dest="overrides", type=key_value, action="append", default=[],
                          metavar="KEY=VALUE", help="any AttackConfig field, repeatable")
    attacker.add_argument("--no-quantize", action="store_true", help="upload float pixels, not 8-bit ones")
    p.add_argument("--draws", type=int, default=10)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="folder for record.json and table.md")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    p.add_argument("--experiment", default="api_attack", help="MLflow experiment name")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> ApiAttackConfig:
    """The ApiAttackConfig the flags describe (validated)."""
    changes: dict[str, Any] = {
        "gradient_source": "whitebox",
        "norm": args.norm,
        "eps": args.eps,
        "attack_loss": args.attack_loss,
        "epochs": args.attack_epochs,
        "seed": args.seed,
        "device": args.device,
    }
    if args.alpha_a is not None:
        changes["alpha_a"] = args.alpha_a
    if args.attack_train_limit is not None:
        changes["train_limit"] = args.attack_train_limit
    changes.update(dict(args.overrides))
    if "lr_milestones" in changes:
        changes["lr_milestones"] = tuple(changes["lr_milestones"])
    options = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in args.dataset_options)
    return ApiAttackConfig(
        dataset=args.dataset,
        dataset_options=options,
        attack=AttackConfig().override(**changes),
        draws=args.draws,
        per_class=args.per_class,
        seed=args.seed,
        quantize=not args.no_quantize,
        surrogate_epochs=args.surrogate_epochs,
        surrogate_train_limit=args.surrogate_train_limit,
        surrogate_width=args.surrogate_width,
        device=args.device,
        num_threads=args.threads,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = build_config(args)
        grouping = GroupingSpec(method=args.grouping, num_groups=args.num_groups, seed=args.seed)
        if args.url and not args.api_key:
            raise ValueError(f"--api-key is required with --url {args.url}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from clusterattack.data import DatasetError, load_dataset
    from clusterattack.victims.io import load_victim, save_victim

    try:
        dataset = load_dataset(args.dataset, **dict(config.dataset_options))
    except (ValueError, DatasetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    service_model = args.service_model or (None if args.url else f"victim-scan-{dataset.name}")
    service = {"model": service_model or "unknown", "grouping": grouping.describe(), "url": args.url or "local"}
    if not args.url:
        # Resolved now, so a missing or unfit model fails before the long training, not after.
        hidden = load_victim(service_model)
        try:
            grouping.check_model(hidden)
        except TypeError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        service["architecture"] = getattr(hidden, "name", "") or type(hidden).__name__
        if service["architecture"] == config.surrogate_model:
            log.warning("the service's model is a %s too: the result is not a transfer across models", hidden.name)
        del hidden

    surrogate = load_victim(args.surrogate_path) if args.surrogate_path else None
    offline = train_offline(
        config, dataset, surrogate=surrogate, surrogate_source=args.surrogate_path or "given", progress=not args.quiet
    )
    if args.save_surrogate:
        save_victim(offline.surrogate, args.save_surrogate)

    from clusterattack.api.client import AlbumClient

    if args.url:
        with AlbumClient(args.url, args.api_key) as client:
            result = attack_service(config, offline, client, dataset, service=service)
    else:
        from clusterattack.api.config import AlbumServiceConfig
        from clusterattack.api.launch import local_album_service
        from clusterattack.serving.config import ServeConfig

        budget = args.budget or 2 * config.draws * config.per_class * dataset.num_classes
        service_config = AlbumServiceConfig(
            serve=ServeConfig(mode="labels", num_cpus=0.5, torch_threads=1, max_images_per_request=1000),
            grouping=grouping,
        )
        with (
            local_album_service(service_model, budget=budget, config=service_config, port=args.port) as (url, key),
            AlbumClient(url, key) as client,
        ):
            service["url"] = url
            result = attack_service(config, offline, client, dataset, service=service)
            result.service["budget_left"] = client.budget()["remaining"]
    table = result.table()
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "record.json").write_text(json.dumps(result.record(), indent=2, default=str))
        (out / "table.md").write_text(table + "\n")
    if not args.no_mlflow:
        from clusterattack.tracking.api_attack import log_api_attack

        log.info("MLflow run %s", log_api_attack(result, experiment=args.experiment))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
