"""The Tune trial of a sweep: train one generator against a served victim, epoch by epoch, and report.

Each trial reaches its victim only through :class:`~clusterattack.serving.ServedVictim`
with an API key of its own, granted through the ledger with the sweep's per-trial budget;
the key is derived from the sweep's secret and the trial id, so a retried or resumed trial
finds the same key and keeps spending the same budget. After every generator epoch the
trial scores the generator on a fixed test subset (through a separate evaluator key: scoring
is the experimenter's spend, not the attacker's) and reports the metrics with a checkpoint
from which a failed trial restarts at the next epoch.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.evaluate import evaluate_attack
from clusterattack.attacks.gan import AttackResult, perturb_images, train_generator
from clusterattack.attacks.gradients import query_memberships, without_queried_points
from clusterattack.attacks.io import save_generator

__all__ = [
    "EVALUATION_METRICS",
    "GENERATOR_FILE",
    "STATE_FILE",
    "TrialContext",
    "attack_trainable",
    "derive_api_key",
    "ensure_key",
]

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
GENERATOR_FILE = "generator.pt"
#: Scores reported after every epoch (besides ``epoch``, query counts and ``train.*``).
EVALUATION_METRICS = (
    "nmi_pre", "ari_pre", "acc_pre",
    "nmi_post", "ari_post", "acc_post",
    "nmi_drop", "ari_drop", "acc_drop",
    "changed_fraction", "linf_mean", "linf_max", "l2_mean", "l2_max",
    "largest_cluster_fraction_post", "clusters_used_post",
)  # fmt: skip


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one target shares (sent once through ``tune.with_parameters``).

    Images are uint8 N x C x H x W (the train pool the attack may query, and the fixed
    test subset it is scored on); ``attack`` is the base AttackConfig as a dict;
    ``ledger`` the serving ``LedgerConfig``; ``key_secret`` derives per-trial keys.
    """

    model: str
    dataset: str
    app_name: str
    ledger: Any
    key_secret: str
    evaluator_key: str
    budget: int
    attack: dict[str, Any]
    train_images: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    torch_threads: int = 1

    @property
    def victim(self) -> str:
        return f"victim-{self.model}-{self.dataset}"


def derive_api_key(secret: str, name: str) -> str:
    """The API key of ``name`` (a trial id, "evaluator") in the sweep keyed by ``secret``."""
    if not secret or not name:
        raise ValueError(f"need a sweep secret and a key name, got {len(secret or '')} characters and {name!r}")
    return "ca_" + hmac.new(secret.encode(), name.encode(), hashlib.sha256).hexdigest()[:40]


def ensure_key(admin: Any, name: str, api_key: str, budget: int) -> None:
    """Create the key with ``budget`` image-queries, or keep the existing one as it is.

    A retried or resumed trial must not get a fresh budget: the ledger's ``used`` of its
    key is the query count of the whole trial, failures included.
    """
    from clusterattack.serving.errors import RequestConflict

    try:
        admin.create_key(name[:64], budget=budget, api_key=api_key)
    except RequestConflict:
        log.info("key %s exists: continuing with its remaining budget", name)


def _scores(
    scorer: Any,
    generator: torch.nn.Module,
    config: AttackConfig,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    clean: torch.Tensor,
) -> dict[str, float]:
    adv = perturb_images(generator, test_x, config)
    adv_proba = query_memberships(scorer, adv, config.query_batch)
    scores, _ = evaluate_attack(test_y, clean, adv_proba, test_x, adv, figures=False)
    return {key: float(scores[key]) for key in EVALUATION_METRICS}


def _train_stats(history: list[dict[str, float]]) -> dict[str, float]:
    if not history:
        return {}
    skip = ("epoch", "image_queries", "calls")
    return {f"train.{k}": float(v) for k, v in history[-1].items() if k not in skip and math.isfinite(float(v))}


def attack_trainable(config: dict[str, Any], context: TrialContext) -> None:
    """Function trainable: ``config`` holds the sampled AttackConfig fields (alpha_a, ...)."""
    from ray import tune

    from clusterattack.serving import LedgerAdmin, ServedVictim

    torch.set_num_threads(max(1, int(context.torch_threads)))
    attack = AttackConfig.from_dict(context.attack).override(**config)
    trial_id = tune.get_context().get_trial_id() or "local"

    resume: dict[str, Any] | None = None
    restarts = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            path = Path(folder) / STATE_FILE
            if not path.exists():
                # Only the final report of a trial whose budget ran out carries no state.
                log.info("trial %s already spent its budget: nothing to resume", trial_id)
                return
            resume = torch.load(path, map_location="cpu", weights_only=True)
        restarts = int(resume.pop("restarts", 0)) + 1
        log.info("trial %s restarts at epoch %d (restart %d)", trial_id, int(resume["epoch"]) + 1, restarts)

    api_key = derive_api_key(context.key_secret, trial_id)
    ensure_key(LedgerAdmin(context.ledger), f"trial-{trial_id}", api_key, context.budget)
    victim = ServedVictim(context.app_name, api_key, device="cpu")
    scorer = ServedVictim(context.app_name, context.evaluator_key, device="cpu")

    # torch.tensor copies: arrays from the object store are read-only.
    train_x = torch.tensor(context.train_images, dtype=torch.float32).div_(255.0)
    test_x = torch.tensor(context.test_images, dtype=torch.float32).div_(255.0)
    test_y = torch.tensor(context.test_labels, dtype=torch.int64)
    clean_test = query_memberships(scorer, test_x, attack.query_batch)

    extra = {"victim": context.victim, "model": context.model, "dataset": context.dataset, "trial_id": trial_id}

    def report(result: AttackResult, epoch: int, state: dict[str, Any] | None, budget_exhausted: bool) -> None:
        scores = _scores(scorer, result.generator, attack, test_x, test_y, clean_test)
        ledger = victim.budget()
        calls = state["counts"][1] if state is not None else result.calls
        metrics: dict[str, Any] = {
            "epoch": epoch,
            **scores,
            # The ledger's count: every image the trial's key was charged, retries included.
            "image_queries": int(ledger["used"]),
            "budget_remaining": int(ledger["remaining"]),
            "calls": int(calls or 0),
            "restarts": restarts,
            "budget_exhausted": int(budget_exhausted),
            **_train_stats(result.history),
        }
        with tempfile.TemporaryDirectory(prefix="ca-trial-") as folder:
            if state is not None:
                # The surrogate's weights travel; the points it queried (up to every refresh
                # round's adversarial images) would make each epoch's checkpoint that large.
                source = without_queried_points(state.get("source"))
                torch.save({**state, "source": source, "restarts": restarts}, os.path.join(folder, STATE_FILE))
            save_generator(
                result.generator, attack, Path(folder) / GENERATOR_FILE,
                extra={**extra, "epoch": epoch, "evaluation": scores},
            )
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    def on_epoch_end(result: AttackResult, state: dict[str, Any]) -> bool:
        report(result, int(state["epoch"]), state, budget_exhausted=False)
        return False

    try:
        result = train_generator(victim, train_x, attack, progress=False, on_epoch_end=on_epoch_end, resume=resume)
        if result.stopped == "budget_exhausted":
            # The budget ran out inside an epoch: that partial epoch is scored as the last
            # one (no state to resume from: there is nothing left to spend).
            report(result, result.epochs_run + 1, None, budget_exhausted=True)
    finally:
        victim.close()
        scorer.close()
