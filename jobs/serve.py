"""Serve victims on Ray Serve with budgeted API keys; prints their URLs and the new keys.

    python jobs/serve.py --victim victim-cc-fashion_mnist --key attacker:100000
    python jobs/serve.py --victim cc-fm=models:/victim-cc-fashion_mnist/1 \\
        --victim scan-fm=runs/checkpoints/scan.pt --mode labels --replicas 2 \\
        --key team-a:60000:2000 --port 8000
    RAY_ADDRESS=auto python jobs/serve.py --victim cc/fashion_mnist --num-gpus 0.5 --key a:1000

    python jobs/serve.py --victim digits-gmm=py:examples.sklearn_digits:build --dataset digits \
        --key red-team:20000:50

A victim is ``[APP=]SPEC`` where SPEC is any victim specification (docs/own-model.md): a
checkpoint path, ``models:/<name>/<version>``, a registered name, ``model/dataset``,
``py:MODULE:FACTORY``, ``FILE.py:FACTORY``, ``onnx:PATH``, ``torchscript:PATH``, an MLflow
pyfunc model or ``adapter:FILE.yaml`` (someone else's service, proxied behind our keys).
APP (the route prefix) defaults to SPEC made URL-safe. A decision-only model (cluster ids
only) needs ``--mode labels``. Every spec other than a zoo name or file is resolved and
checked here first (a clear error before Ray starts), then again in each replica. A key is
``NAME:BUDGET[:RATE_PER_S[:BURST]]``. Budgets live in the ledger's sqlite file
(``--ledger-path``), so restarting this job keeps every key and what it has spent.

On a local Ray instance the job keeps serving until Ctrl-C; with ``--address`` (or
``RAY_ADDRESS``) the applications stay on the cluster after the job exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path

from clusterattack.serving.config import MODES, AutoscalingSpec, ServeConfig
from clusterattack.serving.deployment import KeySpec, launch_victims
from clusterattack.serving.detection import POLICIES, DetectionConfig
from clusterattack.serving.ledger_actor import LedgerConfig
from clusterattack.serving.ledger_records import default_ledger_path
from clusterattack.victims.sources import VictimFactory, VictimSpecError, parse_victim_spec


def parse_victim(text: str) -> tuple[str, str]:
    app, sep, source = text.partition("=")
    if sep and (":" in app or "?" in app or "/" in app):
        # The "=" belongs to the spec's options (py:m:f?k=v), not to an APP= prefix.
        app, sep, source = "", "", text
    if not sep:
        source = text
        try:
            spec = parse_victim_spec(text)
        except VictimSpecError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if spec.kind in ("registry", "file", "served"):
            name = Path(text).stem if Path(text).suffix else text
        else:
            name = spec.display_name
        app = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
    if not app or not source:
        raise argparse.ArgumentTypeError(f"victim must be [APP=]SOURCE (SOURCE: a victim spec), got {text!r}")
    try:
        parse_victim_spec(source)
    except VictimSpecError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return app, source


def parse_key(text: str) -> KeySpec:
    parts = text.split(":")
    try:
        if not 2 <= len(parts) <= 4 or not parts[0]:
            raise ValueError
        rate = float(parts[2]) if len(parts) > 2 else None
        burst = float(parts[3]) if len(parts) > 3 else None
        return KeySpec(name=parts[0], budget=int(parts[1]), rate_per_s=rate, burst=burst)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"key must be NAME:BUDGET[:RATE_PER_S[:BURST]] with integer BUDGET, got {text!r}"
        ) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--victim", action="append", type=parse_victim, required=True,
                   help="[APP=]SPEC (any victim specification); repeatable")
    p.add_argument("--dataset", default=None,
                   help="data set whose images the victims take: checks (or fills) their input shape")
    p.add_argument("--api-key", default=None, help="secret of an adapter victim whose auth.env is unset")
    p.add_argument("--mode", choices=MODES, default="scores", help="scores: soft memberships; labels: ids only")
    p.add_argument("--key", action="append", type=parse_key, default=[], help="NAME:BUDGET[:RATE[:BURST]]; repeatable")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--autoscale", metavar="MIN:MAX", default=None, help="autoscale between MIN and MAX replicas")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (fractions share a GPU)")
    p.add_argument("--torch-threads", type=int, default=None, help="intra-op threads per replica")
    p.add_argument("--max-batch-size", type=int, default=256, help="images per model call")
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.0)
    p.add_argument("--max-images-per-request", type=int, default=4096)
    p.add_argument("--max-request-mb", type=float, default=16.0)
    p.add_argument("--max-ongoing-requests", type=int, default=16)
    p.add_argument(
        "--detection", choices=POLICIES, default="off",
        help="stateful detection of query-based attacks per key (Blacklight-style fingerprints, "
        "docs/serving.md): flag (metrics, admin listing, log) or block (403 QueryBlocked, nothing charged)",
    )
    p.add_argument("--host", default="127.0.0.1", help="HTTP host (0.0.0.0 to listen on all interfaces)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--ledger-path", default=default_ledger_path(), help="sqlite file of keys and budgets")
    p.add_argument("--admin-key-env", default="CLUSTERATTACK_ADMIN_KEY",
                   help="environment variable holding an admin key to import (one is generated otherwise)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"), help="Ray cluster address (default local)")
    p.add_argument("--json", action="store_true", help="print the URLs and keys as one JSON object")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> ServeConfig:
    autoscaling = None
    if args.autoscale:
        low, _, high = args.autoscale.partition(":")
        autoscaling = AutoscalingSpec(min_replicas=int(low), max_replicas=int(high))
    return ServeConfig(
        mode=args.mode,
        num_replicas=args.replicas,
        autoscaling=autoscaling,
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        torch_threads=args.torch_threads,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_images_per_request=args.max_images_per_request,
        max_request_bytes=int(args.max_request_mb * 1024 * 1024),
        max_ongoing_requests=args.max_ongoing_requests,
    )


def resolve_sources(
    victims: dict[str, str], *, mode: str, dataset: str | None = None, api_key: str | None = None
) -> dict[str, object]:
    """What each app serves: a zoo name or file as it is (the replica loads it), any other
    spec as a ``VictimFactory`` checked here first (module, file, shape, first answer)."""
    shape = None
    if dataset is not None:
        from clusterattack.data import load_dataset

        shape = load_dataset(dataset).shape
    out: dict[str, object] = {}
    for app, source in victims.items():
        spec = parse_victim_spec(source)
        if spec.kind == "served":
            raise VictimSpecError(
                f"victim {app}={source} is already served; to put someone else's service behind our "
                "keys, describe it with an adapter (adapter:FILE.yaml)"
            )
        if spec.kind in ("registry", "file") and shape is None:
            out[app] = source
            continue
        factory = VictimFactory.for_serving(source, mode=mode, input_shape=shape, api_key=api_key)
        victim = factory()  # resolved and probed here: a bad spec fails before Ray starts
        logging.getLogger("jobs.serve").info(
            "victim %s: %s (%d clusters, input %s)", app, source, victim.num_clusters, victim.input_shape
        )
        out[app] = factory if spec.kind not in ("registry", "file") else source
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    config = build_config(args)
    victims = dict(args.victim)
    if len(victims) != len(args.victim):
        raise SystemExit(f"two victims share an app name: {[app for app, _ in args.victim]}")
    try:
        victims = resolve_sources(victims, mode=config.mode, dataset=args.dataset, api_key=args.api_key)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(address=args.address, configure_logging=False)
    launched = launch_victims(
        victims,
        config=config,
        ledger=LedgerConfig(db_path=str(Path(args.ledger_path).expanduser())),
        host=args.host,
        port=args.port,
        keys=args.key,
        admin_key=os.environ.get(args.admin_key_env) or None,
        detection=DetectionConfig(policy=args.detection) if args.detection != "off" else None,
    )
    if args.json:
        print(json.dumps({"urls": launched.urls, "keys": [k.as_dict() for k in launched.keys]}))
    else:
        for app, url in launched.urls.items():
            print(f"victim {app} ({config.mode}): {url}   OpenAPI: {url}/docs")
        for key in launched.keys:
            print(f"{key.role} key {key.name} ({key.key_id}): {key.api_key}")
        if not launched.keys:
            print("no new keys (the ledger already holds an admin key; add --key NAME:BUDGET)")
    sys.stdout.flush()
    if args.address:
        return 0
    # A local Ray instance dies with this process: keep serving until interrupted.
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
