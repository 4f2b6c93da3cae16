"""Tiny report inputs (payloads following the analyses contract) and an HTML reader for the report tests."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np

from clusterattack.reports import AnalysisResult, Breakdown, ReportData, SweepTables

EVIL = "<script>alert('x')</script> & \"q\""
VICTIMS = ("victim-cc-tiny", "victim-scan-tiny")


def table_rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Table 1 and Table 2 rows shaped as tuning.summary writes them (two victims)."""
    t1, t2 = [], []
    for i, (model, victim) in enumerate(zip(("cc", "scan"), VICTIMS, strict=True)):
        base = {"model": model, "dataset": "tiny", "victim": victim, "gradient_source": "surrogate", "norm": "linf",
                "eps": 0.1 + 0.01 * i, "seed": 0, "best_trial": f"t_0000{i}"}  # fmt: skip
        t1.append({
            **base, "victim_version": "1", "alpha_a": 10.0, "alpha_c": 1.0, "attack_loss": "mutual_info",
            "nmi_pre": 0.61 + 0.01 * i, "nmi_post": 0.21 + 0.02 * i, "ari_pre": 0.51, "ari_post": 0.05 + i / 100,
            "acc_pre": 0.66, "acc_post": 0.31, "nmi_drop": 0.65, "ari_drop": 0.9, "acc_drop": 0.53,
            "linf_mean": 0.1, "l2_mean": 3.1, "changed_fraction": 0.7, "epochs_run": 3, "trials": 2,
        })  # fmt: skip
        t2.append({
            **base, "image_queries": 5000 + 256 * i, "calls": 20 + i, "calls_256": 20 + i, "epochs_run": 3,
            "converged_epoch": 2, "image_queries_at_convergence": 4000, "calls_256_at_convergence": 16,
            "budget": 20000, "sweep_trials": 2, "sweep_generator_epochs": 6, "sweep_image_queries": 9000 + i,
        })  # fmt: skip
    return t1, t2


