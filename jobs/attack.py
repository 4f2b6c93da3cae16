"""Run one generator attack on one victim (local or served) and print its evaluation row.

Examples:
    python jobs/attack.py --victim victim-cc-fashion_mnist --dataset fashion_mnist \
        --gradient-source surrogate --norm linf --eps 0.1 --out runs/cc-surrogate
    python jobs/attack.py --victim http://127.0.0.1:8000/cc --api-key KEY \
        --dataset fashion_mnist --gradient-source estimate --eps 0.1
    python jobs/attack.py --victim py:examples.sklearn_digits:build --dataset digits --eps 0.1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import torch

from clusterattack.attacks import AttackConfig, CountingVictim, run_attack
from clusterattack.attacks.config import (
    ATTACK_LOSSES,
    GAN_LOSSES,
    GRADIENT_SOURCES,
    NORMS,
)
from clusterattack.attacks.io import save_generator
from clusterattack.attacks.recipes import RECIPES, apply_recipe
from clusterattack.cli import key_value
from clusterattack.precision import PRECISIONS
from clusterattack.victims.training import atomic_save

log = logging.getLogger("jobs.attack")

CHECKPOINT = "checkpoint.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--victim",
        required=True,
        help="victim spec (docs/own-model.md): registered name (victim-cc-fashion_mnist or cc/fashion_mnist), "
        "victim file, MLflow model URI, py:MODULE:FACTORY or FILE.py:FACTORY, onnx:PATH, torchscript:PATH, "
        "adapter:FILE.yaml (someone else's HTTP service), or http(s)://host:port/<app> of a served victim "
        "(with --api-key)",
    )
    p.add_argument("--victim-option", dest="victim_options", type=key_value, action="append", default=[],
                   metavar="KEY=VALUE", help="victim spec option, repeatable: --victim-option clusters=10 "
                   "--victim-option output=logits (the same as ?clusters=10&output=logits)")
    p.add_argument("--adapter", default=None,
                   help="adapter file (YAML/JSON) of someone else's service at the --victim URL")
    p.add_argument("--api-key", default=None, help="attacker key of a served victim (or an adapter's secret)")
    p.add_argument("--eval-api-key", default=None, help="separate key for scoring a served victim after training")
    p.add_argument("--dataset", required=True, help="data set the victim was trained on, e.g. fashion_mnist")
    p.add_argument("--gradient-source", choices=GRADIENT_SOURCES, default="surrogate")
    p.add_argument(
        "--recipe", choices=tuple(RECIPES), default="default",
        help="named attack settings (clusterattack.attacks.recipes): "
        + "; ".join(f"{r.name}: {r.summary}" for r in RECIPES.values())
        + "; flags and --set override it",
    )
    p.add_argument("--norm", choices=NORMS, default="linf")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--alpha-a", type=float, default=None, help="weight of the attack term (alpha_a)")
    p.add_argument("--alpha-c", type=float, default=None, help="weight of the norm constraint (alpha_c)")
    p.add_argument("--attack-loss", choices=ATTACK_LOSSES, default=None)
    p.add_argument("--gan-loss", choices=GAN_LOSSES, default=None)
    p.add_argument("--target-cluster", type=int, default=None, help="targeted variant: pull towards this cluster")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-limit", type=int, default=None, help="training images the generator sees")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="bf16: generator/discriminator/surrogate steps under bf16 autocast; queries stay fp32",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        type=key_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any AttackConfig field, repeatable: --set estimator.samples=4 --set surrogate.ensemble=2",
    )
    p.add_argument("--budget", type=int, default=None, help="image-query budget for a local victim")
    p.add_argument("--eval-limit", type=int, default=None, help="test images to evaluate on (default: all)")
    p.add_argument(
        "--out", default=None,
        help="folder for record.json, figures and generator.pt; while training it holds checkpoint.pt, "
        "written after every epoch (removed when the attack ends)",
    )
    p.add_argument(
        "--resume", action="store_true",
        help="continue an interrupted attack from <out>/checkpoint.pt (same flags; its MLflow run goes on)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    p.add_argument("--experiment", default="attacks", help="MLflow experiment name")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> AttackConfig:
    """The AttackConfig the flags describe (validated): the recipe, then the flags, then ``--set``."""
    changes: dict[str, Any] = {
        **apply_recipe(args.recipe),
        "gradient_source": args.gradient_source,
        "norm": args.norm,
        "eps": args.eps,
        "seed": args.seed,
        "device": args.device,
        "precision": args.precision,
    }
    for flag, field in (
        ("alpha_a", "alpha_a"),
        ("alpha_c", "alpha_c"),
        ("attack_loss", "attack_loss"),
        ("gan_loss", "gan_loss"),
        ("target_cluster", "target_cluster"),
        ("epochs", "epochs"),
        ("train_limit", "train_limit"),
    ):
        value = getattr(args, flag)
        if value is not None:
            changes[field] = value
    changes.update(dict(args.overrides))
    if "lr_milestones" in changes:
        changes["lr_milestones"] = tuple(changes["lr_milestones"])
    return AttackConfig().override(**changes)


def open_victims(args: argparse.Namespace, spent: int = 0, dataset=None):
    """(attacked victim, scoring victim or None, display name) for the ``--victim`` spec.

    ``spent``: image-queries a resumed attack already made, taken off ``--budget``
    (a server's ledger remembers them by itself). ``dataset`` checks the input shape.
    See ``clusterattack.victims.sources.open_attack_target``: served victims and foreign
    services count their own queries, a local model is wrapped in CountingVictim (which
    enforces ``--budget``); a decision-only victim takes the label-based surrogate path.
    """
    from clusterattack.victims.sources.target import open_attack_target

    options = dict(args.victim_options)
    if args.adapter:
        options["adapter"] = args.adapter
    target = open_attack_target(
        args.victim, gradient_source=args.gradient_source, dataset=dataset, options=options,
        api_key=args.api_key, eval_api_key=args.eval_api_key, budget=args.budget, spent=spent,
        device=args.device, counter=CountingVictim,
    )
    log.info("victim %s: %s", target.name, target.description)
    return target.victim, target.scorer, target.name


def read_checkpoint(args: argparse.Namespace, config: AttackConfig) -> dict[str, Any] | None:
    """The checkpoint ``--resume`` continues from, checked against the flags (None without it)."""
    if not args.resume:
        return None
    if not args.out:
        raise ValueError("--resume needs --out, the folder whose checkpoint.pt to continue from")
    path = Path(args.out) / CHECKPOINT
    if not path.is_file():
        raise ValueError(f"nothing to resume: no {path} (it is removed once an attack ends)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    saved = {**blob["config"], "victim": blob["victim"], "dataset": blob["dataset"]}
    now = {**config.flat(), "victim": args.victim, "dataset": args.dataset}
    differ = sorted(k for k in saved.keys() | now.keys() if k != "device" and saved.get(k) != now.get(k))
    if differ:
        listed = ", ".join(f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in differ)
        raise ValueError(f"{path} was written by another attack ({listed})")
    log.info("resuming from %s after epoch %d", path, blob["state"]["epoch"])
    return blob


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``ray job stop``, a scheduler's preemption) as an interrupt.

    A KeyboardInterrupt, so the live MLflow run ends KILLED with the epochs so far, and
    the checkpoint of the last finished epoch stays for ``--resume``.
    """


class _Interrupts:
    """SIGTERM raises ``Terminated`` in the main thread, held back while inside ``held()``.

    The MLflow writes and the checkpoint of an epoch run under ``held()``: a signal landing
    in the middle of a write to the tracking store would leave its sqlite transaction open,
    so ending the run KILLED would then wait on that lock and fail ("database is locked",
    seen with the machine under load); a checkpoint would be left half-written. A signal
    that arrives there is raised as soon as the block ends.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def handler(self, signum, frame) -> None:
        if self.depth:
            self.pending = signum
            return
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")

    @contextlib.contextmanager
    def held(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


_INTERRUPTS = _Interrupts()


@contextlib.contextmanager
def _sigterm_interrupts():
    """While inside, SIGTERM raises ``Terminated`` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _INTERRUPTS.handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    try:
        with _sigterm_interrupts():
            return _main(argv)
    except Terminated as stop:
        print(f"{stop}; the run ends KILLED; with --out, --resume goes on from the last finished epoch",
              file=sys.stderr)
        return 128 + signal.SIGTERM


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = build_config(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from clusterattack.data import load_dataset

    data = load_dataset(args.dataset)
    train_x, _ = data.subset("train").as_float()
    test = data.subset("test", limit=args.eval_limit, seed=args.seed)
    test_x, test_y = test.as_float()

    try:
        resume = read_checkpoint(args, config)
        spent = 0 if resume is None else int(resume["state"]["counts"][0] or 0)
        victim, eval_victim, victim_name = open_victims(args, spent, dataset=data)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    checkpoint = Path(args.out) / CHECKPOINT if args.out else None

    live = None
    if not args.no_mlflow:
        from clusterattack.tracking.attacks import LiveAttackRun, attack_data_uses

        live = LiveAttackRun(
            victim_name, args.dataset, config, experiment=args.experiment,
            run_id=None if resume is None else resume.get("mlflow_run_id"),
            data=data, data_uses=attack_data_uses(len(test), args.seed),
        )

    def on_epoch_end(result, state: dict[str, Any]) -> bool:
        with _INTERRUPTS.held():
            _log_and_save(result, state)
        return False

    def _log_and_save(result, state: dict[str, Any]) -> None:
        if live is not None:
            live.log_epoch(result.history[-1])
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            atomic_save(
                {
                    "state": state,
                    "config": config.flat(),
                    "victim": args.victim,
                    "dataset": args.dataset,
                    "mlflow_run_id": None if live is None else live.run_id,
                },
                checkpoint,
            )

    with live or contextlib.nullcontext():
        report = run_attack(
            victim,
            train_x,
            test_x,
            test_y,
            config,
            victim_name=victim_name,
            dataset=args.dataset,
            eval_victim=eval_victim,
            class_names=data.class_names,
            progress=not args.quiet,
            on_epoch_end=on_epoch_end,
            resume=None if resume is None else resume["state"],
        )
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "record.json").write_text(json.dumps(report.record(), indent=2, default=str))
            (out / "history.json").write_text(json.dumps(report.result.history, indent=2))
            for key, fig in report.figures.items():
                fig.savefig(out / f"{key}.png", dpi=110)
            save_generator(report.result.generator, config, out / "generator.pt", extra={"victim": victim_name})
        if live is not None:
            with _INTERRUPTS.held():
                log.info("MLflow run %s", live.finish(report))
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)
    print(report.table_row())
    return 0


if __name__ == "__main__":
    sys.exit(main())
