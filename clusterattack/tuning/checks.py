"""The checks a sweep's configuration passes when it is built (``SweepConfig.__post_init__``).

Split from :mod:`clusterattack.tuning.config` by role: that module says what a sweep is, this
one what makes it valid.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any

from clusterattack.attacks.config import AttackConfig
from clusterattack.tuning.config import (
    BLACK_BOX_SOURCES,
    OBJECTIVES,
    PRESETS,
    TIME_ATTRS,
    target_name,
)
from clusterattack.tuning.space import ParamSpec

if TYPE_CHECKING:
    from clusterattack.tuning.config import SweepConfig

__all__ = ["check_sweep"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Fields Tune must not sample: they say which attack this is, not how strong it is.
# eps is a grid (``eps_grid``), not sampled: each eps value gets its own best trial.
_UNTUNABLE = (
    "gradient_source", "seed", "device", "epochs", "query_batch", "train_limit", "select_images", "eps",
)  # fmt: skip


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _number(name: str, value: Any, minimum: float, strict: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {relation} {minimum}, got {value!r}")


def check_sweep(config: SweepConfig) -> None:
    """Every check a ``SweepConfig`` makes when it is built; a ValueError names the field."""
    from clusterattack.victims.registry import PRESETS as VICTIM_PRESETS

    if config.preset_name not in PRESETS:
        raise ValueError(f"preset_name must be one of {PRESETS}, got {config.preset_name!r}")
    if not isinstance(config.targets, tuple) or not config.targets:
        raise ValueError(f"targets must be a non-empty tuple of (model, dataset) pairs, got {config.targets!r}")
    for target in config.targets:
        if not (isinstance(target, tuple) and len(target) == 2 and all(isinstance(t, str) for t in target)):
            raise ValueError(f"each target must be a (model, dataset) pair of names, got {target!r}")
        target_name(target[0])  # a zoo model, or a victim specification of one's own
        if not re.match(r"^[A-Za-z0-9_.]+$", target[1]):
            raise ValueError(f"dataset {target[1]!r} must be a registered name (letters, digits, '_', '.')")
    names = [(target_name(m), d) for m, d in config.targets]
    if len(set(names)) != len(names):
        raise ValueError(f"targets must not repeat (by name and data set), got {config.targets!r}")
    if len(set(config.targets)) != len(config.targets):
        raise ValueError(f"targets must not repeat, got {config.targets!r}")
    if not isinstance(config.attack, AttackConfig):
        raise ValueError(f"attack must be an AttackConfig, got {type(config.attack).__name__}")
    _check_attack(config)
    _check_space(config)
    _int("budget", config.budget, 1)
    _int("num_samples", config.num_samples, 1)
    if config.time_attr not in TIME_ATTRS:
        raise ValueError(f"time_attr must be one of {TIME_ATTRS}, got {config.time_attr!r}")
    if config.max_t is not None:
        _int("max_t", config.max_t, 1)
        if config.time_attr == "epoch" and config.max_t > config.attack.epochs:
            raise ValueError(
                f"max_t ({config.max_t} epochs) must not exceed the generator epochs per trial "
                f"(attack.epochs = {config.attack.epochs})"
            )
    _int("grace_period", config.grace_period, 1)
    if config.grace_period > config.asha_max_t:
        raise ValueError(f"grace_period ({config.grace_period}) must not exceed max_t ({config.asha_max_t})")
    _number("reduction_factor", config.reduction_factor, 1.0, strict=True)
    _number("cpus_per_trial", config.cpus_per_trial, 0.0, strict=True)
    _number("gpus_per_trial", config.gpus_per_trial, 0.0)
    if config.gpus_per_trial > 0 and config.attack.device == "cpu":
        raise ValueError(
            f"gpus_per_trial={config.gpus_per_trial!r} needs attack.device 'cuda', got 'cpu' "
            "(the trials would hold a GPU and leave it idle)"
        )
    if config.attack.device.startswith("cuda") and config.gpus_per_trial == 0:
        raise ValueError(
            f"attack.device {config.attack.device!r} needs gpus_per_trial > 0, got 0 "
            "(Ray would give the trials no GPU)"
        )
    if config.max_concurrent is not None:
        _int("max_concurrent", config.max_concurrent, 1)
    _int("max_failures", config.max_failures, 0)
    _int("eval_limit", config.eval_limit, 2)
    if config.victim_preset not in VICTIM_PRESETS:
        raise ValueError(f"victim_preset must be one of {VICTIM_PRESETS}, got {config.victim_preset!r}")
    if config.victim_epochs is not None:
        _int("victim_epochs", config.victim_epochs, 0)
    if config.victim_train_limit is not None:
        _int("victim_train_limit", config.victim_train_limit, 2)
    for name in ("data_dir", "storage"):
        if not isinstance(getattr(config, name), str) or not getattr(config, name):
            raise ValueError(f"{name} must be a non-empty path or URI, got {getattr(config, name)!r}")
    if not isinstance(config.experiment, str) or not _NAME.match(config.experiment):
        raise ValueError(
            f"experiment must be 1-100 letters, digits, '_', '.' or '-' (it names a folder), "
            f"got {config.experiment!r}"
        )
    _number("replica_cpus", config.replica_cpus, 0.0)
    _number("replica_gpus", config.replica_gpus, 0.0)
    _int("serve_port", config.serve_port, 1)
    if config.serve_port > 65535:
        raise ValueError(f"serve_port must be a TCP port (1-65535), got {config.serve_port!r}")
    _int("object_store_mb", config.object_store_mb, 64)
    from clusterattack.analyses.suite import parse_analyses

    if not isinstance(config.analyses, tuple) or parse_analyses(config.analyses) != config.analyses:
        raise ValueError(
            f"analyses must be a tuple of names in their canonical order, got {config.analyses!r} "
            f"(parse them with clusterattack.analyses.suite.parse_analyses)"
        )
    if config.analyses and not config.register_generators:
        raise ValueError("analyses run on the sweep's registered generators: they need register_generators=True")


def _check_attack(config: SweepConfig) -> None:
    from clusterattack.attacks.recipes import get_recipe

    get_recipe(config.recipe)
    sources = config.gradient_sources
    if not isinstance(sources, tuple) or not sources or len(set(sources)) != len(sources):
        raise ValueError(f"gradient_sources must be a non-empty tuple without repeats, got {sources!r}")
    for source in sources:
        if source not in BLACK_BOX_SOURCES:
            raise ValueError(
                f"gradient source {source!r} is not black-box: trials see the victim only through its "
                f"served API, so it must be one of {BLACK_BOX_SOURCES}"
            )
    if config.attack.gradient_source not in BLACK_BOX_SOURCES:
        raise ValueError(
            f"attack.gradient_source must be a black-box source {BLACK_BOX_SOURCES}, "
            f"got {config.attack.gradient_source!r}"
        )
    if not isinstance(config.eps_grid, tuple) or not config.eps_grid:
        raise ValueError(f"eps_grid must be a non-empty tuple of radii, got {config.eps_grid!r}")
    if len(set(config.eps_grid)) != len(config.eps_grid):
        raise ValueError(f"eps_grid must not repeat a value, got {config.eps_grid!r}")
    for eps in config.eps_grid:
        try:
            config.attack.override(eps=eps)
        except (TypeError, ValueError) as err:
            raise ValueError(f"eps_grid value {eps!r} is not a valid {config.attack.norm} radius: {err}") from err
    if config.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {config.objective!r}")
    if config.objective == "label_free" and config.attack.select_images < 2:
        raise ValueError(
            "objective 'label_free' scores epochs and trials on images the attacker holds out of its "
            f"pool, so attack.select_images must be >= 2 (e.g. --set select_images=512), got "
            f"{config.attack.select_images}"
        )
    _int("seeds", config.seeds, 1)


def _check_space(config: SweepConfig) -> None:
    if not isinstance(config.space, tuple) or not config.space:
        raise ValueError(f"space must be a non-empty tuple of ParamSpec, got {config.space!r}")
    known = config.attack.flat()
    names = [spec.name for spec in config.space]
    if len(set(names)) != len(names):
        raise ValueError(f"space names a field twice: {names}")
    for spec in config.space:
        if not isinstance(spec, ParamSpec):
            raise ValueError(f"space entries must be ParamSpec, got {spec!r}")
        if spec.name not in known:
            raise ValueError(f"search dimension {spec.name!r} is not an AttackConfig field; known: {sorted(known)}")
        if spec.name in _UNTUNABLE:
            raise ValueError(
                f"search dimension {spec.name!r} cannot be tuned: it is fixed per sweep "
                f"({', '.join(_UNTUNABLE)} are)"
            )
        # Every corner of the space must make a valid attack, or trials fail one by one.
        ends = spec.values if spec.kind == "choice" else (spec.low, spec.high)
        for value in ends or ():
            try:
                config.attack.override(**{spec.name: value})
            except (TypeError, ValueError) as err:
                raise ValueError(f"search dimension {spec.describe()!r} reaches an invalid attack: {err}") from err
