"""The parts of the sweep's analyses that need no sweep: names, sizes, request checks, the Appendix E
arithmetic, the baselines comparison and per-eps norm-curve attacks on tiny linear victims."""

from __future__ import annotations

import math

import pytest

from clusterattack.analyses import (
    ANALYSES,
    AnalysisSizes,
    BaselinesConfig,
    NormCurvesConfig,
    SweepAnalysisRequest,
    parse_analyses,
    run_baselines,
    run_norm_curves,
)
from clusterattack.analyses.baselines import equal_total_budget, payback_images, summarise
from clusterattack.analyses.common import LoadedGenerator
from clusterattack.attacks import train_generator
from tests.analyses.conftest import tiny_attack

ROW = {
    "model": "cc", "dataset": "digits", "victim": "victim-cc-digits", "victim_version": "1",
    "gradient_source": "surrogate", "norm": "linf", "eps": 0.1, "selection": "label_free", "seeds": "1,2",
    "generator": "generator-cc-digits/1",
}  # fmt: skip


def test_parse_analyses():
    assert parse_analyses("all") == ANALYSES
    assert parse_analyses("none") == parse_analyses("") == parse_analyses([]) == ()
    assert parse_analyses("pca, transfer") == ("transfer", "pca")  # the suite's order, not the caller's
    with pytest.raises(ValueError, match=r"unknown analysis \['robustness'\]"):
        parse_analyses("pca,robustness")


def test_sizes_presets_and_bad_sizes():
    tiny, demo, paper = (AnalysisSizes.preset(p) for p in ("tiny", "demo", "paper"))
    assert tiny.norm_eps is None and demo.norm_eps == (0.05, 0.1, 0.2)
    assert (paper.detection_images, paper.detection_trials, paper.detection_fit_images) == (8000, 100, 10_000)
    assert demo.detection_images == 1000 and demo.baseline_budgets == (25, 100, 400)
    with pytest.raises(ValueError, match="detection_trials must be an integer >= 1, got 0"):
        AnalysisSizes(detection_trials=0)
    with pytest.raises(ValueError, match="norm_reference"):
        AnalysisSizes(norm_reference="oracle")
    with pytest.raises(ValueError, match="baselines must name"):
        AnalysisSizes(baselines=("fgsm",))
    with pytest.raises(ValueError, match="unknown preset"):
        AnalysisSizes.preset("huge")


def _request(**changes) -> SweepAnalysisRequest:
    fields = {
        "sweep": "s", "parent_run_id": "p", "tracking_uri": "sqlite:///x.db", "rows": (ROW,),
        "data_uris": {"digits": "/data/digits"}, "eval_limit": 256, "seed": 0, "preset": "tiny",
    }  # fmt: skip
    return SweepAnalysisRequest(**{**fields, **changes})


def test_request_checks_rows_data_and_sizes():
    request = _request(analyses="pca,breakdown")
    assert request.analyses == ("breakdown", "pca") and request.sizes == AnalysisSizes.preset("tiny")
    assert request.detached().state == {} and request.detached().persist is None
    with pytest.raises(ValueError, match=r"lacks \['generator'\].*register_generators"):
        _request(rows=({**ROW, "generator": None},))
    with pytest.raises(ValueError, match=r"no Parquet URI for data set\(s\) \['digits'\]"):
        _request(data_uris={"mnist5k": "/x"})
    with pytest.raises(ValueError, match="eval_limit must be an integer >= 2, got 1"):
        _request(eval_limit=1)
    with pytest.raises(ValueError, match="nothing to analyse"):
        _request(rows=())
    with pytest.raises(ValueError, match="device 'cuda' and gpus_per_task 0.0 disagree"):
        _request(device="cuda")


def _run(method: str, budget: int, per_image: float, drop: float) -> dict:
    return {"method": method, "budget": budget, "queries_per_image": per_image, "nmi_drop": drop}


