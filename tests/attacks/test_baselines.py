"""Per-image score-based baselines (NES, SPSA, Square): bounds, budget, black-box contract, config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clusterattack.attacks import CountingVictim
from clusterattack.attacks.baselines import (
    BASELINES,
    NESConfig,
    SPSAConfig,
    SquareConfig,
    make_baseline,
)
from clusterattack.attacks.baselines.base import MemoPredict
from clusterattack.serving.errors import BudgetExceeded
from tests.attacks.conftest import LinearSoftmaxVictim, ScoresOnlyVictim, load_benchmark, make_blobs

NORM_EPS = (("linf", 0.1), ("l2", 0.8))
BUDGET = 45  # per image: 2 NES/SPSA iterations, 43 Square iterations


@pytest.fixture
def images_and_victim():
    images, _, prototypes = make_blobs(48, seed=3)
    return images, LinearSoftmaxVictim(prototypes).eval()


def _moved(victim: LinearSoftmaxVictim, clean: torch.Tensor, adv: torch.Tensor) -> float:
    with torch.no_grad():
        return float((victim.predict_proba(adv).argmax(1) != clean.argmax(1)).float().mean())


@pytest.mark.parametrize("norm,eps", NORM_EPS)
@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_keeps_bounds_budget_and_moves_clusters(name, norm, eps, images_and_victim):
    images, model = images_and_victim
    n = images.shape[0]
    # The budget is enforced by the counter as a server would: overspending raises.
    victim = CountingVictim(ScoresOnlyVictim(model), budget=n * BUDGET)
    result = make_baseline(name, norm=norm, eps=eps, max_queries=BUDGET).run(victim, images)

    adv = result.adv_images
    assert adv.shape == images.shape and adv.dtype == torch.float32
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    delta = (adv - images).flatten(1)
    bound = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(bound.max()) <= eps + 1e-6
    assert 0 < victim.image_queries <= n * BUDGET
    assert result.info["image_queries"] == victim.image_queries
    assert result.info["calls"] == victim.calls
    with torch.no_grad():
        assert torch.allclose(result.clean_memberships, model.predict_proba(images), atol=1e-6)
    # NES and SPSA get 2 iterations here, so only "some" clusters must move.
    assert _moved(model, result.clean_memberships, adv) >= 0.1


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_more_budget_moves_at_least_as_many(name, images_and_victim):
    images, model = images_and_victim
    small = make_baseline(name, max_queries=BUDGET).run(CountingVictim(model), images)
    large = make_baseline(name, max_queries=3 * BUDGET).run(CountingVictim(model), images)
    assert large.info["image_queries"] > small.info["image_queries"]
    assert _moved(model, large.clean_memberships, large.adv_images) >= _moved(
        model, small.clean_memberships, small.adv_images
    )


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_is_seeded_and_leaves_global_rng_alone(name, images_and_victim):
    images, model = images_and_victim
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    a = make_baseline(name, max_queries=BUDGET, seed=1).run(model, images)
    assert np.random.rand() == expected  # ART draws from numpy's global generator; we restore it
    b = make_baseline(name, max_queries=BUDGET, seed=1).run(model, images)
    assert torch.equal(a.adv_images, b.adv_images)
    assert a.info["image_queries"] is None  # a bare model has no counter: nothing is invented


def test_victim_parameters_untouched(images_and_victim):
    images, model = images_and_victim
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for name in BASELINES:
        make_baseline(name, max_queries=BUDGET).run(CountingVictim(model), images)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
        assert model.get_parameter(key).grad is None


def test_budget_too_small_for_the_run_raises(images_and_victim):
    images, model = images_and_victim
    victim = CountingVictim(model, budget=images.shape[0] * BUDGET // 2)
    with pytest.raises(BudgetExceeded):
        make_baseline("spsa", max_queries=BUDGET).run(victim, images)


def test_memo_predict_queries_each_point_once(images_and_victim):
    images, model = images_and_victim
    victim = CountingVictim(model)
    memo = MemoPredict(victim, batch=16, capacity=1000)
    x = images[:10].numpy()
    memo.pin(x)
    twice = np.concatenate([x, x[:4]])
    out = memo(twice)
    assert victim.image_queries == 10
    np.testing.assert_allclose(out[10:], out[:4])
    memo(np.clip(x + 0.01, 0, 1))
    assert victim.image_queries == 20


def test_query_plan_matches_iterations():
    assert NESConfig(max_queries=22, samples=10).iterations() == 1
    assert SPSAConfig(max_queries=43, samples=10).iterations() == 2
    assert SquareConfig(max_queries=10).iterations() == 8


@pytest.mark.parametrize(
    "config_class,kwargs,message",
    [
        (NESConfig, {"norm": "l1"}, "norm must be one of"),
        (NESConfig, {"eps": 0}, "eps must be a finite number > 0"),
        (NESConfig, {"eps": float("nan")}, "eps must be a finite number > 0"),
        (NESConfig, {"eps": 1.5}, "eps for norm 'linf'"),
        (NESConfig, {"max_queries": 0}, "max_queries must be an integer >= 1"),
        (NESConfig, {"max_queries": 2.5}, "max_queries must be an integer"),
        (NESConfig, {"max_queries": 21, "samples": 10}, "max_queries must be >= 22"),
        (NESConfig, {"samples": 0}, "samples must be an integer >= 1"),
        (NESConfig, {"sigma": -0.1}, "sigma must be a finite number > 0"),
        (NESConfig, {"step_fraction": 1.5}, "step_fraction must lie in"),
        (NESConfig, {"query_batch": 0}, "query_batch must be an integer >= 1"),
        (NESConfig, {"seed": -1}, "seed must be an integer >= 0"),
        (SPSAConfig, {"resolution": 0}, "resolution must be a finite number > 0"),
        (SPSAConfig, {"resolution": 2.0}, "resolution must lie in"),
        (SPSAConfig, {"max_queries": 21, "samples": 10}, "max_queries must be >= 22"),
        (SPSAConfig, {"samples": True}, "samples must be an integer"),
        (SquareConfig, {"p_init": 0}, "p_init must be a finite number > 0"),
        (SquareConfig, {"p_init": 1.2}, "p_init must lie in"),
        (SquareConfig, {"max_queries": 2}, "max_queries must be >= 3"),
        (SquareConfig, {"norm": "l2", "eps": -1.0}, "eps must be a finite number > 0"),
    ],
)
def test_invalid_config_rejected(config_class, kwargs, message):
    with pytest.raises(ValueError, match=message):
        config_class(**kwargs)


def test_make_baseline_and_constructor_validate():
    with pytest.raises(ValueError, match="baseline must be one of"):
        make_baseline("boundary")
    with pytest.raises(ValueError, match="needs a NESConfig"):
        BASELINES["nes"](SquareConfig())
    with pytest.raises(ValueError, match="max_queries must be >= 3"):
        BASELINES["square"](max_queries=1)


def test_wrong_images_rejected(images_and_victim):
    images, model = images_and_victim
    with pytest.raises(ValueError, match="lie in \\[0, 1\\]"):
        make_baseline("square", max_queries=10).run(model, images * 2)
    with pytest.raises(ValueError, match="shape"):
        make_baseline("square", max_queries=10).run(model, images[:, :, :4])


@pytest.mark.slow
def test_benchmark_compare_on_tiny_data(tmp_path):
    bench = load_benchmark("attack_efficiency")
    images, labels, prototypes = make_blobs(200, seed=1)
    model = LinearSoftmaxVictim(prototypes).eval().requires_grad_(False)
    settings = bench.Settings(n_test=40, budgets=(25, 60), train_limit=120, epochs=2, distill_queries=120,
                              sources=("surrogate", "whitebox"))  # fmt: skip
    rows = bench.compare(
        {"linear": model}, images[:160], images[160:], labels[160:], settings,
        generator_changes={"generator_width": 4, "generator_blocks": 1, "discriminator_width": 4,
                           "surrogate.width": 4, "surrogate.distill_epochs": 1, "batch_size": 32},
    )  # fmt: skip
    methods = {(r["method"], r["budget"]) for r in rows}
    assert methods == {("generator-surrogate", "-"), ("generator-whitebox", "-")} | {
        (b, q) for b in ("nes", "spsa", "square") for q in (25, 60)
    }
    for row in rows:
        assert row["linf_max"] <= 0.1 + 1e-6
        if row["kind"] == "baseline":
            assert row["image_queries"] <= 40 * row["budget"]
            assert row["queries_per_new_image"] == row["image_queries"] / 40
        else:
            assert row["queries_per_new_image"] == 0
    ratio = bench.ratios(rows)["linear"]
    gen = next(r for r in rows if r["method"] == "generator-surrogate")
    assert ratio["generator_queries"] == gen["image_queries"]
    assert ratio["baseline_queries"] <= gen["image_queries"] or "cheapest" in ratio["note"]
    assert ratio["ratio"] == pytest.approx(gen["nmi_drop"] / ratio["baseline_drop"])
    best = next(r for r in rows if f"{r['method']}@{r['budget']}" == ratio["baseline"])
    assert ratio["break_even_images"] == math.ceil(gen["image_queries"] / best["queries_per_new_image"])
    fig = bench.efficiency_figure(rows, settings)
    fig.savefig(tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0
    assert "| linear | nes | 25 |" in bench.markdown_table(rows)


def test_vectorised_nes_matches_art_estimator(images_and_victim):
    from art.estimators.classification import QueryEfficientGradientEstimationClassifier

    from clusterattack.attacks.baselines.base import art_classifier
    from clusterattack.attacks.baselines.nes import _nes_estimator

    images, model = images_and_victim
    memo = MemoPredict(model, batch=256, capacity=10_000)
    clf = art_classifier(memo, model.input_shape, model.num_clusters)
    x = images[:6].numpy()
    onehot = np.eye(model.num_clusters, dtype=np.float32)[memo(x).argmax(1)]
    np.random.seed(0)
    art_grad = QueryEfficientGradientEstimationClassifier(clf, num_basis=5, sigma=0.02).loss_gradient(x, onehot)
    np.random.seed(0)
    ours = _nes_estimator(clf, 5, 0.02, 256).loss_gradient(x, onehot)
    assert np.abs(art_grad).max() > 1e-3
    np.testing.assert_allclose(ours, art_grad, atol=1e-6)


@pytest.mark.slow
def test_log_benchmark_writes_rows_table_and_figure(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

    from clusterattack.tracking.benchmarks import log_benchmark

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("CLUSTERATTACK_ARTIFACT_ROOT", str(tmp_path / "artifacts"))
    rows = [
        {"victim": "cc", "method": "nes", "budget": 25, "image_queries": 4400, "nmi_drop": 0.5},
        {"victim": "cc", "method": "generator-surrogate", "budget": "-", "image_queries": 7500, "nmi_drop": 0.3},
    ]
    fig = Figure()
    fig.subplots().plot([1, 2], [0.1, 0.2])
    run_id = log_benchmark("attack_efficiency-test", {"eps": 0.1}, rows, figures={"curve": fig},
                           table_markdown="| a |", summary={"ratio.cc": 0.6})  # fmt: skip
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.data.params["eps"] == "0.1"
    assert run.data.metrics["cc.nes.25.nmi_drop"] == 0.5
    assert run.data.metrics["cc.generator-surrogate.-.image_queries"] == 7500
    assert run.data.metrics["ratio.cc"] == 0.6
    files = {f.path for f in MlflowClient(tracking_uri=uri).list_artifacts(run_id)}
    assert {"rows.csv", "rows.json", "table.md", "figures"} <= files
