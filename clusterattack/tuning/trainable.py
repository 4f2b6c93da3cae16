"""The Tune trial of a sweep: train one generator against a served victim, epoch by epoch, and report.

Each trial reaches its victim only through :class:`~clusterattack.serving.ServedVictim`
with an API key of its own, granted through the ledger with the sweep's per-trial budget;
the key is derived from the sweep's secret and the trial id, so a retried or resumed trial
finds the same key and keeps spending the same budget. After every generator epoch the
trial reports its ``objective`` with a checkpoint from which a failed trial restarts at the
next epoch.

Two phases run this trainable. A *search* trial (one sampled configuration at one eps)
reports the attacker's own score: with the label-free objective, the NMI between the
victim's clean and perturbed assignments of the images the attacker holds out of its pool,
asked on the trial's key; it never receives a label. With the oracle objective (the
paper's protocol, for comparison) it scores the fixed test subset with its labels after
every epoch. A *final* run (the best configuration of an eps, trained again with a fresh
seed) trains the same way and, once its generator is chosen, is scored on the test split
through a separate evaluator key: scoring is the experimenter's spend, counted apart.
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
from clusterattack.attacks.gradients.pretext import CACHE_ENV
from clusterattack.attacks.io import save_generator

__all__ = [
    "EVALUATION_METRICS",
    "FINAL_KEY",
    "GENERATOR_FILE",
    "PHASES",
    "STATE_FILE",
    "TrialContext",
    "attack_trainable",
    "derive_api_key",
    "ensure_key",
    "trial_key_name",
    "trial_params",
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
PHASES = ("search", "final")
#: A final run's config holds its whole configuration under this key (a Tune grid over dicts).
FINAL_KEY = "final"


def trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The AttackConfig fields a trial runs with: its sampled ones, or a final run's dict."""
    if FINAL_KEY in config:
        return dict(config[FINAL_KEY])
    return dict(config)


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one Tune experiment shares (sent once through ``tune.with_parameters``).

    Images are uint8 N x C x H x W: the train pool the attack may query and, for runs that
    score (final runs, or search trials under the oracle objective), the fixed test subset
    and its labels; a label-free search trial gets neither (``test_images`` is None), so no
    label can reach its choices. ``attack`` is the base AttackConfig as a dict; ``ledger``
    the serving ``LedgerConfig``; ``key_secret`` derives per-trial keys.
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
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    torch_threads: int = 1
    phase: str = "search"
    objective: str = "label_free"
    #: The attacker's backbone cache (``CLUSTERATTACK_CACHE_DIR``) as an absolute folder, resolved
    #: where the driver runs; "": no cache; None: the trial process's own setting. Tune runs each
    #: trial in a working folder of its own, where the default relative ``runs/cache`` gave every
    #: trial a cache of its own and every trial trained its attacker pretexts again.
    attacker_cache: str | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        scores = self.phase == "final" or self.objective == "oracle"
        if scores and (self.test_images is None or self.test_labels is None):
            raise ValueError(f"a {self.phase} run under the {self.objective} objective needs the test images and labels")
        if not scores and (self.test_images is not None or self.test_labels is not None):
            raise ValueError("a label-free search trial must not receive the test split or its labels")

    @property
    def victim(self) -> str:
        return f"victim-{self.model}-{self.dataset}"

    @property
    def scores_every_epoch(self) -> bool:
        """Oracle runs choose on test scores, so they score after every epoch."""
        return self.objective == "oracle"


def derive_api_key(secret: str, name: str) -> str:
    """The API key of ``name`` (a trial id, "evaluator") in the sweep keyed by ``secret``."""
    if not secret or not name:
        raise ValueError(f"need a sweep secret and a key name, got {len(secret or '')} characters and {name!r}")
    return "ca_" + hmac.new(secret.encode(), name.encode(), hashlib.sha256).hexdigest()[:40]


