"""Transfer matrices and norm curves on tiny linear victims: shapes, diagonal, config checks, Ray."""

from __future__ import annotations

import numpy as np
import pytest

from clusterattack.analyses import NormCurvesConfig, TransferConfig, run_norm_curves, run_transfer
from clusterattack.analyses.common import attack_pool_size, resolve_generator
from clusterattack.attacks import evaluate_generator
from tests.analyses.conftest import tiny_attack


def _transfer_config(tmp_path, **changes) -> TransferConfig:
    base = dict(
        dataset="blobs",
        targets=("a", "b"),
        eps=0.2,
        attack=tiny_attack(),
        out_dir=str(tmp_path / "gens"),
        use_ray=False,
        progress=False,
    )
    base.update(changes)
    return TransferConfig(**base)


def test_matrix_shape_and_diagonal_match_direct_evaluation(tmp_path, blobs, victims):
    train, test, labels, _ = blobs
    result = run_transfer(_transfer_config(tmp_path), victims=victims, data=(train, test, labels))
    p = result.payload
    assert p["sources"] == ["a", "b"] and p["targets"] == ["a", "b"]
    for metric in ("nmi", "ari", "acc"):
        assert np.asarray(p["post"][metric]).shape == (2, 2)
    assert p["test_images"] == test.shape[0]
    assert p["image_queries"] > 0 and set(p["generators"]) == {"a", "b"}
    assert p["image_queries_applying"] == 0 and "training" in p["image_queries_meaning"]
    for i, name in enumerate(("a", "b")):
        gen = resolve_generator(p["generators"][name])
        direct, _ = evaluate_generator(victims[name], gen.generator, test, labels, gen.config.override(eps=0.2), figures=False)
        assert p["post"]["nmi"][i][i] == pytest.approx(direct["nmi_post"], abs=1e-9)
        assert p["pre"][name]["nmi"] == pytest.approx(direct["nmi_pre"], abs=1e-9)
    assert len(result.tables["transfer_pairs"]) == 4
    for row in result.tables["transfer_pairs"]:
        # The bound holds for every image, not on average: the max, with float32 slack only.
        assert 0 < row["linf_mean"] <= row["linf_max"] <= 0.2 + 1e-6
    assert set(result.figures) == {"transfer_nmi", "transfer_ari", "transfer_acc"}
    assert "pre-attack" in result.matrix_text()


def test_given_generator_is_used_and_not_retrained(tmp_path, blobs, victims):
    train, test, labels, _ = blobs
    first = run_transfer(_transfer_config(tmp_path, sources=("a",)), victims=victims, data=(train, test, labels))
    path = first.payload["generators"]["a"]
    again = run_transfer(
        _transfer_config(tmp_path, sources=("a",), generators={"a": path}, train_missing=False),
        victims=victims,
        data=(train, test, labels),
    )
    assert again.payload["generators"] == {"a": path}
    assert again.payload["post"]["nmi"] == first.payload["post"]["nmi"]


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"targets": ()}, "targets"),
        ({"eps": -0.1}, "eps"),
        ({"norm": "l1"}, "norm"),
        ({"eps": 2.0}, "linf"),
        ({"generators": {"z": "x.pt"}}, "not sources"),
        ({"train_missing": False}, "no generator"),
        ({"test_limit": 1}, "test_limit"),
    ],
)
def test_bad_transfer_config_is_rejected(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        _transfer_config(tmp_path, **changes)


def test_attack_pool_size_covers_the_surrogate_distillation():
    # Known values, not the formula: a surrogate distilling on 1,000 queried images needs
    # 1,000 training images even when the generator trains on 320.
    whitebox = tiny_attack(train_limit=320)
    surrogate = whitebox.override(gradient_source="surrogate", **{"surrogate.distill_queries": 1000})
    assert attack_pool_size(whitebox) == 320
    assert attack_pool_size(surrogate) == 1000
    assert attack_pool_size(surrogate.override(train_limit=2000)) == 2000
    assert attack_pool_size(surrogate.override(gradient_source="estimate")) == 320
    assert attack_pool_size(surrogate.override(train_limit=None)) is None


def test_unknown_generator_reference_names_the_value():
    with pytest.raises(ValueError, match="no-such-thing"):
        resolve_generator("no-such-thing")


def test_norm_curves_rows_cover_every_victim_and_eps(blobs, victims):
    train, test, labels, _ = blobs
    config = NormCurvesConfig(
        dataset="blobs", victims=("a", "b"), eps_values=(0.3, 0.05), attack=tiny_attack(), use_ray=False, progress=False
    )
    result = run_norm_curves(config, victims=victims, data=(train, test, labels))
    rows = result.payload["rows"]
    assert [(r["victim"], r["eps"]) for r in rows] == [("a", 0.05), ("a", 0.3), ("b", 0.05), ("b", 0.3)]
    for r in rows:
        assert 0 < r["linf_mean"] <= r["linf_max"] <= r["eps"] + 1e-6
        assert r["image_queries"] > 0 and r["gradient_source"] == "whitebox"
        assert {"nmi_pre", "ari_pre", "acc_pre", "nmi_post", "ari_post", "acc_post", "l2_mean"} <= set(r)
    assert result.payload["gradient_source"] == "whitebox"
    assert "norm_curves" in result.figures


def test_bad_norm_curves_config_is_rejected():
    with pytest.raises(ValueError, match="eps_values"):
        NormCurvesConfig(dataset="blobs", victims=("a",), eps_values=(0.1, -1.0))
    with pytest.raises(ValueError, match="victims"):
        NormCurvesConfig(dataset="blobs", victims=())


@pytest.mark.slow
def test_transfer_fans_out_as_ray_tasks(ray_session, tmp_path, blobs, victims):
    """Ray and in-process runs give the same matrix (same seeds, same functions)."""
    import cloudpickle

    import tests.analyses.conftest as helpers

    cloudpickle.register_pickle_by_value(helpers)
    try:
        train, test, labels, _ = blobs
        local = run_transfer(_transfer_config(tmp_path / "l"), victims=victims, data=(train, test, labels))
        remote = run_transfer(_transfer_config(tmp_path / "r", use_ray=True), victims=victims, data=(train, test, labels))
    finally:
        cloudpickle.unregister_pickle_by_value(helpers)
    np.testing.assert_allclose(remote.payload["post"]["nmi"], local.payload["post"]["nmi"], atol=1e-6)
    assert remote.payload["pre"] == local.payload["pre"]
