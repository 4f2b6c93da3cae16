"""NMI drop against image-queries: the generator attack beside per-image score-based baselines, in one run.

On the same victims, norm, eps and test images: the generator attack of Chhabra et al.
(NeurIPS 2022) with gradient sources ``surrogate`` and ``estimate`` (black-box) and
``whitebox`` (a labelled reference, autograd through the victim), and the baselines of
the paper's Appendix E adapted to clustering (NES and Square through ART, SPSA through
the project's estimator), each at a few per-image budgets. Image-queries are what the
attack charged to the victim's counter: for a generator its training queries (a new
image then costs 0 queries: they are amortised), for a baseline the queries it spent on
the test images (each new image costs the whole per-image attack again). Scoring
queries are not charged.

The ratio line, per victim: generator-surrogate NMI drop / best baseline NMI drop among
the baseline runs that spent no more image-queries than the generator (the paper says
the generator wins, i.e. ratio > 1).

    python benchmarks/attack_efficiency.py                  # cc, scan, spice; ~15 min on 2 cores
    python benchmarks/attack_efficiency.py --large          # 1,000 test images, 4 budgets, longer training
    python benchmarks/attack_efficiency.py --victims cc --n-test 100 --budgets 25

Table (CSV, markdown), figure (PNG) and JSON go to ``--out``; the run is logged to
MLflow (local store ``sqlite:///mlruns/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

GENERATOR_SOURCES = ("surrogate", "estimate", "whitebox")
BASELINE_NAMES = ("nes", "spsa", "square")


@dataclass(frozen=True)
class Settings:
    """What one benchmark run compares (validated by the configs it builds)."""

    norm: str = "linf"
    eps: float = 0.1
    n_test: int = 200
    budgets: tuple[int, ...] = (25, 100, 400)  # per-image image-queries of the baselines
    train_limit: int = 4_000
    epochs: int = 8
    distill_queries: int = 4_000
    seed: int = 0
    sources: tuple[str, ...] = GENERATOR_SOURCES
    baselines: tuple[str, ...] = BASELINE_NAMES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--victims", default="cc,scan,spice", help="comma-separated models (victim-<model>-<dataset>)")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--norm", choices=("linf", "l2"), default="linf")
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--n-test", type=int, default=None, help="test images attacked and scored (default 200)")
    p.add_argument("--budgets", default=None, help="per-image budgets of the baselines (default 25,100,400)")
    p.add_argument("--train-limit", type=int, default=None, help="train images of the generator (default 4000)")
    p.add_argument("--epochs", type=int, default=None, help="generator epochs (default 8)")
    p.add_argument("--large", action="store_true",
                   help="1,000 test images, budgets 25,100,400,1600, 20,000 train images, 20 epochs (hours on CPU)")
    p.add_argument("--sources", default=",".join(GENERATOR_SOURCES))
    p.add_argument("--baselines", default=",".join(BASELINE_NAMES))
    p.add_argument("--out", default="runs/bench/attack_efficiency")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mlflow", action="store_true")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    large = args.large
    budgets = args.budgets or ("25,100,400,1600" if large else "25,100,400")
    return Settings(
        norm=args.norm,
        eps=args.eps,
        n_test=args.n_test or (1_000 if large else 200),
        budgets=tuple(int(b) for b in budgets.split(",")),
        train_limit=args.train_limit or (20_000 if large else 4_000),
        epochs=args.epochs or (20 if large else 8),
        distill_queries=20_000 if large else 4_000,
        seed=args.seed,
        sources=tuple(s for s in args.sources.split(",") if s),
        baselines=tuple(b for b in args.baselines.split(",") if b),
    )


def generator_config(settings: Settings, source: str, **changes: Any):
    """The generator attack as compared here: mutual-information attack term, small enough for a CPU."""
    from clusterattack.attacks import AttackConfig

    return AttackConfig(
        gradient_source=source,
        norm=settings.norm,
        eps=settings.eps,
        attack_loss="mutual_info",
        epochs=settings.epochs,
        train_limit=settings.train_limit,
        batch_size=128,
        seed=settings.seed,
    ).override(
        **{
            "surrogate.distill_queries": settings.distill_queries,
            "surrogate.distill_epochs": 4,
            "surrogate.refresh_rounds": 1,
            "surrogate.refresh_queries": max(1, settings.train_limit // 2),
            **changes,
        }
    )


def _row(victim: str, method: str, kind: str, budget: Any, queries: int | None, n: int,
         per_new_image: float | None, ev: dict[str, Any], seconds: float) -> dict[str, Any]:  # fmt: skip
    return {
        "victim": victim,
        "method": method,
        "kind": kind,
        "budget": budget,
        "image_queries": queries,
        "queries_per_test_image": None if queries is None else queries / n,
        "queries_per_new_image": per_new_image,
        "nmi_pre": ev["nmi_pre"],
        "nmi_post": ev["nmi_post"],
        "nmi_drop": ev["nmi_drop"],
        "ari_post": ev["ari_post"],
        "acc_post": ev["acc_post"],
        "changed_fraction": ev["changed_fraction"],
        "linf_max": ev["linf_max"],
        "l2_mean": ev["l2_mean"],
        "l2_max": ev["l2_max"],
        "seconds": round(seconds, 1),
    }


def compare(
    victims: dict[str, Any],
    train_x: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    settings: Settings,
    *,
    generator_changes: dict[str, Any] | None = None,
    baseline_changes: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (victim, method, budget): image-queries spent and the NMI drop on ``test_x``.

    ``victims`` maps names to local models (anything with ``predict_proba``; the
    ``whitebox`` source also needs autograd through it). Every attack gets a fresh
    ``CountingVictim``; scoring goes through a separate one, so it is not charged.
    """
    from clusterattack.attacks import CountingVictim, evaluate_attack, train_generator
    from clusterattack.attacks.baselines import make_baseline
    from clusterattack.attacks.gan import perturb_images
    from clusterattack.attacks.gradients import query_memberships

    log = logging.getLogger("attack_efficiency")
    rows: list[dict[str, Any]] = []
    n = int(test_x.shape[0])
    for name, model in victims.items():
        scorer = CountingVictim(model)
        clean_proba = query_memberships(scorer, test_x, 256)
        for source in settings.sources:
            cfg = generator_config(settings, source, **(generator_changes or {}))
            started = time.perf_counter()
            attacked = CountingVictim(model)
            result = train_generator(attacked, train_x, cfg, progress=False)
            adv = perturb_images(result.generator, test_x, cfg)
            ev, _ = evaluate_attack(test_y, clean_proba, query_memberships(scorer, adv, 256), test_x, adv, figures=False)
            kind = "reference" if source == "whitebox" else "generator"
            rows.append(_row(name, f"generator-{source}", kind, "-", result.image_queries, n, 0, ev,
                             time.perf_counter() - started))  # fmt: skip
            log.info("%s generator-%s: NMI drop %.3f after %s image-queries", name, source, ev["nmi_drop"],
                     result.image_queries)  # fmt: skip
        for baseline in settings.baselines:
            for budget in settings.budgets:
                started = time.perf_counter()
                changes = {"norm": settings.norm, "eps": settings.eps, "max_queries": budget,
                           "seed": settings.seed, **(baseline_changes or {}).get(baseline, {})}  # fmt: skip
                try:
                    attack = make_baseline(baseline, **changes)
                except ValueError as err:
                    log.warning("skipping %s at %d image-queries per image: %s", baseline, budget, err)
                    continue
                attacked = CountingVictim(model, budget=n * budget)
                res = attack.run(attacked, test_x)
                ev, _ = evaluate_attack(test_y, clean_proba, query_memberships(scorer, res.adv_images, 256),
                                        test_x, res.adv_images, figures=False)  # fmt: skip
                queries = res.info["image_queries"]
                rows.append(_row(name, baseline, "baseline", budget, queries, n, queries / n, ev,
                                 time.perf_counter() - started))  # fmt: skip
                log.info("%s %s @%d/image: NMI drop %.3f", name, baseline, budget, ev["nmi_drop"])
    return rows


