"""NMI drop against image-queries spent: named attack recipes on the same victims and seeds, in one run.

Each (victim, recipe, seed) trains the generator attack (surrogate mode by default) against
the registered victim, counted by ``CountingVictim`` exactly as a served victim's ledger would
count it; after every generator epoch the generator as it stands is scored on the test split
through the uncounted victim (scoring is the experimenter's, not the attack's spend), which
gives the curve of NMI drop against the image-queries spent so far. The attack's wall time
is split by stage (clean memberships, attacker pretexts, distillation, generator epochs,
refresh rounds); the attacker's pretext backbones are trained before the attack (or found in
the cache: they are paid once per data set, pool and seed) and reported on their own line,
scoring time is left out.

    python benchmarks/attack_budget.py --victims scan,ruc --recipes strong,fast --seeds 0,1
    python benchmarks/attack_budget.py                      # all six victims, strong and fast, seed 0
    python benchmarks/attack_budget.py --victims scan,ruc --seeds 0,1 --resume   # goes on after an interruption

Table (markdown, CSV), figure (PNG), the JSON of every run and a record under
``docs/results/`` (``--record``) go to ``--out``. Hours on 2 CPU cores for the strong recipe
(about 30 min per victim): run it in the background.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

log = logging.getLogger("benchmarks.attack_budget")

#: The goals of the query-efficient recipe (surrogate mode, L-inf eps 0.1, Fashion-MNIST).
GOAL_DROP = 0.80
GOAL_QUERIES = 150_000
GOAL_WALL_S = 600.0
MARKS = (25_000, 50_000, 100_000, 150_000, 300_000, 575_000)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from clusterattack.attacks.recipes import RECIPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--victims", default="cc,scan,nnm,spice,mice,ruc", help="comma-separated zoo models")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--recipes", default="strong,fast", help=f"comma-separated, from {list(RECIPES)}")
    p.add_argument("--seeds", default="0", help="comma-separated attack seeds")
    p.add_argument(
        "--victim-seeds", action="append", default=[], metavar="VICTIM=S1,S2",
        help="seeds of one victim instead of --seeds, repeatable: --victim-seeds scan=0,1 --victim-seeds ruc=0,1",
    )
    p.add_argument(
        "--victim-set", action="append", default=[], metavar="VICTIM:KEY=VALUE",
        help="an AttackConfig override for one victim's runs, repeatable: --victim-set ruc:mi_temperature=0.3",
    )
    p.add_argument(
        "--gradient-source", choices=("surrogate", "estimate", "whitebox"), default="surrogate",
        help="surrogate or estimate (black-box); whitebox: the reference, the victim's own gradient (its "
        "forward and backward passes counted as image-queries): how far the recipe's schedule goes when the "
        "gradient is exact (rows labelled +gradient_source=whitebox, no goal)",
    )
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--n-test", type=int, default=None, help="test images scored (default: the whole split)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="AttackConfig override applied to every recipe (e.g. a quick look: --set epochs=1)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads (with --collect: what the runs used)")
    p.add_argument("--out", default="runs/bench/attack_budget")
    p.add_argument(
        "--record", nargs="?", const="", default=None, metavar="NAME",
        help="also write a record, docs/results/NAME.json (default NAME: attack_budget_<dataset>)",
    )
    p.add_argument(
        "--record-headline", action="store_true", help="with --record: also show it in the README's headline block",
    )
    p.add_argument("--record-dir", default=None, help="where --record writes (default docs/results)")
    p.add_argument(
        "--record-note", default="", metavar="TEXT",
        help="with --record: a sentence added to its description (how the runs were made: shared cores ...)",
    )
    p.add_argument(
        "--record-title", default="", metavar="TEXT",
        help="with --record: its title instead of the one made from the recipes and victims (where the "
        "labels leave out what every run shares, say it: a screen at the demo's sizes ...)",
    )
    p.add_argument(
        "--resume", action="store_true",
        help="keep the runs already in --out whose victim version and attack config are the ones this run "
        "would use (an interrupted run goes on where it stopped; their code commits go in the record)",
    )
    p.add_argument(
        "--collect", action="append", default=[], metavar="DIR",
        help="run nothing: gather the runs that earlier invocations left in DIR (repeatable) into one table, "
        "figure and record, each labelled by what its configuration changes from the others'",
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what the record's command shows
    args.record_note, args.record_title = args.record_note.strip(), args.record_title.strip()
    if (args.record_headline or args.record_dir or args.record_note or args.record_title) and args.record is None:
        p.error("--record-headline, --record-dir, --record-note and --record-title go with --record")
    if args.record:
        from clusterattack.reports.records import is_record_id

        if not is_record_id(args.record):
            p.error(f"--record {args.record!r}: a record's name is a-z, 0-9, '_', '.', '-' (its file name)")
    return args


@dataclass
class Run:
    """One (victim, recipe, seed): its curve, its totals and its stage times."""

    victim: str
    victim_version: str
    recipe: str
    seed: int
    config: dict[str, Any]
    nmi_pre: float
    curve: list[dict[str, float]] = field(default_factory=list)
    stages: dict[str, float] = field(default_factory=dict)
    pretext_s: float = 0.0
    pretext_cached: bool = False
    image_queries: int = 0
    calls: int = 0
    nmi_post: float = math.nan
    changed_fraction: float = math.nan
    linf_max: float = math.nan
    selected_epoch: int | None = None
    wall_s: float = 0.0
    commit: str = ""
    dirty: bool | None = None
    reused: bool = False

    @property
    def nmi_drop(self) -> float:
        return (self.nmi_pre - self.nmi_post) / self.nmi_pre if self.nmi_pre > 0 else math.nan

    def drop_at(self, queries: int) -> float | None:
        """The NMI drop of the last epoch that ended within ``queries`` image-queries."""
        within = [p for p in self.curve if p["image_queries"] <= queries]
        return within[-1]["nmi_drop"] if within else None

    def row(self) -> dict[str, Any]:
        out = {
            "victim": self.victim, "victim_version": self.victim_version, "recipe": self.recipe, "seed": self.seed,
            "nmi_pre": self.nmi_pre, "nmi_post": self.nmi_post, "nmi_drop": self.nmi_drop,
            "changed_fraction": self.changed_fraction, "linf_max": self.linf_max,
            "image_queries": self.image_queries, "calls": self.calls,
            "calls_256": math.ceil(self.image_queries / 256), "wall_s": round(self.wall_s, 1),
            "pretext_s": round(self.pretext_s, 1), "pretext_cached": self.pretext_cached,
            "selected_epoch": self.selected_epoch, "commit": self.commit, "dirty": self.dirty,
        }  # fmt: skip
        out.update({f"stage.{k}": round(v, 1) for k, v in self.stages.items()})
        for mark in MARKS:
            out[f"drop_at_{mark}"] = self.drop_at(mark)
        return out

    @classmethod
    def from_file(cls, data: dict[str, Any]) -> Run:
        """A run as :func:`main` wrote it (``row()`` with its curve and config)."""
        stages = {k.removeprefix("stage."): v for k, v in data.items() if k.startswith("stage.")}
        names = ("pretext_s", "pretext_cached", "image_queries", "calls", "nmi_post", "changed_fraction",
                 "linf_max", "selected_epoch", "wall_s", "commit", "dirty")  # fmt: skip
        return cls(
            data["victim"], str(data["victim_version"]), data["recipe"], int(data["seed"]), data["config"],
            data["nmi_pre"], curve=data["curve"], stages=stages, reused=True,
            **{k: data[k] for k in names if k in data},
        )


def _temperature(victim: Any, images: torch.Tensor) -> float:
    """``mi_temperature`` "auto" resolved on the first 1,000 test images (the attack takes the
    same from its own pool), so that a run file names the number the run trained with."""
    from clusterattack.attacks.losses import resolve_mi_temperature

    with torch.no_grad():
        return resolve_mi_temperature("auto", victim.predict_proba(images[:1000]))


def _score(victim: Any, generator: Any, config: Any, x: torch.Tensor, y: Any, clean: torch.Tensor) -> dict:
    from clusterattack.attacks.evaluate import evaluate_attack
    from clusterattack.attacks.gan import perturb_images

    adv = perturb_images(generator, x, config)
    with torch.no_grad():
        proba = torch.cat([victim.predict_proba(adv[i : i + 1000]) for i in range(0, len(adv), 1000)])
    scores, _ = evaluate_attack(y, clean, proba, x, adv, figures=False)
    return scores


def run_one(
    victim_name: str, recipe: str, seed: int, args: argparse.Namespace, data: Any, done: Path | None = None
) -> Run:
    """Train one attack, scoring after every epoch; the stage times of its wall clock.

    ``done``: the file an earlier run of the same (victim, recipe, seed) wrote; it is returned
    instead of a new run when its victim version and attack config are this run's.
    """
    from clusterattack.attacks import CountingVictim
    from clusterattack.attacks.counting import read_counts
    from clusterattack.attacks.gan import train_generator, training_split
    from clusterattack.attacks.gradients import make_gradient_source
    from clusterattack.attacks.gradients.pretext import attacker_backbone, attacker_cache_dir
    from clusterattack.attacks.recipes import recipe_attack
    from clusterattack.cli import key_value
    from clusterattack.tracking.store import source_tags
    from clusterattack.tracking.sweeps import newest_version
    from clusterattack.victims.io import load_victim

    version = newest_version(victim_name)
    if version is None:
        raise SystemExit(f"{victim_name} is not registered: jobs/train_victims.py --model ... --dataset {args.dataset}")
    victim = load_victim(f"models:/{victim_name}/{version.version}", device="cpu").eval()
    train_x, _ = data["train"]
    test_x, test_y = data["test"]
    changes = {"gradient_source": args.gradient_source, "eps": args.eps, "seed": seed}
    changes.update(dict(key_value(text) for text in args.overrides))
    model = victim_name.removeprefix("victim-").rsplit("-", 1)[0]
    for text in args.victim_set:
        who, _, setting = text.partition(":")
        if who == model:
            changes.update([key_value(setting)])
    config = recipe_attack(recipe, changes)
    if config.mi_temperature == "auto":
        config = config.override(mi_temperature=_temperature(victim, test_x))
    if done is not None and done.exists():
        # Before any scoring: a kept run costs reading its file, not a pass over the test split.
        earlier = Run.from_file(json.loads(done.read_text()))
        if (earlier.victim_version, earlier.config) == (str(version.version), json.loads(json.dumps(config.to_dict()))):
            return earlier
        log.warning("%s was made with another victim version or attack config: running it again", done)
    with torch.no_grad():
        clean_test = torch.cat([victim.predict_proba(test_x[i : i + 1000]) for i in range(0, len(test_x), 1000)])
    from clusterattack.metrics import clustering_scores

    nmi_pre = float(clustering_scores(test_y, clean_test.argmax(1).numpy())["nmi"])
    # The table, figure and record name what ran: the recipe and any --set that changed it.
    source = [] if args.gradient_source == "surrogate" else [f"gradient_source={args.gradient_source}"]
    label = "+".join([recipe, *source, *args.overrides])
    run = Run(victim_name, str(version.version), label, seed, config.to_dict(), nmi_pre)
    tags = source_tags()
    run.commit = tags.get("clusterattack.git_commit", "")
    run.dirty = {"true": True, "false": False}.get(tags.get("clusterattack.git_dirty", ""))

    # The white-box reference differentiates through the victim: its weights need no gradient
    # (the counting wrapper hides the module from the source, which would otherwise freeze them).
    victim.requires_grad_(False)
    attacked = CountingVictim(victim)
    source = make_gradient_source(attacked, config)
    surrogate = getattr(source, "prior", None) or source
    # The attacker's pretext backbones, on exactly the pool the attack will distil on: trained
    # here (or found in the cache), so that the attack's own clock holds none of them.
    if getattr(getattr(surrogate, "config", None), "arch", None) == "pretext":
        pool, _, _ = training_split(train_x, config)
        started = time.perf_counter()
        cache = attacker_cache_dir()
        before = set(cache.rglob("*")) if cache and cache.exists() else set()
        for pretext_seed in dict.fromkeys(surrogate.pretext_seeds()):
            attacker_backbone(pool, config.surrogate.pretext_epochs, pretext_seed, config.device, cache)
        run.pretext_s = time.perf_counter() - started
        run.pretext_cached = cache is not None and before == set(cache.rglob("*"))

    timers: dict[str, float] = {"clean_memberships": 0.0, "distill": 0.0, "refresh": 0.0, "generator_epochs": 0.0}
    scoring = {"s": 0.0}
    original_prepare, original_end = surrogate.prepare, source.end_of_epoch

    def timed_prepare(*a: Any, **k: Any) -> None:
        t = time.perf_counter()
        # What came before is the clean memberships of the pool (and of the hold-out).
        timers["clean_memberships"] = t - started
        original_prepare(*a, **k)
        timers["distill"] += time.perf_counter() - t

    def timed_end(*a: Any, **k: Any) -> dict:
        t = time.perf_counter()
        out = original_end(*a, **k)
        timers["refresh"] += time.perf_counter() - t
        return out

    surrogate.prepare = timed_prepare  # type: ignore[method-assign]
    source.end_of_epoch = timed_end  # type: ignore[method-assign]
    started = time.perf_counter()

    def on_epoch_end(result: Any, state: dict) -> bool:
        t = time.perf_counter()
        attack_s = t - started - scoring["s"]
        scores = _score(victim, result.generator, config, test_x, test_y, clean_test)
        scoring["s"] += time.perf_counter() - t
        used = state["counts"][0]
        point = {
            "epoch": float(state["epoch"]), "image_queries": float(used),
            "nmi_post": float(scores["nmi_post"]), "nmi_drop": float(scores["nmi_drop"]), "wall_s": attack_s,
        }  # fmt: skip
        run.curve.append(point)
        log.info("%s %s seed %d epoch %d: %d image-queries, NMI drop %.3f", victim_name, recipe, seed,
                 state["epoch"], used, scores["nmi_drop"])  # fmt: skip
        return False

    result = train_generator(attacked, train_x, config, progress=False, source=source, on_epoch_end=on_epoch_end)
    run.wall_s = time.perf_counter() - started - scoring["s"]
    final = _score(victim, result.generator, config, test_x, test_y, clean_test)
    run.nmi_post = float(final["nmi_post"])
    run.changed_fraction = float(final["changed_fraction"])
    run.linf_max = float(final["linf_max"])
    run.image_queries, run.calls = (int(v or 0) for v in read_counts(attacked))
    run.selected_epoch = result.selected_epoch
    timers["generator_epochs"] = max(
        0.0, run.wall_s - timers["clean_memberships"] - timers["distill"] - timers["refresh"]
    )
    run.stages = timers
    return run


def _collect(dirs: list[Path]) -> tuple[list[tuple[Run, Path]], list[str]]:
    """The runs saved in ``dirs``, each labelled by the ``+``-joined changes of its label that not
    every run shares (``fast+epochs=3+alpha_a=12`` and ``fast+epochs=3`` become ``fast+alpha_a=12``
    and ``fast``), and the changes every run shares."""
    found = []
    for directory in dirs:
        files = sorted(directory.glob("*-s*.json"))
        if not files:
            raise SystemExit(f"--collect {directory}: no run files (<victim>-<recipe>-s<seed>.json) there")
        found += [(Run.from_file(json.loads(f.read_text())), f) for f in files]
    tokens = [run.recipe.split("+") for run, _ in found]
    shared = set.intersection(*(set(t[1:]) for t in tokens))
    for (run, _), parts in zip(found, tokens, strict=True):
        run.recipe = "+".join([parts[0], *(t for t in parts[1:] if t not in shared)])
    return found, [t for t in tokens[0][1:] if t in shared]


def _sources(runs: list[Run]) -> list[str]:
    """The gradient sources the runs trained with, from their configs (collected runs differ)."""
    return list(dict.fromkeys(str(r.config.get("gradient_source", "surrogate")) for r in runs))


def _compared(runs: list[Run]) -> str:
    """What a record compares, short enough for a title: the recipes, or how many variants of them."""
    labels = list(dict.fromkeys(r.recipe for r in runs))
    if len(labels) <= 2 and sum(map(len, labels)) <= 60:
        return ", ".join(labels)
    bases = ", ".join(dict.fromkeys(label.split("+")[0] for label in labels))
    return f"{len(labels)} variants of {bases}"


def _selection(runs: list[Run]) -> str:
    """How each run's generator was chosen, from its config (one text if all agree)."""
    texts = {
        f"label_free (the epoch whose perturbed clusters of {n:,} held-out training images share the least NMI "
        "with their clean ones; its queries counted)"
        if (n := int(r.config.get("select_images") or 0)) else "none (the recipe's last epoch)"
        for r in runs
    }
    return " / ".join(sorted(texts))


