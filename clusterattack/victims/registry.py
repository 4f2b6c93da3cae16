"""The victim zoo: an explicit map from model name to (config class, model class, recipe class, trainer)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clusterattack.victims.backbones import backbone_for
from clusterattack.victims.base import ClusteringModel
from clusterattack.victims.cc import CC, CCConfig, CCRecipe, train_cc
from clusterattack.victims.mice import MiCE, MiCEConfig, MiCERecipe, train_mice
from clusterattack.victims.nnm import NNM, NNMConfig, NNMRecipe, train_nnm
from clusterattack.victims.ruc import RUC, RUCConfig, RUCRecipe, train_ruc
from clusterattack.victims.scan import SCAN, SCANConfig, SCANRecipe, train_scan
from clusterattack.victims.spice import SPICE, SPICEConfig, SPICERecipe, train_spice
from clusterattack.victims.training import TrainContext, TrainData, TrainOutcome

PRESETS = ("demo", "full")


@dataclass(frozen=True)
class VictimSpec:
    """How to build, configure and train one registered victim."""

    name: str
    paper: str
    config_cls: type
    model_cls: type[ClusteringModel]
    recipe_cls: type
    train: Callable[[Any, TrainData, Any, TrainContext], TrainOutcome]

    def config(
        self,
        input_shape: tuple[int, int, int],
        num_clusters: int,
        preset: str = "demo",
        **overrides,
    ):
        """The architecture a preset uses for ``input_shape`` images and K clusters."""
        return self.config_cls(
            num_clusters=num_clusters,
            input_shape=tuple(input_shape),
            backbone=backbone_for(preset, tuple(input_shape)),
            **overrides,
        )

    def recipe(self, preset: str = "demo", **overrides):
        """The training recipe of a preset, with fields overridden (e.g. ``epochs=2``)."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}, expected one of {PRESETS}")
        return dataclasses.replace(self.recipe_cls.preset(preset), **overrides)

    def build(self, config) -> ClusteringModel:
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{self.name} needs a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        return self.model_cls(config)


VICTIMS: dict[str, VictimSpec] = {
    "cc": VictimSpec(
        "cc", "Li et al., Contrastive Clustering, AAAI 2021", CCConfig, CC, CCRecipe, train_cc
    ),
    "scan": VictimSpec(
        "scan", "Van Gansbeke et al., SCAN, ECCV 2020", SCANConfig, SCAN, SCANRecipe, train_scan
    ),
    "nnm": VictimSpec(
        "nnm",
        "Dang et al., Nearest Neighbor Matching, CVPR 2021",
        NNMConfig,
        NNM,
        NNMRecipe,
        train_nnm,
    ),
    "spice": VictimSpec(
        "spice", "Niu et al., SPICE, IEEE TIP 2022", SPICEConfig, SPICE, SPICERecipe, train_spice
    ),
    "mice": VictimSpec(
        "mice",
        "Tsai et al., Mixture of Contrastive Experts, ICLR 2021",
        MiCEConfig,
        MiCE,
        MiCERecipe,
        train_mice,
    ),
    "ruc": VictimSpec("ruc", "Park et al., RUC, ICCV 2021", RUCConfig, RUC, RUCRecipe, train_ruc),
}


def get_spec(name: str) -> VictimSpec:
    """The registry entry for ``name``; raises naming the known models otherwise."""
    try:
        return VICTIMS[name]
    except KeyError:
        raise KeyError(
            f"unknown victim model {name!r}, expected one of {sorted(VICTIMS)}"
        ) from None


def build_victim(name: str, config) -> ClusteringModel:
    return get_spec(name).build(config)


def config_from_dict(cls: type, values: dict) -> Any:
    """Rebuild a (nested) frozen config dataclass from ``dataclasses.asdict`` output.

    Lists become tuples where the field is a tuple and nested dataclasses are rebuilt,
    so a config survives a JSON or checkpoint round trip unchanged.
    """
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        kwargs[f.name] = _convert(hints.get(f.name), values[f.name])
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
    return cls(**kwargs)


def _convert(tp, value):
    if value is None or tp is None:
        return value
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return config_from_dict(tp, value)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is not type(None) and dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return config_from_dict(arg, value)
        return value
    if origin is tuple and isinstance(value, list | tuple):
        return tuple(value)
    return value