def payloads(dataset: str = "tiny") -> dict[str, dict[str, Any]]:
    """One payload per analysis kind, as the analyses contract describes them."""
    sources, targets = ["cc", "scan"], ["cc", "scan", "ruc"]
    post = {m: [[0.1 + 0.1 * i + 0.01 * j + k / 1000 for j in range(3)] for i in range(2)]
            for k, m in enumerate(("nmi", "ari", "acc"))}  # fmt: skip
    return {
        "transfer": {
            "dataset": dataset,
            "norm": "linf",
            "eps": 0.1,
            "sources": sources,
            "targets": targets,
            "generators": {s: f"generator-{s}-{dataset}/1" for s in sources},
            "gradient_sources": {s: "surrogate" for s in sources},
            "train_eps": {s: 0.1 + 0.05 * i for i, s in enumerate(sources)},
            "image_queries_by_source": {s: 1000 * (i + 1) for i, s in enumerate(sources)},
            "pre": {
                t: {"nmi": 0.6 + 0.01 * j, "ari": 0.5, "acc": 0.7} for j, t in enumerate(targets)
            },
            "post": post,
            "image_queries": 0,
            "test_images": 100,
            "seed": 0,
        },  # fmt: skip
        "norm_curves": {
            "dataset": dataset,
            "norm": "linf",
            "gradient_source": "whitebox",
            "seed": 0,
            "rows": [
                {
                    "victim": v,
                    "eps": e,
                    "nmi_pre": 0.6,
                    "ari_pre": 0.5,
                    "acc_pre": 0.7,
                    "nmi_post": 0.6 - e - i / 10,
                    "ari_post": 0.4 - e,
                    "acc_post": 0.6 - e,
                    "l2_mean": 10 * e,
                    "linf_mean": e,
                    "image_queries": 1000,
                }
                for i, v in enumerate(VICTIMS)
                for e in (0.05, 0.1, 0.2)
            ],
        },  # fmt: skip
        "detection": {
            "dataset": dataset,
            "victim": VICTIMS[0],
            "generator": f"generator-cc-{dataset}/1",
            "eps": 0.1,
            "norm": "linf",
            "target_fpr": 0.05,
            "images": 200,
            "trials": 5,
            "detection_rate_mean": 0.1169,
            "detection_rate_std": 0.012,
            "fpr_mean": 0.049,
            "fpr_std": 0.004,
            "seed": 0,
        },  # fmt: skip
        "pca": {
            "dataset": dataset,
            "victim": VICTIMS[0],
            "generator": f"generator-cc-{dataset}/1",
            "eps": 0.1,
            "norm": "linf",
            "explained_variance": [0.3, 0.2, 0.1],
            "overlap": 0.83,
            "overlap_method": "knn two-sample",
            "points": "analysis/pca_points.npz",
        },  # fmt: skip
        "retraining": {
            "dataset": dataset,
            "victim": VICTIMS[0],
            "generators": [f"generator-cc-{dataset}/1"],
            "seed": 0,
            "rows": [
                {
                    "model": "original",
                    "nmi_clean": 0.61,
                    "nmi_old_generators": 0.21,
                    "nmi_fresh_attack": 0.2,
                },
                {
                    "model": "retrained",
                    "nmi_clean": 0.58,
                    "nmi_old_generators": 0.52,
                    "nmi_fresh_attack": 0.25,
                },
            ],
            "fresh_attack": {"gradient_source": "whitebox", "eps": 0.1, "epochs": 2},
        },  # fmt: skip
        "baselines": {
            "dataset": dataset,
            "victim": "cc",
            "generator": f"generator-cc-{dataset}/1",
            "eps": 0.1,
            "norm": "linf",
            "seed": 0,
            "sample_images": 64,
            "split_images": 400,
            "generator_nmi_drop": 0.4,
            "generator_image_queries": 2000,
            "equal_total_queries_per_image": 5.0,
            "best_baseline_equal_total": "square@5",
            "baseline_nmi_drop_equal_total": 0.1,
            "ratio_equal_total": 4.0,
            "ratio_note": "best baseline spending at most 5.00 image-queries per image",
            "payback_against": "square@100: the cheapest baseline run at least as strong as the generator",
            "payback_images": 20,
            "payback_images_with_search": 60,
            "skipped": [{"method": "nes", "budget": 5, "min_queries": 22}],
            "rows": [
                {"method": "generator", "budget": None, "queries_per_image": 5.0, "total_image_queries": 2000,
                 "nmi_post": 0.3, "nmi_drop": 0.4, "changed_fraction": 0.5, "linf_max": 0.1},
                {"method": "square", "budget": 5, "queries_per_image": 4.5, "total_image_queries": 1800,
                 "nmi_post": 0.45, "nmi_drop": 0.1, "changed_fraction": 0.2, "linf_max": 0.1},
                {"method": "square", "budget": 100, "queries_per_image": 99.0, "total_image_queries": 39600,
                 "nmi_post": 0.28, "nmi_drop": 0.45, "changed_fraction": 0.6, "linf_max": 0.1},
            ],
        },  # fmt: skip
        "query_detection": {
            "keys": 2, "flagged_keys": 1, "flagged_fraction": 0.5, "queries": 700,
            "queries_to_flag_median": 31, "queries_to_flag_min": 31, "matched_fraction_mean": 0.4,
            "detector": {"policy": "flag", "flag_after": 25, "flag_window": 100, "history": 1600},
            "rows": [
                {"item": "cc-tiny-surrogate", "phase": "search", "eps": 0.1, "seed": None, "trial_id": "t0",
                 "run_id": "run0", "key_id": "k0", "queries": 600, "ledger_image_queries": 600, "matched": 270,
                 "matched_fraction": 0.45, "first_match_query": 7, "flagged": True, "queries_to_flag": 31},
                {"item": "cc-tiny-surrogate", "phase": "final", "eps": 0.1, "seed": 1, "trial_id": "t1",
                 "run_id": "run1", "key_id": "k1", "queries": 100, "ledger_image_queries": 100, "matched": 3,
                 "matched_fraction": 0.03, "first_match_query": 40, "flagged": False, "queries_to_flag": None},
            ],
        },  # fmt: skip
    }


