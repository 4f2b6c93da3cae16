"""The generator against per-image score-based attacks at equal total image-queries (the paper's Appendix E).

A generator pays its training queries Q once, for every image it will ever perturb; a
per-image attack (NES, SPSA, Square: :mod:`clusterattack.attacks.baselines`) pays its budget
again for each image. Over a test split of N images, equal *total* image-queries give a
per-image attack ``Q / N`` queries per image. :func:`run_baselines` attacks a sample of the
split with each baseline at that budget (where one iteration fits in it) and at a ladder of
larger ones, scores generator and baselines on the same images, and reports:

- ``ratio_equal_total``: the generator's relative NMI drop over the best drop of a baseline
  run that spent at most ``Q / N`` per image (None when no baseline fits: then the
  generator wins by default, and ``ratio_note`` names the least budget a baseline needs);
- ``payback_images``: after how many images the generator's one-off Q costs less than the
  per-image attack would, ``ceil(Q / q)``, with q the per-image queries of the cheapest
  baseline run at least as strong as the generator (else of the strongest run, said in
  ``payback_against``); ``payback_images_with_search`` also charges the sweep's search.

The baselines' total over the split is extrapolated from the sample (their cost per image
does not depend on the image); NMI is measured on the sample, for generator and baselines alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from clusterattack.analyses.common import LoadedGenerator
from clusterattack.analyses.defenses import AnalysisResult
from clusterattack.attacks.baselines import BASELINES, make_baseline
from clusterattack.attacks.counting import CountingVictim
from clusterattack.attacks.evaluate import evaluate_attack
from clusterattack.attacks.gan import perturb_images
from clusterattack.attacks.gradients import query_memberships

__all__ = ["BaselinesConfig", "equal_total_budget", "payback_images", "run_baselines", "summarise"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselinesConfig:
    """One victim's comparison: its generator, the split the totals are over, the baselines and budgets.

    ``split_images`` is N, the images of the whole test split; ``budgets`` are per-image
    image-queries tried besides the equal-total one; ``search_image_queries`` is what the
    sweep's search spent to choose this generator's configuration (None: not charged).
    """

    dataset: str
    victim: str
    generator: str
    split_images: int
    budgets: tuple[int, ...] = (25, 100, 400)
    baselines: tuple[str, ...] = tuple(BASELINES)
    search_image_queries: int | None = None
    query_batch: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.split_images, int) or self.split_images < 1:
            raise ValueError(f"split_images must be the test split's size (an integer >= 1), got {self.split_images!r}")
        object.__setattr__(self, "budgets", tuple(self.budgets))
        if any(not isinstance(b, int) or b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be per-image image-queries (integers >= 1), got {self.budgets!r}")
        object.__setattr__(self, "baselines", tuple(self.baselines))
        unknown = [b for b in self.baselines if b not in BASELINES]
        if not self.baselines or unknown:
            raise ValueError(f"baselines must name some of {tuple(BASELINES)}, got {self.baselines!r}")
        if self.search_image_queries is not None and self.search_image_queries < 0:
            raise ValueError(f"search_image_queries must be >= 0 or None, got {self.search_image_queries!r}")


def equal_total_budget(generator_queries: int, split_images: int) -> int:
    """Per-image image-queries at which a per-image attack spends, over ``split_images`` images,
    no more than the generator's one-off ``generator_queries`` (rounded down)."""
    if generator_queries < 0 or split_images < 1:
        raise ValueError(f"need generator_queries >= 0 and split_images >= 1, got {generator_queries}, {split_images}")
    return generator_queries // split_images


def payback_images(generator_queries: int, queries_per_image: float) -> int | None:
    """Images after which a generator's one-off queries cost less than attacking each image
    with ``queries_per_image`` (None when the per-image attack costs nothing)."""
    if queries_per_image <= 0:
        return None
    return math.ceil(generator_queries / queries_per_image)