def ratios(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per victim: generator-surrogate NMI drop / best baseline drop at no more image-queries.

    The choice at equal total image-queries over the test images and the payback arithmetic are
    :mod:`clusterattack.analyses.baselines`' (``summarise`` with the test images as the split,
    ``payback_images``); when no baseline ran that cheaply the cheapest runs stand in, said in ``note``.
    """
    from clusterattack.analyses.baselines import payback_images, summarise

    out: dict[str, dict[str, Any]] = {}
    for victim in dict.fromkeys(r["victim"] for r in rows):
        mine = [r for r in rows if r["victim"] == victim]
        gen = next((r for r in mine if r["method"] == "generator-surrogate"), None)
        base = [r for r in mine if r["kind"] == "baseline" and r["image_queries"] is not None]
        if gen is None or not base:
            continue
        runs = [{"method": r["method"], "budget": r["budget"], "queries_per_image": r["queries_per_new_image"],
                 "nmi_drop": r["nmi_drop"]} for r in base]  # fmt: skip
        equal = summarise(gen["nmi_drop"], gen["image_queries"], _test_images(mine), runs)
        note = "baselines at <= the generator's image-queries"
        if equal["best_baseline_equal_total"] is not None:
            best = next(r for r in base if f"{r['method']}@{r['budget']}" == equal["best_baseline_equal_total"])
        else:
            # No baseline ran that cheaply: compare with the cheapest runs, and say so.
            cheapest = min(r["image_queries"] for r in base)
            best = max((r for r in base if r["image_queries"] == cheapest), key=lambda r: r["nmi_drop"])
            note = "every baseline spent more image-queries than the generator; cheapest shown"
        ratio = gen["nmi_drop"] / best["nmi_drop"] if best["nmi_drop"] > 0 else math.inf
        # Images after which the generator's one-off training queries cost less than that
        # baseline spends attacking them one by one.
        break_even = payback_images(gen["image_queries"], best["queries_per_new_image"] or 0)
        out[victim] = {"generator_drop": gen["nmi_drop"], "generator_queries": gen["image_queries"],
                       "baseline": f"{best['method']}@{best['budget']}", "baseline_drop": best["nmi_drop"],
                       "baseline_queries": best["image_queries"], "ratio": ratio,
                       "break_even_images": math.inf if break_even is None else break_even,
                       "note": note}  # fmt: skip
    return out


def _test_images(rows: Sequence[dict[str, Any]]) -> int:
    """The test images of one victim's rows: a row's image-queries over its queries per test image."""
    return next((round(r["image_queries"] / r["queries_per_test_image"]) for r in rows if r["image_queries"]), 1)


COLUMNS = ("victim", "method", "budget", "image_queries", "queries_per_new_image", "nmi_pre", "nmi_post",
           "nmi_drop", "changed_fraction", "linf_max", "l2_mean", "seconds")  # fmt: skip


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "?" if value is None else str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def efficiency_figure(rows: Sequence[dict[str, Any]], settings: Settings):
    """NMI drop vs image-queries (log x): one panel per victim, one line per method."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    victims = list(dict.fromkeys(r["victim"] for r in rows))
    fig = Figure(figsize=(4.2 * max(1, len(victims)), 4.0), layout="constrained")
    axes = fig.subplots(1, max(1, len(victims)), squeeze=False)[0]
    styles = {"generator-surrogate": ("C0", "*", 14), "generator-estimate": ("C1", "P", 10),
              "generator-whitebox": ("0.5", "X", 10), "nes": ("C2", "o", 6), "spsa": ("C3", "s", 6),
              "square": ("C4", "^", 6)}  # fmt: skip
    for ax, victim in zip(axes, victims, strict=False):
        mine = [r for r in rows if r["victim"] == victim and r["image_queries"]]
        for method in dict.fromkeys(r["method"] for r in mine):
            pts = sorted((r["image_queries"], r["nmi_drop"]) for r in mine if r["method"] == method)
            color, marker, size = styles.get(method, ("k", ".", 6))
            label = method + (" (reference)" if method == "generator-whitebox" else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, markersize=size, color=color,
                    linestyle="-" if len(pts) > 1 else "none", label=label)  # fmt: skip
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a short log axis overlap
        ax.set_xlabel(f"image-queries ({settings.n_test} test images)")
        ax.set_ylabel("relative NMI drop")
        ax.set_title(f"{victim}: {settings.norm} eps {settings.eps:g}")
        ax.grid(alpha=0.3)
    labels: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labels.setdefault(label, handle)
    fig.legend(list(labels.values()), list(labels), loc="outside lower center", ncols=min(6, len(labels)), fontsize=7)
    return fig


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    settings = settings_from(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from clusterattack.data import load_dataset
    from clusterattack.victims.io import load_victim

    data = load_dataset(args.dataset)
    # The surrogate distils on up to distill_queries train images; the generator sees train_limit of them.
    pool = max(settings.train_limit, settings.distill_queries)
    train_x, _ = data.subset("train", limit=pool, seed=settings.seed).as_float()
    test_x, test_y = data.subset("test", limit=settings.n_test, seed=settings.seed).as_float()
    victims = {}
    for model in args.victims.split(","):
        victim = load_victim(f"victim-{model}-{args.dataset}")
        victim.requires_grad_(False)  # whitebox reference: gradients flow to x, never into the weights
        victims[model] = victim

    started = time.perf_counter()
    rows = compare(victims, train_x, test_x, test_y, settings)
    wall = time.perf_counter() - started
    table = markdown_table(rows)
    summary = ratios(rows)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(out / f"attack_efficiency-{stamp}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig = efficiency_figure(rows, settings)
    fig.savefig(out / f"attack_efficiency-{stamp}.png", dpi=110)
    (out / f"attack_efficiency-{stamp}.json").write_text(
        json.dumps({"settings": vars(settings), "rows": rows, "ratios": summary, "wall_s": wall}, indent=2, default=str)
    )

    print(f"\n{args.dataset}, {settings.norm} eps {settings.eps:g}, {settings.n_test} test images; generator: "
          f"{settings.train_limit} train images x {settings.epochs} epochs, mutual_info; baselines at "
          f"{', '.join(map(str, settings.budgets))} image-queries per image\n")  # fmt: skip
    print(table)
    print("\nratio = generator-surrogate NMI drop / best baseline NMI drop at <= the generator's image-queries")
    for victim, r in summary.items():
        print(f"{victim}: {r['generator_drop']:.3f} ({r['generator_queries']:,} queries, 0 per new image) / "
              f"{r['baseline_drop']:.3f} ({r['baseline']}, {r['baseline_queries']:,} queries) = {r['ratio']:.2f}"
              f"  [{r['note']}]; the generator's queries pay off after {r['break_even_images']:,} images")  # fmt: skip
    print(f"wall {wall:.0f} s; files in {out}/attack_efficiency-{stamp}.*")
    if not args.no_mlflow:
        from clusterattack.tracking.benchmarks import log_benchmark

        run_id = log_benchmark(
            f"attack_efficiency-{stamp}",
            {**vars(settings), "dataset": args.dataset, "victims": args.victims},
            rows,
            figures={"nmi_drop_vs_queries": fig},
            table_markdown=table,
            summary={f"ratio.{v}": r["ratio"] for v, r in summary.items()} | {"wall_s": wall},
        )
        print(f"MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