def _load_data(dataset: str, n_test: int | None) -> dict[str, Any]:
    from clusterattack.data import load_dataset

    data = load_dataset(dataset)
    train = data.subset("train")
    test = data.subset("test", limit=n_test, seed=0)
    return {
        "train": (torch.tensor(train.images, dtype=torch.float32).div_(255.0), train.labels),
        "test": (torch.tensor(test.images, dtype=torch.float32).div_(255.0), test.labels),
        "sizes": {"train": len(train), "test": len(test)},
    }


def summary_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """Per (victim, recipe): mean over seeds of drop, image-queries and wall time, with spread."""
    from clusterattack.tuning.summary import mean_std

    out = []
    keys = sorted({(r.victim, r.recipe) for r in runs}, key=lambda k: (k[0], k[1]))
    for victim, recipe in keys:
        group = [r for r in runs if (r.victim, r.recipe) == (victim, recipe)]
        drop, drop_std = mean_std([r.nmi_drop for r in group])
        reference = _sources(group) == ["whitebox"]  # the white-box reference has no goal
        queries, _ = mean_std([r.image_queries for r in group])
        wall, _ = mean_std([r.wall_s for r in group])
        out.append({
            "victim": victim, "recipe": recipe, "seeds": ",".join(str(r.seed) for r in group),
            "nmi_pre": group[0].nmi_pre, "nmi_drop": drop, "nmi_drop_std": drop_std,
            "image_queries": queries, "calls_256": math.ceil((queries or 0) / 256), "wall_s": wall,
            "drop_at_150000": mean_std([r.drop_at(GOAL_QUERIES) for r in group])[0],
            "meets_goal": None if reference else bool(
                drop is not None and drop >= GOAL_DROP and (queries or 0) <= GOAL_QUERIES and (wall or 0) <= GOAL_WALL_S
            ),
        })  # fmt: skip
    return out


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 100 else f"{v:,.0f}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def figure(runs: list[Run], path: Path, title: str = "") -> None:
    """NMI drop against image-queries, one panel per victim, one colour per recipe (one legend
    entry per recipe, under the panels: labels of --set changes are long); ``title`` (the
    record's, where given) heads it, since the labels leave out what every run shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    victims = list(dict.fromkeys(r.victim for r in runs))
    recipes = list(dict.fromkeys(r.recipe for r in runs))
    cols = min(3, len(victims))
    rows = math.ceil(len(victims) / cols)
    legend_in = 0.25 + 0.2 * len(recipes)
    fig, axes = plt.subplots(
        rows, cols, figsize=(max(4.2 * cols, 8.0), 3.2 * rows + legend_in), squeeze=False
    )
    colours = dict(zip(recipes, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3, strict=False))
    first_seed = {recipe: min(r.seed for r in runs if r.recipe == recipe) for recipe in recipes}
    for ax, victim in zip(axes.flat, victims, strict=False):
        for run in (r for r in runs if r.victim == victim):
            xs = [0.0] + [p["image_queries"] / 1000 for p in run.curve]
            ys = [0.0] + [100 * p["nmi_drop"] for p in run.curve]
            first = run.seed == first_seed[run.recipe]
            ax.plot(xs, ys, marker="o" if first else "^", ms=3, color=colours[run.recipe],
                    alpha=0.9 if first else 0.45)  # fmt: skip
        ax.axhline(100 * GOAL_DROP, color="grey", ls="--", lw=0.8)
        ax.axvline(GOAL_QUERIES / 1000, color="grey", ls=":", lw=0.8)
        ax.set_title(victim.removeprefix("victim-"))
        ax.set_xlabel("image-queries (thousands)")
        ax.set_ylabel("NMI drop (%)")
        ax.set_ylim(0, 100)
    for ax in list(axes.flat)[len(victims) :]:
        ax.axis("off")
    seeds = sorted({r.seed for r in runs})
    handles = [plt.Line2D([], [], color=colours[r], marker="o", ms=3) for r in recipes]
    fig.legend(handles, recipes, loc="lower center", fontsize=7, frameon=False,
               title=f"seeds {', '.join(map(str, seeds))}: a recipe's first seed in circles, the others in light triangles",
               title_fontsize=7)  # fmt: skip
    axes_line = "NMI drop against image-queries (dashed: 80%, dotted: 150,000 queries)"
    fig.suptitle(f"{title}\n{axes_line}" if title else f"Generator attack: {axes_line}", fontsize=9)
    fig.tight_layout(rect=(0, legend_in / (3.2 * rows + legend_in), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    torch.set_num_threads(args.threads)
    from clusterattack.tracking import configure
    from clusterattack.tracking.store import source_tags

    configure()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = _load_data(args.dataset, args.n_test)
    runs: list[Run] = []
    started = time.perf_counter()
    per_victim = {}
    for text in args.victim_seeds:
        who, _, seeds = text.partition("=")
        per_victim[who.strip()] = seeds
    collected, shared = _collect([Path(d) for d in args.collect]) if args.collect else (None, [])
    for run, path in collected or ():
        runs.append(run)
        print(f"{run.victim} {run.recipe} seed {run.seed} (from {path}): NMI {run.nmi_pre:.3f} -> "
              f"{run.nmi_post:.3f} ({100 * run.nmi_drop:.1f}% drop), {run.image_queries:,} image-queries", flush=True)  # fmt: skip
    for model in [] if collected else [m.strip() for m in args.victims.split(",") if m.strip()]:
        for recipe in [r.strip() for r in args.recipes.split(",") if r.strip()]:
            for seed in [int(s) for s in per_victim.get(model, args.seeds).split(",") if s.strip()]:
                path = out / f"{model}-{recipe}-s{seed}.json"
                run = run_one(f"victim-{model}-{args.dataset}", recipe, seed, args, data, path if args.resume else None)
                runs.append(run)
                if not run.reused:
                    path.write_text(json.dumps({**run.row(), "curve": run.curve, "config": run.config}, indent=2))
                print(f"{model:6} {recipe:8} seed {seed}{' (kept from ' + str(path) + ')' if run.reused else ''}: "
                      f"NMI {run.nmi_pre:.3f} -> {run.nmi_post:.3f} "
                      f"({100 * run.nmi_drop:.1f}% drop), {run.image_queries:,} image-queries, "
                      f"{run.wall_s / 60:.1f} min (+ pretext {run.pretext_s / 60:.1f} min"
                      f"{', cached' if run.pretext_cached else ''})", flush=True)  # fmt: skip
    rows = [r.row() for r in runs]
    summary = summary_rows(runs)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    columns = ["victim", "recipe", "seeds", "nmi_pre", "nmi_drop", "nmi_drop_std", "image_queries", "calls_256",
               "wall_s", "drop_at_150000", "meets_goal"]  # fmt: skip
    table = _markdown(summary, columns)
    stage_cols = ["victim", "recipe", "seed", "pretext_s", "pretext_cached"] + sorted(
        {k for r in rows for k in r if k.startswith("stage.")}
    ) + ["wall_s"]
    stages = _markdown(rows, stage_cols)
    figure(runs, out / "attack_budget.png", title=args.record_title)
    (out / "attack_budget.md").write_text(table + "\n\n" + stages + "\n")
    print("\n" + table + "\n\nwall time by stage (s; pretext on its own line: paid once per data set, pool and seed)\n")
    print(stages)
    for recipe in dict.fromkeys(r.recipe for r in runs):
        group = [s for s in summary if s["recipe"] == recipe]
        if all(s["meets_goal"] is None for s in group):
            print(f"{recipe}: the white-box reference (no goal: the gradient is the victim's own)")
            continue
        met = sum(s["meets_goal"] for s in group)
        print(f"{recipe}: goal (>= {GOAL_DROP:.0%} drop, <= {GOAL_QUERIES:,} image-queries, <= {GOAL_WALL_S / 60:.0f} "
              f"min) met on {met} of {len(group)} victims")  # fmt: skip
    print(f"figure: {out / 'attack_budget.png'}; total {time.perf_counter() - started:.0f} s")
    if args.record is not None:
        _record(args, runs, summary, source_tags(), time.perf_counter() - started, data["sizes"], shared)
    return 0


def _without_note(argv: list[str]) -> list[str]:
    """The command line less ``--record-note TEXT`` (the note is the record's description already)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--record-note":
            skip = True
        elif not arg.startswith("--record-note="):
            out.append(arg)
    return out


def _record(
    args: argparse.Namespace, runs: list[Run], summary: list[dict], tags: dict, wall: float, sizes: dict,
    shared: list[str] | None = None,
) -> None:
    from clusterattack.reports.records import (
        code_provenance,
        machine_description,
        mean_std,
        write_record,
    )

    rows = []
    for s in summary:
        group = [r for r in runs if (r.victim, r.recipe) == (s["victim"], s["recipe"])]
        queries = mean_std([r.image_queries for r in group])["mean"]
        rows.append({
            "victim": s["victim"], "victim_version": group[0].victim_version, "recipe": s["recipe"],
            "seeds": [r.seed for r in group], "wall_s": s["wall_s"],
            "image_queries": round(queries), "calls": round(mean_std([r.calls for r in group])["mean"]),
            "calls_256": math.ceil(queries / 256),
            # The code each row's attacks ran (a resumed run keeps attacks made at other commits): the
            # first seed's as the row's commit, and every seed's in the table's "code" column.
            **({"commit": group[0].commit} if group[0].commit else {}),
            **({"dirty": any(r.dirty for r in group)} if all(r.dirty is not None for r in group) else {}),
            "code": ", ".join(dict.fromkeys(r.commit[:7] or "unknown" for r in group)),
            "metrics": {
                "nmi_pre": mean_std([r.nmi_pre for r in group]),
                "nmi_post": mean_std([r.nmi_post for r in group]),
                "nmi_drop": mean_std([r.nmi_drop for r in group]),
                "changed_fraction": mean_std([r.changed_fraction for r in group]),
                "attack_wall_s": mean_std([r.wall_s for r in group]),
                "pretext_s": mean_std([r.pretext_s for r in group]),
            },
        })  # fmt: skip
    provenance = {
        "command": "python benchmarks/attack_budget.py " + shlex.join(_without_note(args.argv)),
        **code_provenance(tags), "machine": machine_description(args.threads),
        "date": time.strftime("%Y-%m-%d"), "dataset": args.dataset, "splits": sizes,
        "gradient_source": ", ".join(_sources(runs)), "selection": _selection(runs),
        "eps": args.eps, "norm": "linf", "wall_s": wall,
    }  # fmt: skip
    if args.collect:
        # Gathered from earlier invocations: each row's commit is its runs'; the --set every run shared.
        provenance["collected_from"] = list(args.collect)
        provenance["shared_changes"] = "+".join(shared or []) or "none"
        provenance["wall_s"] = round(sum(r.wall_s + r.pretext_s for r in runs), 1)  # the runs' own
    kept = [r for r in runs if r.reused and not args.collect]
    if kept:
        # A resumed run: its wall_s is this process's; the attacks kept from earlier ones name their code.
        provenance["resumed"] = {
            "runs_kept": len(kept), "commits": sorted({r.commit or "unknown" for r in kept}),
            "runs_wall_s": round(sum(r.wall_s + r.pretext_s for r in runs), 1),
        }  # fmt: skip
    path = write_record(
        args.record or f"attack_budget_{args.dataset}", rows, provenance, kind="attack",
        title=args.record_title or (
            f"NMI drop against image-queries: {_compared(runs)} on "
            f"{', '.join(dict.fromkeys(r.victim.removeprefix('victim-').rsplit('-', 1)[0].upper() for r in runs))} "
            "(benchmarks/attack_budget.py)"
        ),
        description=(
            f"{' and '.join(_sources(runs)).capitalize()} mode{'s' if len(_sources(runs)) > 1 else ''}"
            + (" (white-box rows: the reference, the victim's own gradient; its forward and backward passes "
               "counted as image-queries)" if "whitebox" in _sources(runs) else "")
            + f", L-inf eps {args.eps:g}, "
            f"{'the whole test split' if args.n_test is None else f'{args.n_test:,} test images'} scored. "
            "Wall time is the attack's own on "
            "this machine (scoring left out); pretext_s the attacker's SimCLR backbones, paid once per data "
            "set, pool and seed (0 when the cache had them)." + (f" {args.record_note}" if args.record_note else "")
        ),
        columns=[("victim", "victim"), ("recipe", "recipe"), ("nmi_pre", "NMI before"), ("nmi_post", "NMI after"),
                 ("nmi_drop", "NMI drop"), ("image_queries", "image-queries"), ("calls_256", "calls of 256"),
                 ("attack_wall_s", "attack wall s"), ("pretext_s", "pretext s"), ("code", "code")],
        headline=args.record_headline, **({"folder": args.record_dir} if args.record_dir else {}),
    )  # fmt: skip
    print(f"record: {path}")


if __name__ == "__main__":
    sys.exit(main())