def test_equal_total_arithmetic():
    assert equal_total_budget(1792, 359) == 4 and equal_total_budget(100, 360) == 0
    assert payback_images(1792, 3.0) == 598 and payback_images(10, 0) is None
    runs = [_run("square", 5, 4.5, 0.2), _run("nes", 25, 22.0, 0.5), _run("square", 100, 99.0, 0.6)]
    s = summarise(0.4, 1800, 360, runs, search_image_queries=1800)
    # at 5 image-queries per image only square@5 fits; nes@25 is the cheapest run as strong as the generator
    assert s["best_baseline_equal_total"] == "square@5" and s["ratio_equal_total"] == pytest.approx(2.0)
    assert s["payback_images"] == math.ceil(1800 / 22) and s["paid_back_within_split"]
    assert s["payback_images_with_search"] == math.ceil(3600 / 22)
    assert s["payback_against"].startswith("nes@25: the cheapest")
    # nothing fits the equal budget: the generator wins by default, and the note says what a baseline needs
    s = summarise(0.4, 100, 360, runs, skipped=[{"method": "spsa", "budget": 1, "min_queries": 22}])
    assert s["ratio_equal_total"] is None and "the least any needs is 22 (spsa)" in s["ratio_note"]
    # no baseline as strong: paid back against the strongest one
    s = summarise(0.9, 1800, 360, runs)
    assert s["payback_against"].startswith("square@100: no baseline run reached")
    assert s["payback_images"] == math.ceil(1800 / 99.0)


def test_baselines_against_a_generator_at_equal_total_queries(blobs, victims):
    train, test, labels, _ = blobs
    config = tiny_attack(eps=0.2)
    result = train_generator(victims["a"], train, config, progress=False)
    generator = LoadedGenerator(result.generator, config, "tiny.pt", 1000, {"victim": "a"})
    run = run_baselines(
        BaselinesConfig(dataset="blobs", victim="a", generator="tiny.pt", split_images=100, budgets=(25,),
                        baselines=("spsa", "square")),
        victims["a"], generator, test[:40], labels[:40],
    )  # fmt: skip
    p = run.payload
    assert p["equal_total_budget"] == 10 and p["split_images"] == 100 and p["sample_images"] == 40
    methods = [(r["method"], r["budget"]) for r in p["rows"]]
    # spsa needs 22 per image: not run at the equal budget of 10, and said so
    assert methods == [("generator", None), ("spsa", 25), ("square", 10), ("square", 25)]
    assert p["skipped"][0]["method"] == "spsa" and p["skipped"][0]["min_queries"] == 22
    for r in p["rows"][1:]:
        assert r["queries_per_image"] <= r["budget"] and r["linf_max"] <= 0.2 + 1e-6
        assert r["total_image_queries"] == pytest.approx(100 * r["queries_per_image"])
    assert p["best_baseline_equal_total"] == "square@10"
    assert p["payback_images"] is not None and "equal_queries" in run.figures
    with pytest.raises(ValueError, match="carries no image-queries"):
        run_baselines(BaselinesConfig(dataset="blobs", victim="a", generator="g", split_images=100),
                      victims["a"], LoadedGenerator(result.generator, config, "g"), test[:4], labels[:4])  # fmt: skip


def test_norm_curves_take_a_per_eps_attack_and_a_reference_source(blobs, victims):
    train, test, labels, _ = blobs
    base = tiny_attack()
    config = NormCurvesConfig(
        dataset="blobs", victims=("a",), eps_values=(0.1, 0.2), attack=base,
        eps_attacks=((0.2, base.override(alpha_a=7.0)),), reference_source="estimate", use_ray=False,
        progress=False, seed=3,
    )  # fmt: skip
    assert config.attack_at(0.2).alpha_a == 7.0 and config.attack_at(0.1).alpha_a == base.alpha_a
    assert config.attack_at(0.2, "estimate").gradient_source == "estimate" and config.attack_at(0.2).seed == 3
    with pytest.raises(ValueError, match="eps_attacks must map eps values"):
        NormCurvesConfig(dataset="b", victims=("a",), eps_values=(0.1,), eps_attacks=((0.3, base),))
    with pytest.raises(ValueError, match="reference_source"):
        NormCurvesConfig(dataset="b", victims=("a",), reference_source="oracle")
    rows = run_norm_curves(config, victims=victims, data=(train, test, labels)).payload["rows"]
    assert sorted((r["gradient_source"], r["eps"]) for r in rows) == [
        ("estimate", 0.1), ("estimate", 0.2), ("whitebox", 0.1), ("whitebox", 0.2)]  # fmt: skip
    assert all(r["linf_max"] <= r["eps"] + 1e-6 for r in rows)
