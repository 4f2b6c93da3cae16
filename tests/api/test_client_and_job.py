"""AlbumClient against the live service, and the whole API attack job end to end on digits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clusterattack.api.client import AlbumClient
from clusterattack.api.errors import AlbumFull, AlbumNotFound
from clusterattack.api.grouping import first_appearance_ids
from clusterattack.serving.errors import BudgetExceeded, Unauthorized
from tests.api.conftest import KMEANS_APP, MAX_PER_ALBUM, MAX_PER_REQUEST
from tests.api.tiny_models import PrototypeModel, make_blobs

pytestmark = pytest.mark.slow


def test_client_clusters_images_in_their_order_and_counts_every_call(album_env):
    key, key_id = album_env.new_key()
    images, _ = make_blobs(MAX_PER_ALBUM, seed=5)  # more than one request takes: split in two
    with AlbumClient(album_env.url(), key) as client:
        groups = client.cluster(images)
        expected = PrototypeModel().predict_proba(images).argmax(1).numpy()
        np.testing.assert_array_equal(groups, first_appearance_ids(expected))
        counts = client.counts()
        assert counts["image_queries"] == MAX_PER_ALBUM == album_env.used(key_id)
        assert counts["calls.add"] == 2 and MAX_PER_ALBUM > MAX_PER_REQUEST
        assert {counts[f"calls.{e}"] for e in ("create", "group", "detail", "delete")} == {1}
        assert client.list_albums() == []  # cluster() deleted its album
        assert client.budget()["remaining"] == 1000 - MAX_PER_ALBUM


def test_client_raises_the_services_typed_errors(album_env):
    key, _ = album_env.new_key(budget=MAX_PER_ALBUM + 4)
    with AlbumClient(album_env.url(), key) as client:
        token = client.create_album("full")
        client.add_images(token, make_blobs(MAX_PER_ALBUM)[0])
        with pytest.raises(AlbumFull, match="room for 0 more"):
            client.add_images(token, make_blobs(1)[0])
        with pytest.raises(AlbumNotFound):
            client.detail("alb_nope")
        other = client.create_album()
        with pytest.raises(BudgetExceeded) as refused:
            client.add_images(other, make_blobs(5)[0])
        assert refused.value.remaining == 4
        with pytest.raises(ValueError, match="float array N x C x H x W"):
            client.add_images(other, np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(Unauthorized), AlbumClient(album_env.url(), "ca_wrong-key") as client:
        client.info()


def test_api_attack_job_end_to_end_on_digits(album_env, mlflow_uri, tmp_path):
    """Surrogate CC and generator trained offline, then albums through the live service."""
    from clusterattack import tracking
    from jobs.api_attack import main

    key, key_id = album_env.new_key(budget=200)
    out = tmp_path / "out"
    code = main([
        "--dataset", "digits", "--url", album_env.url(), "--api-key", key,
        "--service-model", "tiny-prototype-model", "--surrogate-epochs", "1",
        "--surrogate-train-limit", "256", "--surrogate-width", "4", "--attack-epochs", "1",
        "--attack-train-limit", "256", "--eps", "0.1", "--draws", "2", "--per-class", "3",
        "--seed", "1", "--threads", "1", "--out", str(out), "--quiet",
    ])
    assert code == 0
    record = json.loads((out / "record.json").read_text())
    assert record["service"]["model"] == "tiny-prototype-model"
    assert record["config"]["attack.gradient_source"] == "whitebox"
    assert record["counts"]["image_queries"] == 2 * 2 * 30 == album_env.used(key_id)
    assert record["counts"]["calls.create"] == 4 and record["counts"]["calls.add"] == 4
    assert len(record["draws"]) == 2
    for row in record["draws"]:
        assert row["linf_max"] <= 0.1 + 1e-6
        assert sum(row["group_sizes_pre"]) == sum(row["group_sizes_post"]) == 30
        assert 0.0 <= row["nmi_pre"] <= 1.0 and 0.0 <= row["nmi_post"] <= 1.0
    summary = record["summary"]
    assert summary["nmi_pre_mean"] == pytest.approx(np.mean([r["nmi_pre"] for r in record["draws"]]))
    table = (out / "table.md").read_text()
    assert "| NMI |" in table and "draw 1:" in table
    runs = tracking.client().search_runs(
        [tracking.ensure_experiment("api_attack")], filter_string="tags.service_model = 'tiny-prototype-model'"
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["service.model"] == "tiny-prototype-model"
    assert run.data.metrics["image_queries"] == 120 and "nmi_post_mean" in run.data.metrics
    # (create, add, group, detail, delete) x 2 albums x 2 draws, and one info call for the limits
    assert run.data.metrics["calls"] == 21 and run.data.metrics["calls.info"] == 1


def test_a_throwaway_service_refuses_to_start_where_serve_already_runs(album_env):
    from clusterattack.api.launch import local_album_service

    with pytest.raises(RuntimeError, match="Serve already runs"), local_album_service(PrototypeModel(), budget=1):
        pass


def test_api_attack_job_runs_on_an_image_folder(album_env, mlflow_uri, tmp_path):
    """Any image-folder data set (one folder per person, as Extended Yale B) goes through the job."""
    from PIL import Image

    from jobs.api_attack import main

    images, labels = make_blobs(60, seed=7)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = tmp_path / "people" / f"person{int(label):02d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (image[0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((16, 16)).save(folder / f"img{i:03d}.png")
    key, key_id = album_env.new_key(budget=100)
    out = tmp_path / "out"
    code = main([
        "--dataset", f"folder:{tmp_path / 'people'}", "--dataset-option", "size=8",
        "--url", album_env.url(KMEANS_APP), "--api-key", key, "--surrogate-epochs", "1",
        "--surrogate-width", "4", "--attack-epochs", "1", "--draws", "2", "--per-class", "3",
        "--threads", "1", "--out", str(out), "--no-mlflow", "--quiet",
    ])
    assert code == 0
    record = json.loads((out / "record.json").read_text())
    assert record["config"]["dataset_options"] == [["size", 8]]
    assert record["counts"]["image_queries"] == 2 * 2 * 9 == album_env.used(key_id)
    assert all(sum(row["group_sizes_pre"]) == 9 for row in record["draws"])
    assert record["service"]["model"] == "unknown"  # pointed at a URL: the attacker is not told


def test_the_job_refuses_bad_settings_before_any_work(capsys):
    from jobs.api_attack import main

    assert main(["--dataset", "digits", "--url", "http://127.0.0.1:1/albums"]) == 2
    assert "--api-key is required" in capsys.readouterr().err
    assert main(["--dataset", "digits", "--draws", "0"]) == 2
    assert "draws must be an integer >= 1" in capsys.readouterr().err
    assert main(["--dataset", "digits", "--dataset-option", "size=8"]) == 2
    assert "does not take option(s) ['size']" in capsys.readouterr().err
