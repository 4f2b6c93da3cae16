"""One attack end to end: train a generator on the train split, evaluate it on the test split."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from matplotlib.figure import Figure

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.evaluate import evaluate_attack
from clusterattack.attacks.gan import AttackResult, EpochHook, perturb_images, train_generator
from clusterattack.attacks.gradients import query_memberships
from clusterattack.serving.errors import BudgetExceeded
from clusterattack.victims.base import Victim

__all__ = ["AttackReport", "evaluate_generator", "run_attack"]

log = logging.getLogger(__name__)


@dataclass
class AttackReport:
    """A trained generator, how it was trained, and how it did on the test split.

    ``evaluation`` is None when the evaluation could not run (its error is in
    ``evaluation_error``, e.g. the victim's budget was spent by training).
    """

    victim: str
    dataset: str
    result: AttackResult
    evaluation: dict[str, Any] | None = None
    figures: dict[str, Figure] = field(default_factory=dict)
    evaluation_error: str | None = None

    def record(self) -> dict[str, Any]:
        """Everything a results table needs, flat: who, how, how many queries, what it did."""
        out: dict[str, Any] = {"victim": self.victim, "dataset": self.dataset}
        out.update(self.result.summary())
        if self.evaluation is not None:
            out.update(self.evaluation)
        out["evaluation_error"] = self.evaluation_error
        return out

    def table_row(self) -> str:
        """One line: victim, source, eps, NMI before -> after (drop), queries."""
        r = self.record()
        nmi = (
            f"NMI {r['nmi_pre']:.3f} -> {r['nmi_post']:.3f} ({100 * r['nmi_drop']:.1f}% drop)"
            if self.evaluation is not None
            else f"not evaluated: {self.evaluation_error}"
        )
        queries = "?" if r["image_queries"] is None else f"{r['image_queries']:,}"
        return (
            f"{r['victim']} | {r['dataset']} | {r['gradient_source']} | {r['norm']} eps {r['eps']:g} | "
            f"{r['attack_loss']} | {nmi} | {queries} image-queries, {r['calls']} calls "
            f"({r['calls_256']} x 256) | {r['stopped']}"
            + ("" if r.get("selected_epoch") is None else f" | kept epoch {r['selected_epoch']}")
        )


def evaluate_generator(
    victim: Victim,
    generator: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: AttackConfig,
    *,
    class_names: tuple[str, ...] | None = None,
    figures: bool = True,
) -> tuple[dict[str, Any], dict[str, Figure]]:
    """Query the victim on clean and perturbed ``images`` and score the attack."""
    clean_proba = query_memberships(victim, images, config.query_batch)
    adv = perturb_images(generator, images, config)
    adv_proba = query_memberships(victim, adv, config.query_batch)
    return evaluate_attack(labels, clean_proba, adv_proba, images, adv, class_names=class_names, figures=figures)


def run_attack(
    victim: Victim,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    config: AttackConfig,
    *,
    victim_name: str,
    dataset: str,
    eval_victim: Victim | None = None,
    class_names: tuple[str, ...] | None = None,
    progress: bool = True,
    on_epoch_end: EpochHook | None = None,
    resume: Mapping[str, Any] | None = None,
) -> AttackReport:
    """Train a generator against ``victim`` on ``train_images`` and evaluate it on the test split.

    Only ``train_images`` are seen by the attack (no labels). The evaluation queries
    ``eval_victim`` (default: the same victim) after training, so its queries are not
    part of the attack's query count. A budget that runs out during training still
    leaves a generator to evaluate; one that runs out during evaluation leaves the
    report without ``evaluation`` and says why. ``on_epoch_end`` and ``resume`` are
    ``train_generator``'s: a hook after every epoch, and the state such a hook was given
    to continue from.
    """
    result = train_generator(
        victim, train_images, config, progress=progress, on_epoch_end=on_epoch_end, resume=resume
    )
    report = AttackReport(victim_name, dataset, result)
    try:
        report.evaluation, report.figures = evaluate_generator(
            eval_victim or victim, result.generator, test_images, test_labels, config, class_names=class_names
        )
    except BudgetExceeded as err:
        report.evaluation_error = f"budget exhausted during evaluation: {err}"
        log.warning(report.evaluation_error)
    log.info(report.table_row())
    return report
