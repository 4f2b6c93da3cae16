"""benchmarks/query_detection.py without serving: its calibration grid, tables, figure and records."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "query_detection.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("query_detection", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("query_detection", module)
    spec.loader.exec_module(module)
    return module


def test_calibration_grid_has_the_default_and_separates_copies_from_distinct_images(bench, monkeypatch):
    from tests.serving.test_detection_core import strokes

    monkeypatch.setattr(bench, "_calibration_images", lambda dataset, n, seed: strokes(n, seed=seed))
    rows = bench.calibrate(seed=0, n_distinct=80, n_copies=20)
    defaults = [r for r in rows if r["default"]]
    assert len(rows) == 2 * (27 + 3) and len(defaults) == 2
    for row in defaults:
        assert row["distinct"] <= 0.05 and row["exact"] == 1.0 and row["shift_1px"] >= 0.9
        assert row["nes_0.02"] >= 0.5 and row["no_hash"] == 0.0
    assert "| dataset |" in bench.markdown(rows, bench.CALIBRATION_COLUMNS)


def test_near_copies_stay_in_range(bench):
    base = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)
    for name, copy in bench.near_copies(base, np.random.default_rng(1)).items():
        assert copy.shape == base.shape and copy.min() >= 0 and copy.max() <= 1, name


def test_figure_and_records_from_results(bench, tmp_path):
    attack = {"matched_fraction": 0.8, "flagged": True, "queries_to_flag": 55, "nmi_drop": 0.15, "completed": True,
              "image_queries": 100, "screened": 100, "first_match": 31, "seconds": 1.0, "option": "-"}  # fmt: skip
    results = {
        "detection": {"flag_after": 25},
        "attacks": [
            {**attack, "attack": "nes", "policy": "flag"},
            {**attack, "attack": "nes", "policy": "block", "completed": False, "nmi_drop": 0.0, "image_queries": 30},
        ],
        "honest": [{"stream": "distinct clean images", "queries": 600, "matched": 3, "matched_fraction": 0.005,
                    "flagged": False, "queries_to_flag": None}],  # fmt: skip
        "throughput": [{"policy": "off", "images_per_s": 100.0, "ratio_to_off": 1.0},
                       {"policy": "flag", "images_per_s": 90.0, "ratio_to_off": 0.9}],  # fmt: skip
        "evasion": [{**attack, "attack": "nes", "option": "recall", "flagged": False, "keys": 1, "keys_flagged": 0,
                     "plain_nmi_drop": 0.15, "plain_queries": 100, "recalled": 70}],  # fmt: skip
    }
    png = tmp_path / "figure.png"
    bench.figure(results, png, "test")
    assert png.stat().st_size > 10_000
    args = argparse.Namespace(dataset="digits", eps=0.2, seed=0)
    prov = {"command": "python benchmarks/query_detection.py", "commit": "abcdef1", "dirty": False,
            "machine": "test", "date": "2026-01-01", "wall_s": 1.0}  # fmt: skip
    paths = bench.write_records(results, prov, args, tmp_path / "records")
    assert sorted(p.name for p in paths) == [
        f"query_detection_{t}_digits.json" for t in ("attacks", "evasion", "honest", "throughput")
    ]
    rows = json.loads((tmp_path / "records" / "query_detection_attacks_digits.json").read_text())["rows"]
    assert rows[1]["policy"] == "block" and rows[1]["metrics"]["completed"] == 0.0
