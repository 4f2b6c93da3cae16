"""The frozen, validated configuration of an attack sweep and its presets (tiny, demo, paper)."""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clusterattack.attacks.config import AttackConfig
from clusterattack.attacks.recipes import recipe_attack
from clusterattack.tuning.space import DEFAULT_SPACE, ParamSpec

__all__ = [
    "BLACK_BOX_SOURCES",
    "L2_EPS_GRID",
    "METRIC",
    "MODE",
    "OBJECTIVES",
    "PAPER_DATASETS",
    "PRESETS",
    "TIME_ATTRS",
    "SweepConfig",
    "target_name",
]

PRESETS = ("tiny", "demo", "paper")
#: ASHA's resource: generator epochs, or image-queries charged by the served victim's ledger.
TIME_ATTRS = ("epoch", "image_queries")
#: Trials reach the victim through ``ServedVictim`` only, so only the black-box sources apply.
BLACK_BOX_SOURCES = ("estimate", "surrogate")
#: How trials, epochs and seeds are chosen. "label_free": the attacker's own score, the NMI
#: between the victim's clean and perturbed assignments of images it holds out of its pool,
#: asked with queries charged to the trial's key; no label is read until the final generators
#: are scored on the test split. "oracle": post-attack NMI on the test subset with its labels
#: (the paper's protocol, for comparison only; every record then says selection=oracle).
OBJECTIVES = ("label_free", "oracle")
#: The key every trial reports for ASHA and the best-trial choice: the objective's score
#: (``select_score`` or ``nmi_post``, lower is a stronger attack).
METRIC = "objective"
MODE = "min"
#: The eps grid of an L2 sweep when none is given: an L-inf radius of 0.1 on a 28 x 28 image
#: is an L2 radius of up to 2.8, so these span weak to image-wide perturbations.
L2_EPS_GRID = (0.5, 1.0, 2.0)
#: Data sets the ``paper`` preset tries, in the paper's order then the offline ones; those
#: not present on disk are skipped with a warning (``skip_missing_datasets``).
PAPER_DATASETS = ("cifar10", "cifar20", "stl10", "fashion_mnist", "mnist5k")


def target_name(model: str) -> str:
    """The name a target goes by in tables, folders and Serve apps: a zoo model's own name, or
    for a victim specification of one's own (``py:pkg.mod:factory``, ``onnx:PATH`` ...) its
    display name in letters, digits and '_'. Checks the specification's text (nothing
    is imported or loaded)."""
    from clusterattack.victims.registry import VICTIMS

    if model in VICTIMS:
        return model
    from clusterattack.victims.sources import VictimSpecError, parse_victim_spec

    try:
        spec = parse_victim_spec(model)
    except VictimSpecError as err:
        raise ValueError(
            f"target {model!r} is neither a zoo model {sorted(VICTIMS)} nor a victim specification: {err}"
        ) from None
    if spec.kind in ("registry", "served") or (spec.kind == "file" and "/" not in model and "." not in model):
        raise ValueError(
            f"target {model!r} must be a zoo model {sorted(VICTIMS)} (the sweep trains or reuses "
            "victim-<model>-<dataset> itself) or a model of one's own (py:, onnx:, torchscript:, an MLflow "
            "URI, a victim file, adapter:FILE for someone else's service)"
        )
    # Letters, digits and '_' only: a logged model's name (generator-<name>-<dataset>) takes no '.'.
    name = re.sub(r"[^A-Za-z0-9_]+", "_", spec.display_name).strip("_") or "victim"
    return name[:40]