def pca_points(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"clean": rng.normal(size=(40, 3)), "adv": rng.normal(size=(40, 3)) + 0.2}


def breakdown(model: str = "cc") -> Breakdown:
    rng = np.random.default_rng(1)
    clean = rng.random((4, 1, 8, 8))
    adv = np.clip(clean + rng.uniform(-0.1, 0.1, clean.shape), 0, 1)
    before = np.diag([5, 4, 6])
    after = np.array([[0, 5, 0], [1, 3, 0], [0, 6, 0]])
    return Breakdown(
        model=model, dataset="tiny", victim=f"victim-{model}-tiny/1", generator=f"generator-{model}-tiny/1",
        generator_run_id="0123456789abcdef", gradient_source="surrogate", norm="linf", eps=0.1, seed=0,
        sample_seed=0, n_images=15, image_queries=30,
        scores={"nmi_pre": 0.61, "nmi_post": 0.21, "ari_pre": 0.51, "ari_post": 0.05, "acc_pre": 0.66,
                "acc_post": 0.31, "changed_fraction": 0.7, "largest_cluster_fraction_post": 0.93,
                "clusters_used_post": 2, "linf_mean": 0.1, "l2_mean": 0.5},
        confusion_pre=before, confusion_post=after, grid_clean=clean, grid_adv=adv,
        grid_labels=np.array([0, 1, 2, 0]), grid_pre=np.array([0, 1, 2, 0]), grid_post=np.array([1, 1, 1, 0]),
        class_names=("a", "b", EVIL), cluster_names={0: "a", 1: "b"}, cluster_order=np.array([0, 1, 2]),
    )  # fmt: skip


def full_data() -> ReportData:
    """A report with every section filled, and hostile text in places a careless writer would not escape."""
    t1, t2 = table_rows()
    t1[0]["victim"] = EVIL
    for i, row in enumerate((*t1, *t2)):
        row["run_id"] = f"run{i % 2}"
    analyses = {k: AnalysisResult(k, f"analysis-{k}", p) for k, p in payloads().items()}
    analyses["pca"].arrays = pca_points()
    return ReportData(
        title=f"report {EVIL}", tracking_uri="sqlite:///x.db", generated_at="2026-01-01", dataset="tiny",
        sweep=SweepTables("sweep-1", "parent0", t1, t2, {"cc-tiny": "generator-cc-tiny/1"}, {"status": "completed"}),
        analyses=analyses, breakdowns=[breakdown()], notes=[EVIL],
    )  # fmt: skip


class PageReader(HTMLParser):
    """Sections (id -> filled), image sources, table cells (table id -> list of attribute dicts) and text."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, bool] = {}
        self.states: dict[str, str] = {}
        self.images: list[str] = []
        self.cells: dict[str, list[dict[str, str]]] = {}
        self.text: list[str] = []
        self.scripts = 0
        self._table: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.sections[a["id"]] = a.get("data-filled") == "true"
            self.states[a["id"]] = a.get("data-state", "")
        elif tag == "img":
            self.images.append(a["src"])
        elif tag == "table":
            self._table = a.get("id", "")
            self.cells.setdefault(self._table, [])
        elif tag == "td" and self._table is not None:
            self.cells[self._table].append(a)
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def read_page(index: Path) -> PageReader:
    reader = PageReader()
    reader.feed(index.read_text(encoding="utf-8"))
    return reader


def cell(reader: PageReader, table: str, key: str, row: int = 0, attr: str = "data-value") -> float:
    """Full-precision number in column ``key`` of row ``row`` of table ``table``."""
    cells = [c for c in reader.cells[table] if c.get("data-key") == key]
    return float(cells[row][attr])
