"""Deep clustering victims: the Victim contract, six models (CC, SCAN, NNM, SPICE, MiCE, RUC), training, I/O.

``VICTIMS`` maps each name to its config, model, recipe and trainer; ``load_victim`` reads a
trained one from a file, an MLflow URI or the registry, or any victim specification
(``resolve_victim``: a Python factory, ONNX/TorchScript file, MLflow pyfunc, someone
else's HTTP service; see ``victims.sources`` and docs/own-model.md); ``run_train_job``
trains, tracks and registers one (the ``jobs/train_victims.py`` entry point).
"""

from clusterattack.victims.base import ClusteringModel, DecisionVictim, Victim, check_images
from clusterattack.victims.io import load_victim, save_victim
from clusterattack.victims.pipeline import TrainJob, TrainResult, run_train_job
from clusterattack.victims.registry import PRESETS, VICTIMS, VictimSpec, build_victim, get_spec
from clusterattack.victims.sources import parse_victim_spec, resolve_victim
from clusterattack.victims.training import TrainContext, TrainData

__all__ = [
    "PRESETS",
    "VICTIMS",
    "ClusteringModel",
    "DecisionVictim",
    "TrainContext",
    "TrainData",
    "TrainJob",
    "TrainResult",
    "Victim",
    "VictimSpec",
    "build_victim",
    "check_images",
    "get_spec",
    "load_victim",
    "parse_victim_spec",
    "resolve_victim",
    "run_train_job",
    "save_victim",
]
