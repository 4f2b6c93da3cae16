"""Detection and PCA analyses end to end on tiny victims and generators (no data set read)."""

from __future__ import annotations

import numpy as np
import pytest

from clusterattack.analyses import DetectionConfig, PCAConfig, run_detection, run_pca
from clusterattack.analyses.common import LoadedGenerator
from clusterattack.attacks import train_generator
from tests.analyses.conftest import make_blobs, tiny_attack


@pytest.fixture
def generator(blobs, victims) -> LoadedGenerator:
    config = tiny_attack(eps=0.3)
    result = train_generator(victims["a"], blobs[0], config, progress=False)
    return LoadedGenerator(result.generator, config, "tiny.pt", result.image_queries, {"victim": "a"})


@pytest.mark.parametrize("clusters", ["kmeans", "victim"])
def test_detection_follows_the_protocol(victims, generator, clusters):
    images, _, _ = make_blobs(1000, seed=0)  # the same prototypes as the victims'
    train, test = images[:600], images[600:]
    config = DetectionConfig(
        dataset="blobs", victim="a", generator="tiny.pt", images=400, trials=20, fit_images=400, heldout_images=200,
        clusters=clusters,
    )
    result = run_detection(config, victim=victims["a"], generator=generator, data=(train, test))
    p = result.payload
    assert result.kind == "detection"
    assert (p["images"], p["trials"], p["target_fpr"], p["eps"], p["norm"]) == (400, 20, 0.05, 0.3, "linf")
    for key in ("detection_rate_mean", "detection_rate_std", "fpr_mean", "fpr_std"):
        assert 0 <= p[key] <= 1
    assert p["fpr_mean"] < 0.2
    assert p["linf_mean"] <= 0.3 + 1e-6
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
