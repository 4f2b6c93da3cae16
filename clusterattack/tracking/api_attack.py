"""Attacks on the album API in MLflow: parameters, before/after metrics per draw, table, generator."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from clusterattack.tracking.store import flatten, log_metrics, log_params, start_run

__all__ = ["API_ATTACK_EXPERIMENT", "log_api_attack"]

log = logging.getLogger(__name__)

API_ATTACK_EXPERIMENT = "api_attack"


def _padded_mean(rows: list[list[int]], width: int) -> np.ndarray:
    """Mean of largest-first size lists, each padded with empty groups to ``width``."""
    return np.mean([r + [0] * (width - len(r)) for r in rows], axis=0)


def log_api_attack(result: Any, experiment: str = API_ATTACK_EXPERIMENT, run_name: str | None = None) -> str:
    """Log an ``ApiAttackResult`` as one MLflow run; returns the run id.

    Params: the attack's config (flat, ``attack.*`` included) and ``service.*``, the
    experimenter's record of the service (its hidden model and grouping). Metrics: the
    summary (``nmi_pre_mean``, ``nmi_post_std``, ``nmi_drop``, group counts ...), the
    image-queries and calls spent on the service, the surrogate's own scores
    (``surrogate.*``) and each draw's scores as steps. Tags: dataset, service model,
    surrogate, norm, eps, seed. Artifacts: ``record.json``, ``table.md``, the group-size
    figure and the generator file.
    """
    from clusterattack.attacks.evaluate import cluster_size_figure
    from clusterattack.attacks.io import save_generator

    config = result.config
    record = result.record()
    service_model = str(result.service.get("model", "unknown"))
    # A model path would make a long, slashed run name; its architecture says enough there.
    shown = result.service.get("architecture") or Path(service_model).name
    grouping = result.service.get("grouping", {}).get("method", "")
    name = run_name or (
        f"api-{shown}{'-' + grouping if grouping else ''}-{config.attack.norm}-eps{config.attack.eps:g}-s{config.seed}"
    )
    tags = {
        "dataset": config.dataset,
        "service_model": service_model,
        "surrogate": config.surrogate_model,
        "gradient_source": f"whitebox on own {config.surrogate_model} surrogate",
        "norm": config.attack.norm,
        "eps": f"{config.attack.eps:g}",
        "seed": str(config.seed),
    }
    with start_run(experiment, run_name=name, tags=tags) as run:
        log_params({**config.flat(), **flatten({"service": result.service})})
        log_metrics(result.summary)
        log_metrics(result.counts)
        log_metrics({f"surrogate.{k}": v for k, v in result.surrogate_scores.items()})
        log_metrics({f"generator.{k}": v for k, v in result.generator_result.summary().items()})
        log_metrics({f"time.{k}": v for k, v in result.timings_s.items()})
        for row in result.draws:
            log_metrics({f"draw.{k}": v for k, v in row.items() if k != "draw"}, step=int(row["draw"]))
        mlflow.log_dict(json.loads(json.dumps(record, default=str)), "record.json")
        mlflow.log_text(result.table() + "\n", "table.md")
        pre = [row["group_sizes_pre"] for row in result.draws]
        post = [row["group_sizes_post"] for row in result.draws]
        width = max(len(r) for r in pre + post)
        figure = cluster_size_figure(_padded_mean(pre, width), _padded_mean(post, width))
        figure.axes[0].set_title("mean group sizes per album (clean vs perturbed)")
        mlflow.log_figure(figure, "figures/group_sizes.png")
        with tempfile.TemporaryDirectory() as tmp:
            path = save_generator(
                result.generator_result.generator,
                config.attack,
                Path(tmp) / "generator.pt",
                extra={"victim": f"own {config.surrogate_model} surrogate", "dataset": config.dataset},
            )
            mlflow.log_artifact(str(path), artifact_path="generator")
        log.info("logged API attack run %s (%s)", run.info.run_id, name)
        return run.info.run_id