def summarise(
    generator_drop: float,
    generator_queries: int,
    split_images: int,
    runs: Sequence[dict[str, Any]],
    search_image_queries: int | None = None,
    skipped: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The comparison's headline numbers from the baseline ``runs`` (rows with ``method``,
    ``budget``, ``queries_per_image``, ``nmi_drop``); see the module docstring."""
    per_image = generator_queries / split_images
    out: dict[str, Any] = {
        "generator_nmi_drop": generator_drop,
        "generator_image_queries": generator_queries,
        "split_images": split_images,
        "equal_total_queries_per_image": per_image,
    }
    within = [r for r in runs if r["queries_per_image"] <= per_image + 1e-9]
    if within:
        best = max(within, key=lambda r: r["nmi_drop"])
        out["best_baseline_equal_total"] = f"{best['method']}@{best['budget']}"
        out["baseline_nmi_drop_equal_total"] = best["nmi_drop"]
        out["ratio_equal_total"] = generator_drop / best["nmi_drop"] if best["nmi_drop"] > 0 else None
        out["ratio_note"] = (
            f"best baseline spending at most {per_image:.2f} image-queries per image"
            if best["nmi_drop"] > 0
            else f"no baseline lowered NMI at {per_image:.2f} image-queries per image"
        )
    else:
        needs = sorted({(int(s["min_queries"]), s["method"]) for s in skipped if "min_queries" in s})
        least = f"; the least any needs is {needs[0][0]} ({needs[0][1]})" if needs else ""
        out["best_baseline_equal_total"] = None
        out["baseline_nmi_drop_equal_total"] = None
        out["ratio_equal_total"] = None
        out["ratio_note"] = (
            f"no baseline can run one iteration within {per_image:.2f} image-queries per image "
            f"(the generator's {generator_queries:,} over {split_images:,} images){least}: the generator wins by default"
        )
    strong = [r for r in runs if r["nmi_drop"] >= generator_drop]
    if strong:
        against = min(strong, key=lambda r: (r["queries_per_image"], -r["nmi_drop"]))
        out["payback_against"] = (
            f"{against['method']}@{against['budget']}: the cheapest baseline run at least as strong as the generator"
        )
    elif runs:
        against = max(runs, key=lambda r: (r["nmi_drop"], -r["queries_per_image"]))
        out["payback_against"] = (
            f"{against['method']}@{against['budget']}: no baseline run reached the generator's NMI drop; "
            "the strongest one (beyond this many images the generator is both cheaper and stronger)"
        )
    else:
        against = None
        out["payback_against"] = "no baseline ran"
    out["payback_images"] = None if against is None else payback_images(generator_queries, against["queries_per_image"])
    search = int(search_image_queries or 0)
    out["search_image_queries"] = search_image_queries
    out["payback_images_with_search"] = (
        None if against is None else payback_images(generator_queries + search, against["queries_per_image"])
    )
    out["paid_back_within_split"] = out["payback_images"] is not None and out["payback_images"] <= split_images
    return out


def _scored(labels: torch.Tensor, clean_proba: torch.Tensor, scorer: Any, x: torch.Tensor, adv: torch.Tensor, batch: int):
    scores, _ = evaluate_attack(labels, clean_proba, query_memberships(scorer, adv, batch), x, adv, figures=False)
    return scores


def run_baselines(
    config: BaselinesConfig,
    victim: Any,
    generator: LoadedGenerator,
    images: torch.Tensor,
    labels: torch.Tensor,
) -> AnalysisResult:
    """Generator and every baseline on ``images`` (a sample of the test split), at equal total queries.

    ``victim`` is a local model (anything with ``predict_proba``); each baseline attacks
    it through its own ``CountingVictim`` capped at its budget; scoring goes through a
    separate counter and is not charged to anyone.
    """
    if generator.image_queries is None:
        raise ValueError(
            f"generator {generator.reference} carries no image-queries (its training spend): the comparison "
            "at equal total queries needs it"
        )
    q_gen = int(generator.image_queries)
    applied = generator.config.override(device="cpu")
    n = int(images.shape[0])
    scorer = CountingVictim(victim)
    clean_proba = query_memberships(scorer, images, config.query_batch)
    gen_scores = _scored(labels, clean_proba, scorer, images, perturb_images(generator.generator, images, applied), config.query_batch)
    b_eq = equal_total_budget(q_gen, config.split_images)
    rows: list[dict[str, Any]] = [
        {
            "method": "generator", "budget": None, "queries_per_image": q_gen / config.split_images,
            "total_image_queries": q_gen, "nmi_post": gen_scores["nmi_post"], "nmi_drop": gen_scores["nmi_drop"],
            "changed_fraction": gen_scores["changed_fraction"], "linf_max": gen_scores["linf_max"],
        }
    ]  # fmt: skip
    runs, skipped = [], []
    for name in config.baselines:
        for budget in sorted({b_eq, *config.budgets} - {0}):
            try:
                attack = make_baseline(
                    name, norm=applied.norm, eps=float(applied.eps), max_queries=budget, seed=config.seed,
                    query_batch=config.query_batch,
                )  # fmt: skip
            except ValueError as err:
                # A budget below one iteration of this attack: recorded, not run.
                least = BASELINES[name].config_class(norm=applied.norm, eps=float(applied.eps)).min_queries()
                skipped.append({"method": name, "budget": budget, "min_queries": least, "reason": str(err)})
                continue
            attacked = CountingVictim(victim, budget=n * budget)
            result = attack.run(attacked, images)
            scores = _scored(labels, clean_proba, scorer, images, result.adv_images, config.query_batch)
            per_image = result.info["image_queries"] / n
            run = {
                "method": name, "budget": budget, "queries_per_image": per_image,
                "total_image_queries": per_image * config.split_images, "nmi_post": scores["nmi_post"],
                "nmi_drop": scores["nmi_drop"], "changed_fraction": scores["changed_fraction"],
                "linf_max": scores["linf_max"], "equal_total": budget == b_eq,
            }  # fmt: skip
            runs.append(run)
            log.info("%s %s@%d: NMI drop %.3f (generator %.3f)", config.victim, name, budget, scores["nmi_drop"],
                     gen_scores["nmi_drop"])  # fmt: skip
    summary = summarise(
        float(gen_scores["nmi_drop"]), q_gen, config.split_images, runs, config.search_image_queries, skipped
    )
    payload = {
        "dataset": config.dataset,
        "victim": config.victim,
        "generator": generator.reference,
        "gradient_source": generator.config.gradient_source,
        "norm": applied.norm,
        "eps": float(applied.eps),
        "nmi_pre": gen_scores["nmi_pre"],
        "sample_images": n,
        "equal_total_budget": b_eq,
        "budgets": list(config.budgets),
        "seed": config.seed,
        "rows": rows + runs,
        "skipped": skipped,
        **summary,
    }
    from clusterattack.reports.analysis_figures import equal_queries_figure

    fig = equal_queries_figure(
        rows + runs, q_gen, config.split_images,
        f"{config.victim}: {applied.norm} eps {float(applied.eps):g}, {config.split_images:,}-image test split",
    )  # fmt: skip
    metrics = {k: summary[k] for k in ("ratio_equal_total", "payback_images", "generator_nmi_drop") if summary[k] is not None}
    return AnalysisResult(
        "baselines", payload, generator.config.gradient_source, {"equal_queries": fig},
        tables={"baselines": rows + runs}, metrics=metrics,
    )  # fmt: skip
