"""Confusion matrices and the Fig. 1 image grid of one generator against its victim, recomputed for the report.

Models and images in, a :class:`~clusterattack.reports.data.Breakdown` out: the victim is
queried locally on clean and perturbed images (no store, no served API, no budget).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from clusterattack.attacks.evaluate import evaluate_attack
from clusterattack.attacks.gan import perturb_images
from clusterattack.metrics import hungarian_matching
from clusterattack.reports.data import Breakdown

__all__ = ["ARRAY_FIELDS", "breakdown_from_record", "breakdown_to_record", "compute_breakdown", "grid_indices", "ordered_confusions"]

log = logging.getLogger(__name__)


def grid_indices(labels: np.ndarray, count: int, seed: int) -> np.ndarray:
    """``count`` seeded sample positions, one per class in turn, so the grid shows every class it can."""
    labels = np.asarray(labels)
    if count < 1:
        raise ValueError(f"the image grid needs at least 1 image, got {count}")
    rng = np.random.default_rng(seed)
    pools = {int(c): list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)}
    picked: list[int] = []
    while len(picked) < min(count, labels.size):
        for c in sorted(pools):
            if pools[c] and len(picked) < count:
                picked.append(int(pools[c].pop()))
    return np.asarray(sorted(picked, key=lambda i: (labels[i], i)), dtype=np.int64)


def ordered_confusions(
    labels: np.ndarray, before: np.ndarray, after: np.ndarray, num_classes: int, num_clusters: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Classes x clusters counts before and after, both with the columns in one order: the cluster
    matched (Hungarian, on clean images) to class 0 first, then class 1, ..., unmatched clusters last.

    One order for both, so a column is the same cluster in each and the collapse shows as
    columns filling up. Returns (before, after, cluster id of each column).
    """
    tables = []
    for clusters in (before, after):
        table = np.zeros((num_classes, num_clusters), dtype=np.int64)
        np.add.at(
            table, (np.asarray(labels, dtype=np.int64), np.asarray(clusters, dtype=np.int64)), 1
        )
        tables.append(table)
    rows, cols = linear_sum_assignment(tables[0], maximize=True)
    order = [int(c) for _, c in sorted(zip(rows, cols, strict=True))]
    order += [j for j in range(num_clusters) if j not in order]
    return tables[0][:, order], tables[1][:, order], np.asarray(order, dtype=np.int64)


def _proba(victim: Any, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            out.append(victim.predict_proba(images[start : start + batch]).detach().cpu().float())
    return torch.cat(out).numpy()


def compute_breakdown(
    victim: Any,
    generator: torch.nn.Module,
    attack: Any,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    grid_images: int,
    sample_seed: int,
    class_names: Sequence[str] = (),
    provenance: dict[str, Any],
) -> Breakdown:
    """Perturb ``images`` (uint8 or [0, 1] floats, N x C x H x W) with ``generator`` under ``attack``'s
    norm and eps, query ``victim`` on both, and score and tabulate the clusterings.

    ``provenance`` fills the Breakdown's descriptive fields (model, dataset, victim,
    generator, generator_run_id, gradient_source, norm, eps, seed).
    """
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"images must be N x C x H x W with one label each, got {images.shape} and {labels.shape}"
        )
    x = torch.from_numpy(images).float()
    if images.dtype == np.uint8:
        x = x.div_(255.0)
    x_adv = perturb_images(generator, x, attack)
    clean_proba, adv_proba = _proba(victim, x), _proba(victim, x_adv)
    scores, _ = evaluate_attack(labels, clean_proba, adv_proba, x, x_adv, figures=False)
    c0, c1 = clean_proba.argmax(axis=1), adv_proba.argmax(axis=1)
    k = clean_proba.shape[1]
    num_classes = max(int(labels.max()) + 1, len(class_names))
    matching = hungarian_matching(labels, c0)
    names = {
        c: (class_names[m] if m < len(class_names) else f"class {m}")
        for c, m in matching.cluster_to_class.items()
    }
    pick = grid_indices(labels, grid_images, sample_seed)
    before, after, order = ordered_confusions(labels, c0, c1, num_classes, k)
    log.info(
        "breakdown of %s: NMI %.3f -> %.3f on %d images", provenance.get("victim"), scores["nmi_pre"],
        scores["nmi_post"], len(labels),
    )  # fmt: skip
    return Breakdown(
        **provenance,
        sample_seed=sample_seed,
        n_images=int(len(labels)),
        image_queries=2 * int(len(labels)),
        scores=scores,
        confusion_pre=before,
        confusion_post=after,
        cluster_order=order,
        grid_clean=x[pick].numpy(),
        grid_adv=x_adv[pick].numpy(),
        grid_labels=labels[pick],
        grid_pre=c0[pick],
        grid_post=c1[pick],
        class_names=tuple(class_names),
        cluster_names=names,
    )


#: The Breakdown fields stored as arrays (an ``.npz`` beside the JSON record).
ARRAY_FIELDS = (
    "confusion_pre", "confusion_post", "cluster_order", "grid_clean", "grid_adv", "grid_labels", "grid_pre",
    "grid_post",
)  # fmt: skip


def breakdown_to_record(b: Breakdown) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON-able fields, arrays) of a Breakdown: what an analysis run stores and the report reads back.

    The fields hold the cluster-size breakdown too (``cluster_sizes_pre``/``_post`` in
    ``scores``, each column's size in the confusion order under ``cluster_sizes_ordered_*``).
    """
    fields = {
        k: getattr(b, k)
        for k in Breakdown.__dataclass_fields__
        if k not in ARRAY_FIELDS and k not in ("class_names", "cluster_names")
    }
    fields["class_names"] = list(b.class_names)
    fields["cluster_names"] = {str(k): v for k, v in b.cluster_names.items()}
    fields["cluster_sizes_ordered_pre"] = np.asarray(b.confusion_pre).sum(0).tolist()
    fields["cluster_sizes_ordered_post"] = np.asarray(b.confusion_post).sum(0).tolist()
    arrays = {k: np.asarray(getattr(b, k)) for k in ARRAY_FIELDS if getattr(b, k) is not None}
    return fields, arrays


def breakdown_from_record(fields: dict[str, Any], arrays: dict[str, np.ndarray]) -> Breakdown:
    """The Breakdown :func:`breakdown_to_record` stored (unknown fields are ignored)."""
    known = set(Breakdown.__dataclass_fields__)
    missing = [k for k in ARRAY_FIELDS if k not in arrays and k != "cluster_order"]
    if missing:
        raise ValueError(f"breakdown record lacks the arrays {missing}; it holds {sorted(arrays)}")
    values = {k: v for k, v in fields.items() if k in known}
    values["class_names"] = tuple(fields.get("class_names") or ())
    values["cluster_names"] = {int(k): v for k, v in (fields.get("cluster_names") or {}).items()}
    values.update({k: np.asarray(v) for k, v in arrays.items() if k in known})
    return Breakdown(**values)
