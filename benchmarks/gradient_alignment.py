"""How well surrogates' input gradients align with the victim's, in one run: a white-box diagnostic.

The black-box gradient sources follow a surrogate's gradient of the attack term
(``surrogate``) or measure the victim's slope along it (``estimate`` with
``estimator.prior=surrogate``), so the cosine between that gradient and the victim's
true one bounds what they can do. This benchmark distils each surrogate variant as an
attack would (same pool, same seeds, so attacker backbones come from the same cache),
then measures the cosine at adversarial points: the perturbations a trained generator
(``--generator``) makes of test images, or, without one, test images plus uniform noise
in the eps-ball. The victim's gradient is autograd through the local victim, so this
needs the victim's weights: a diagnostic of gradient sources, never an attack.

    python benchmarks/gradient_alignment.py --victim victim-nnm-fashion_mnist \\
        --generator runs/nnm/generator.pt
    python benchmarks/gradient_alignment.py --victim victim-cc-fashion_mnist --train-limit 5000 \\
        --variant small=surrogate.arch=small

Each ``--variant NAME=KEY=VALUE[,KEY=VALUE...]`` is a set of attack-config overrides; the
first is the reference of the ratio column (default: the pretext surrogate, against an
ensemble of two on distinct backbones). The figures (JSON) and a histogram of the cosines go
to ``--out``; the run is logged to MLflow (experiment of the benchmarks) unless ``--no-mlflow``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from clusterattack.cli import key_value

DEFAULT_VARIANTS = (
    "pretext=surrogate.arch=pretext",
    "pretext-ens2=surrogate.arch=pretext,surrogate.ensemble=2",
)


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME=KEY=VALUE[,KEY=VALUE...]`` -> (name, overrides)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=KEY=VALUE[,KEY=VALUE...], got {text!r}")
    return name, dict(key_value(part) for part in rest.split(","))


def measure(victim, pool: torch.Tensor, pool_clean: torch.Tensor, clean: torch.Tensor,
            points: torch.Tensor, configs: dict) -> list[dict]:
    """One row per named config: its surrogate distilled on ``pool`` and aligned at ``points``.

    ``ratio`` is each mean cosine over the first config's (the reference); ``cosines``
    holds the per-point values.
    """
    from clusterattack.attacks import CountingVictim, make_gradient_source
    from clusterattack.attacks.alignment import gradient_alignment

    rows = []
    for name, config in configs.items():
        started = time.perf_counter()
        source = make_gradient_source(CountingVictim(victim), config.override(gradient_source="surrogate"))
        source.prepare(pool, pool_clean)
        cos = gradient_alignment(victim, source, clean, points, config, batch_size=config.batch_size)
        rows.append({
            "variant": name, "mean_cos": float(cos.mean()), "median_cos": float(cos.median()),
            "positive": float((cos > 0).float().mean()), "seconds": round(time.perf_counter() - started, 1),
            "cosines": cos.tolist(),
        })
    ref = rows[0]["mean_cos"]
    for row in rows:
        row["ratio"] = row["mean_cos"] / ref if ref else float("nan")
    return rows


def cosine_figure(rows: list[dict], title: str):
    """Histograms of the per-point cosines, one per variant, on one axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.add_subplot()
    for row in rows:
        ax.hist(row["cosines"], bins=40, range=(-0.2, 1.0), alpha=0.55,
                label=f"{row['variant']} (mean {row['mean_cos']:.3f})")
    ax.set_xlabel("cosine with the victim's gradient of the attack term")
    ax.set_ylabel("points")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--victim", required=True, help="registry name, MLflow URI or file of a local victim")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--generator", help="generator.pt whose perturbations are the points (else noise)")
    p.add_argument("--points", type=int, default=1000, help="test images to measure at")
    p.add_argument("--train-limit", type=int, default=None, help="generator images of the attack replayed; its pool is the distillation pool "
                   "(a surrogate attack's pool is at least surrogate.distill_queries)")
    p.add_argument("--eps", type=float, default=0.1, help="L-inf noise radius without --generator")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--variant", type=parse_variant, action="append", dest="variants")
    p.add_argument("--out", help="folder for the JSON figures and the histogram (default runs/benchmarks)",
                   default="runs/benchmarks")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    from clusterattack.attacks import AttackConfig, perturb_images
    from clusterattack.attacks.gan import training_split
    from clusterattack.attacks.gradients import query_memberships
    from clusterattack.attacks.io import load_generator
    from clusterattack.data import load_dataset
    from clusterattack.victims.io import load_victim

    variants = args.variants or [parse_variant(v) for v in DEFAULT_VARIANTS]
    try:
        configs = {name: AttackConfig(seed=args.seed).override(**changes) for name, changes in variants}
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    data = load_dataset(args.dataset)
    train_x, _ = data.subset("train").as_float()
    test_x, _ = data.subset("test", limit=args.points, seed=args.seed).as_float()
    victim = load_victim(args.victim).requires_grad_(False)

    # The pool an attack with this seed and limit distils from (same order, same cache key).
    reference = next(iter(configs.values())).override(train_limit=args.train_limit)
    pool, _, _ = training_split(train_x, reference)
    pool_clean = query_memberships(victim, pool, 512)
    clean = query_memberships(victim, test_x, 512)
    if args.generator:
        gen, gen_config, _ = load_generator(args.generator)
        points, where = perturb_images(gen, test_x, gen_config), f"perturbations by {args.generator}"
    else:
        noise = (torch.rand(test_x.shape, generator=torch.Generator().manual_seed(args.seed + 1)) * 2 - 1) * args.eps
        points, where = (test_x + noise).clamp(0, 1), f"uniform L-inf noise of radius {args.eps:g}"

    rows = measure(victim, pool, pool_clean, clean, points, configs)
    print(f"\nvictim {args.victim}, {args.dataset}: {test_x.shape[0]} test images, {where}; "
          f"surrogates distilled on {pool.shape[0]:,} queried memberships, seed {args.seed}; "
          "cosine with the victim's gradient of the attack term (white-box diagnostic)")
    print(f"{'variant':32s} {'mean cos':>9s} {'median':>7s} {'cos>0':>6s} {'ratio':>6s} {'s':>6s}")
    for row in rows:
        print(f"{row['variant']:32s} {row['mean_cos']:9.3f} {row['median_cos']:7.3f} {row['positive']:6.2f} "
              f"{row['ratio']:6.2f} {row['seconds']:6.0f}")
    print(f"ratio: mean cosine against the reference variant {rows[0]['variant']!r}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"victim": args.victim, "dataset": args.dataset, "points": where, "n_points": test_x.shape[0],
                "pool": pool.shape[0], "seed": args.seed}
    fig = cosine_figure(rows, f"{args.victim}: {where}")
    fig.savefig(out / f"gradient_alignment-{stamp}.png", dpi=110)
    (out / f"gradient_alignment-{stamp}.json").write_text(json.dumps({**settings, "rows": rows}, indent=2))
    print(f"files in {out}/gradient_alignment-{stamp}.*")
    if not args.no_mlflow:
        from clusterattack.tracking.benchmarks import log_benchmark

        summary_rows = [{k: v for k, v in row.items() if k != "cosines"} for row in rows]
        run_id = log_benchmark(
            f"gradient_alignment-{stamp}", settings, summary_rows, figures={"cosines": fig},
            summary={f"ratio.{r['variant']}": r["ratio"] for r in rows},
            row_key=("variant",), row_metrics=("mean_cos", "median_cos", "positive"),
        )
        print(f"MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