@dataclass(frozen=True)
class SweepConfig:
    """Everything one sweep needs: which victims, which attack, which space, what resources.

    For each target and gradient source the sweep runs one Tune experiment: every eps of
    ``eps_grid`` crossed with ``num_samples`` draws of the space (alpha_a, alpha_c, ...),
    ASHA comparing trials of the same eps only. The best trial of each eps (by
    ``objective``) is then trained again from scratch with ``seeds`` fresh seeds, and those
    runs, scored on the test split, make Table 1 and Table 2 (mean and spread over seeds).

    Args:
        preset_name: the preset it started from ("tiny", "demo", "paper"); recorded, not used.
        targets: (model, dataset) victims, each swept by its own Tune experiments.
        space: the sampled AttackConfig fields (see :mod:`clusterattack.tuning.space`); eps is
            not among them: it is ``eps_grid``.
        attack: the attack every trial starts from (its preset, then ``recipe``, then flags);
            sampled fields override it. Its ``norm``, ``epochs`` (generator epochs per
            trial), ``select_images`` (the attacker's hold-out) and ``seed`` hold for the
            whole sweep; its ``gradient_source`` is replaced by each of ``gradient_sources``.
        recipe: the named attack recipe ``attack`` was built with (recorded); ``fast`` unless a
            preset or ``--recipe`` says otherwise.
        gradient_sources: black-box gradient sources, each swept on its own.
        eps_grid: the perturbation radii (in ``attack.norm``); one Table 1 row per value.
        objective: "label_free" (the attacker's own score on its hold-out, paid in queries)
            or "oracle" (post-attack NMI on the labelled test subset: the paper's protocol,
            for comparison only).
        seeds: fresh seeds the best configuration of each eps is trained again with.
        budget: image-queries each trial's and each seed run's API key may spend.
        num_samples: trials per target, gradient source and eps value.
        time_attr: ASHA's resource, "epoch" (generator epochs) or "image_queries".
        max_t: ASHA's largest resource per trial (default: ``attack.epochs`` for epochs,
            ``budget`` for image-queries); grace_period and reduction_factor as in ASHA.
        cpus_per_trial, gpus_per_trial: resources each trial asks Ray for; as many trials
            run at once as the cluster holds, capped by ``max_concurrent`` when set.
        max_failures: times a failed trial is retried from its latest checkpoint.
        eval_limit: test images (fixed seeded subset) the final generators are scored on.
        victim_preset, victim_epochs, victim_train_limit: how a victim missing from the
            registry is trained (``clusterattack.victims`` presets "demo"/"full").
        data_dir: where data sets are stored as Parquet (``<data_dir>/<dataset>``).
        storage: Tune's storage path; the sweep's state lives in ``<storage>/<experiment>``.
        experiment: name of the sweep (MLflow experiment of the parent run, Tune folder).
        replica_cpus, replica_gpus: resources of each victim's Serve replica.
        serve_host, serve_port: Serve's HTTP address (the victims answer there as well).
        object_store_mb: object store size of a Ray started by the sweep itself.
        register_generators: log and register the final generator of each eps.
        skip_missing_datasets: skip targets whose data set is not on disk instead of failing.
        analyses: the paper's analyses run after the seed runs, from this sweep's generators,
            each a child run of the parent (``clusterattack.analyses.suite.ANALYSES``; ``paper``
            runs all, ``demo`` what fits its time, ``tiny`` none). ``query_detection`` also
            turns query detection on, in ``flag`` mode, on the sweep's own deployments.
    """

    preset_name: str = "demo"
    targets: tuple[tuple[str, str], ...] = (("cc", "fashion_mnist"), ("scan", "fashion_mnist"))
    space: tuple[ParamSpec, ...] = DEFAULT_SPACE
    attack: AttackConfig = field(default_factory=lambda: recipe_attack("fast", {"select_images": 512}))
    recipe: str = "fast"
    gradient_sources: tuple[str, ...] = ("surrogate",)
    eps_grid: tuple[float, ...] = (0.1,)
    objective: str = "label_free"
    seeds: int = 2
    budget: int = 100_000
    num_samples: int = 6
    time_attr: str = "epoch"
    max_t: int | None = None
    grace_period: int = 1
    reduction_factor: float = 3.0
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    max_failures: int = 2
    eval_limit: int = 1000
    victim_preset: str = "demo"
    victim_epochs: int | None = None
    victim_train_limit: int | None = None
    data_dir: str = "data/parquet"
    storage: str = "runs/sweeps"
    experiment: str = "sweep"
    replica_cpus: float = 0.0
    replica_gpus: float = 0.0
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    object_store_mb: int = 512
    register_generators: bool = True
    skip_missing_datasets: bool = False
    analyses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        from clusterattack.tuning.checks import check_sweep

        check_sweep(self)

    # ------------------------------------------------------------------ derived values
    @property
    def asha_max_t(self) -> int:
        """ASHA's ``max_t`` in units of ``time_attr``."""
        if self.max_t is not None:
            return self.max_t
        return self.attack.epochs if self.time_attr == "epoch" else self.budget

    def attack_for(self, gradient_source: str) -> AttackConfig:
        """The base attack of one gradient source's experiments (oracle runs hold nothing out)."""
        changes: dict[str, Any] = {"gradient_source": gradient_source}
        if self.objective == "oracle":
            changes["select_images"] = 0
        return self.attack.override(**changes)

    def final_seeds(self) -> tuple[int, ...]:
        """Seeds of the final runs: fresh ones, none of them the search trials' ``attack.seed``."""
        return tuple(self.attack.seed + 1 + i for i in range(self.seeds))

    @property
    def norm(self) -> str:
        return self.attack.norm

    @property
    def seed(self) -> int:
        return self.attack.seed

    @property
    def train_pool(self) -> int | None:
        """Training images each trial receives (None: the whole train split).

        The generator trains on ``attack.train_limit`` of them; a surrogate distils on
        ``surrogate.distill_queries`` (the larger decides); ``attack.select_images`` more
        are the attacker's hold-out.
        """
        if self.attack.train_limit is None:
            return None
        pool = self.attack.train_limit
        if "surrogate" in self.gradient_sources:
            pool = max(pool, self.attack.surrogate.distill_queries)
        return pool + self.attack.select_images

    def to_dict(self) -> dict[str, Any]:
        """Plain nested values (space as its text form), for MLflow params and the state file."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["targets"] = [list(t) for t in self.targets]
        out["gradient_sources"] = list(self.gradient_sources)
        out["analyses"] = list(self.analyses)
        out["eps_grid"] = list(self.eps_grid)
        out["space"] = [spec.describe() for spec in self.space]
        out["attack"] = self.attack.to_dict()
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SweepConfig:
        """Inverse of :meth:`to_dict` (the state file of a sweep being resumed)."""
        data = dict(values)
        own = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - own)
        if unknown:
            raise ValueError(f"unknown SweepConfig field(s) {unknown}; expected {sorted(own)}")
        if "targets" in data:
            data["targets"] = tuple(tuple(t) for t in data["targets"])
        for key in ("gradient_sources", "eps_grid", "analyses"):
            if key in data:
                data[key] = tuple(data[key])
        if "space" in data:
            data["space"] = tuple(ParamSpec.parse(text) for text in data["space"])
        if "attack" in data:
            data["attack"] = AttackConfig.from_dict(data["attack"])
        return cls(**data)

    def replace(self, **changes: Any) -> SweepConfig:
        """A validated copy; keys that are AttackConfig fields (dotted ones too) change ``attack``."""
        if "recipe" in changes and changes["recipe"] != self.recipe:
            # Renaming it would record a recipe the attack does not run.
            raise ValueError("a sweep's recipe is chosen with its preset: SweepConfig.preset(name, recipe=...)")
        return _apply(self, changes)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SweepConfig:
        """The ``tiny``, ``demo`` or ``paper`` sweep with fields overridden.

        Overrides may name SweepConfig fields or AttackConfig fields (``norm``, ``epochs``,
        ``surrogate.width`` ...), which change ``attack``. ``recipe`` replaces the preset's own
        recipe (``fast`` for demo and paper): that recipe whole, the preset's sizes (device,
        hold-out) on top, then the other attack fields (flags and ``--set`` win over both);
        the preset's tuning of its own recipe is dropped (``presets.preset_attack``).
        ``gradient_source`` is taken as a one-source
        ``gradient_sources``. The experiment name defaults to ``<preset>-<date>-<time>``.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown sweep preset {name!r}, expected one of {PRESETS}")
        from clusterattack.tuning.presets import PRESET_BUILDERS

        base = PRESET_BUILDERS[name](overrides.pop("recipe", None))
        overrides.setdefault("experiment", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        if "eps" in overrides:
            raise ValueError("eps is swept as a grid, one best trial per value: give eps_grid (--eps 0.05,0.1)")
        if "gradient_source" in overrides:
            overrides["gradient_sources"] = (overrides.pop("gradient_source"),)
        if overrides.get("norm") == "l2" and "eps_grid" not in overrides:
            # The preset's radii are L-inf ones; keep them only if they were given on purpose.
            overrides["eps_grid"] = L2_EPS_GRID
        return _apply(base, overrides)


def _apply(config: SweepConfig, changes: Mapping[str, Any]) -> SweepConfig:
    own = {f.name for f in dataclasses.fields(SweepConfig)}
    attack_changes = {k: v for k, v in changes.items() if k not in own}
    plain = {k: v for k, v in changes.items() if k in own}
    for key in ("gradient_sources", "eps_grid", "targets"):
        if key in plain and isinstance(plain[key], list):
            plain[key] = tuple(plain[key])
    if "analyses" in plain:
        from clusterattack.analyses.suite import parse_analyses

        plain["analyses"] = parse_analyses(plain["analyses"])
    if plain.get("gradient_sources"):
        # The template attack names the first source (each source's experiments replace it).
        attack_changes.setdefault("gradient_source", plain["gradient_sources"][0])
    if attack_changes:
        known = config.attack.flat()
        unknown = sorted(k for k in attack_changes if k not in known)
        if unknown:
            raise ValueError(
                f"unknown sweep setting(s) {unknown}: expected SweepConfig fields {sorted(own)} "
                "or AttackConfig fields"
            )
        plain["attack"] = plain.get("attack", config.attack).override(**attack_changes)
    return dataclasses.replace(config, **plain)
