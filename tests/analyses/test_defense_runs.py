"""Detection and PCA analyses end to end on tiny victims and generators (no data set read)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clusterattack.analyses import DetectionConfig, PCAConfig, run_detection, run_pca
from clusterattack.analyses.common import LoadedGenerator
from clusterattack.attacks import train_generator
from clusterattack.defenses.ssd import detection_trials
from tests.analyses.conftest import make_blobs, tiny_attack


@pytest.fixture
def generator(blobs, victims) -> LoadedGenerator:
    config = tiny_attack(eps=0.3)
    result = train_generator(victims["a"], blobs[0], config, progress=False)
    return LoadedGenerator(result.generator, config, "tiny.pt", result.image_queries, {"victim": "a"})


@pytest.mark.parametrize("clusters", ["kmeans", "victim"])
def test_detection_follows_the_protocol(victims, generator, clusters):
    # Clean images close to the victims' prototypes (noise 0.05 instead of the training
    # blobs' 0.25): an L-inf perturbation of up to 0.3 takes an image far off that
    # manifold, so SSD must catch nearly all of them while flagging about target_fpr of
    # the clean ones (measured: detection 1.00, FPR 0.03 in both cluster modes).
    images, _, _ = make_blobs(1000, noise=0.05, seed=0)  # the same prototypes as the victims'
    train, test = images[:600], images[600:]
    config = DetectionConfig(
        dataset="blobs", victim="a", generator="tiny.pt", images=400, trials=20, fit_images=400, heldout_images=200,
        clusters=clusters,
    )
    result = run_detection(config, victim=victims["a"], generator=generator, data=(train, test))
    p = result.payload
    assert result.kind == "detection"
    assert (p["images"], p["trials"], p["target_fpr"], p["eps"], p["norm"]) == (400, 20, 0.05, 0.3, "linf")
    assert p["detection_rate_mean"] >= 0.9
    assert p["fpr_mean"] <= 0.15  # calibrated at 5 % on 200 held-out images
    # The trials redraw which images are perturbed; their means are the flagged fractions.
    assert p["detection_rate_mean"] == pytest.approx(p["flagged_adv_fraction"], abs=0.05)
    assert p["fpr_mean"] == pytest.approx(p["flagged_clean_fraction"], abs=0.05)
    # A detector that flags at random at the same rate scores detection == FPR: the bar
    # above is far out of its reach (seeded control, the same protocol).
    rng = np.random.default_rng(0)
    rate = max(p["flagged_clean_fraction"], 0.05)
    random_flags = detection_trials(rng.random(400) < rate, rng.random(400) < rate, images=400, trials=20, seed=0)
    assert random_flags["detection_rate_mean"] - random_flags["fpr_mean"] < 0.1
    assert p["detection_rate_mean"] - p["fpr_mean"] > 0.7
    # What is caught is the perturbation: at a hundredth of its size hardly anything is.
    faint = run_detection(
        dataclasses.replace(config, eps=0.003), victim=victims["a"], generator=generator, data=(train, test)
    ).payload
    assert faint["detection_rate_mean"] <= faint["fpr_mean"] + 0.1
    assert 0 < p["linf_mean"] <= p["linf_max"] <= 0.3 + 1e-6
    assert 0 < faint["linf_max"] <= 0.003 + 1e-6
    assert "ssd_scores" in result.figures
    assert p["clusters"] == clusters and p["image_queries"] == generator.image_queries


def test_detection_config_rejects_bad_values():
    with pytest.raises(ValueError, match="target_fpr"):
        DetectionConfig(dataset="d", victim="a", generator="g", target_fpr=0.0)
    with pytest.raises(ValueError, match="clusters"):
        DetectionConfig(dataset="d", victim="a", generator="g", clusters="spectral")
    with pytest.raises(ValueError, match="eps"):
        DetectionConfig(dataset="d", victim="a", generator="g", eps=-1.0)


def test_pca_payload_and_points(tmp_path, blobs, generator):
    config = PCAConfig(dataset="blobs", generator="tiny.pt", images=150, out_dir=str(tmp_path))
    result = run_pca(config, generator=generator, images=blobs[1])
    p = result.payload
    assert len(p["explained_variance"]) == 3 and 0.4 <= p["overlap"] <= 1.0
    assert p["points"] == "pca/points.npz" and p["victim"] == "a"
    points = np.load(result.files["pca/points.npz"])
    assert points["clean"].shape == (150, 3) and points["adv"].shape == (150, 3)
    with pytest.raises(ValueError, match="images"):
        PCAConfig(dataset="d", generator="g", images=5000)