def trial_key_name(trial_id: str) -> str:
    """The ledger's name of a trial's key (what query detection and the ledger list it by)."""
    return f"trial-{trial_id}"[:64]


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
    """Function trainable: ``config`` holds the sampled AttackConfig fields (alpha_a, eps, ...),
    or a final run's under :data:`FINAL_KEY` (its seed among them)."""
    from ray import tune

    from clusterattack.serving import LedgerAdmin, ServedVictim

    torch.set_num_threads(max(1, int(context.torch_threads)))
    if context.attacker_cache is not None:
        os.environ[CACHE_ENV] = context.attacker_cache
    attack = AttackConfig.from_dict(context.attack).override(**trial_params(config))
    trial_id = tune.get_context().get_trial_id() or "local"

    resume: dict[str, Any] | None = None
    restarts = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            path = Path(folder) / STATE_FILE
            if not path.exists():
                # Only a trial's last report (budget spent, or a final run scored) has no state.
                log.info("trial %s has already reported its last result: nothing to resume", trial_id)
                return
            resume = torch.load(path, map_location="cpu", weights_only=True)
        restarts = int(resume.pop("restarts", 0)) + 1
        log.info("trial %s restarts at epoch %d (restart %d)", trial_id, int(resume["epoch"]) + 1, restarts)

    api_key = derive_api_key(context.key_secret, trial_id)
    ensure_key(LedgerAdmin(context.ledger), trial_key_name(trial_id), api_key, context.budget)
    victim = ServedVictim(context.app_name, api_key, device="cpu")
    scorer = None
    test_x = test_y = clean_test = None
    if context.test_images is not None and context.test_labels is not None:
        # Only runs that score hold the test split; a label-free search trial has no scorer at all.
        scorer = ServedVictim(context.app_name, context.evaluator_key, device="cpu")
        test_x = torch.tensor(context.test_images, dtype=torch.float32).div_(255.0)
        test_y = torch.tensor(context.test_labels, dtype=torch.int64)

    # torch.tensor copies: arrays from the object store are read-only.
    train_x = torch.tensor(context.train_images, dtype=torch.float32).div_(255.0)
    extra = {
        "victim": context.victim, "model": context.model, "dataset": context.dataset, "trial_id": trial_id,
        "phase": context.phase, "objective": context.objective,
    }  # fmt: skip

    def score(generator: torch.nn.Module) -> dict[str, float]:
        nonlocal clean_test
        if scorer is None or test_x is None or test_y is None:
            raise RuntimeError(f"a label-free {context.phase} trial does not score: it holds no test split")
        before = scorer.image_queries
        if clean_test is None:
            clean_test = query_memberships(scorer, test_x, attack.query_batch)
        scores = _scores(scorer, generator, attack, test_x, test_y, clean_test)
        scores["scoring_image_queries"] = float(scorer.image_queries - before)
        return scores

    # Oracle runs keep the epoch with the lowest test NMI (the paper's protocol); label-free
    # runs keep the one train_generator chose on the hold-out.
    oracle_best: dict[str, Any] = {}

    def report(result: AttackResult, epoch: int, state: dict[str, Any] | None, *, last: bool) -> None:
        history_row = result.history[-1] if result.history else {}
        ledger = victim.budget()
        calls = state["counts"][1] if state is not None else result.calls
        metrics: dict[str, Any] = {
            "epoch": epoch,
            # The ledger's count: every image the trial's key was charged, retries included.
            "image_queries": int(ledger["used"]),
            "budget_remaining": int(ledger["remaining"]),
            "calls": int(calls or 0),
            "restarts": restarts,
            "budget_exhausted": int(result.stopped == "budget_exhausted"),
            **_train_stats(result.history),
        }
        if "select_score" in history_row:
            metrics["select_score"] = float(history_row["select_score"])
            metrics["selection_image_queries"] = int(history_row.get("select_image_queries", 0))
        scores: dict[str, float] = {}
        if context.scores_every_epoch and not last:
            scores = score(result.generator)
            if not oracle_best or scores["nmi_post"] < oracle_best["nmi_post"]:
                oracle_best.update(nmi_post=scores["nmi_post"], epoch=epoch, generator=_copy(result.generator))
        if last:
            if oracle_best:
                result.generator.load_state_dict(oracle_best["generator"])
                metrics["selected_epoch"] = int(oracle_best["epoch"])
            elif result.selected_epoch is not None:
                metrics["selected_epoch"] = int(result.selected_epoch)
            if result.selection_image_queries is not None:
                metrics["selection_image_queries"] = int(result.selection_image_queries)
            if result.mi_temperature is not None:
                metrics["mi_temperature_used"] = float(result.mi_temperature)
            scores = score(result.generator)
            metrics["final"] = 1
        metrics.update(scores)
        objective = scores.get("nmi_post") if context.objective == "oracle" else metrics.get("select_score")
        if objective is not None:
            metrics["objective"] = float(objective)
        with tempfile.TemporaryDirectory(prefix="ca-trial-") as folder:
            if state is not None:
                # The surrogate's weights travel; the points it queried (up to every refresh
                # round's adversarial images) would make each epoch's checkpoint that large.
                source = without_queried_points(state.get("source"))
                saved = {**state, "source": source, "restarts": restarts}
                if oracle_best:
                    saved["oracle_best"] = oracle_best
                torch.save(saved, os.path.join(folder, STATE_FILE))
            save_generator(
                result.generator, attack, Path(folder) / GENERATOR_FILE,
                extra={**extra, "epoch": epoch, "evaluation": scores},
            )
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    if resume is not None and resume.get("oracle_best"):
        oracle_best.update(resume.pop("oracle_best"))

    def on_epoch_end(result: AttackResult, state: dict[str, Any]) -> bool:
        report(result, int(state["epoch"]), state, last=False)
        return False

    try:
        result = train_generator(victim, train_x, attack, progress=False, on_epoch_end=on_epoch_end, resume=resume)
        if context.phase == "final":
            # Scored once its generator is chosen: the label-free choice (or the oracle's). A
            # budget that ran out inside an epoch counts that partial epoch.
            partial = int(result.stopped == "budget_exhausted")
            report(result, result.epochs_run + partial, None, last=True)
        elif result.stopped == "budget_exhausted":
            # The budget ran out inside an epoch: that partial epoch is reported as the last
            # one (no state to resume from: there is nothing left to spend).
            report(result, result.epochs_run + 1, None, last=False)
    finally:
        victim.close()
        if scorer is not None:
            scorer.close()


def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}
