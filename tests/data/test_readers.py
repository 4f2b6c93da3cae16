"""Readers on tiny files written in the real formats: IDX, CIFAR pickles, STL-10 binary, folders."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from clusterattack.data import (
    DatasetFormatError,
    DatasetNotFound,
    UnknownDataset,
    list_datasets,
    load_dataset,
)
from clusterattack.data.cifar import read_cifar_pickle
from clusterattack.data.idx import FASHION_MNIST_CLASSES, FASHION_MNIST_SYSTEM_DIR, read_idx
from tests.data.formats import (
    write_cifar10_folder,
    write_cifar100_folder,
    write_idx,
    write_idx_folder,
    write_image,
    write_stl10_folder,
)

# ---- IDX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_reads_train_then_test(data_dir, rng, gz):
    arrays = write_idx_folder(data_dir / "fashion-mnist", rng, gz=gz)
    ds = load_dataset("fashion_mnist")
    assert ds.images.shape == (18, 1, 6, 5) and ds.images.dtype == np.uint8
    np.testing.assert_array_equal(ds.images[:12, 0], arrays["train"][0])
    np.testing.assert_array_equal(ds.images[12:, 0], arrays["t10k"][0])
    np.testing.assert_array_equal(ds.labels[12:], arrays["t10k"][1])
    assert ds.split.tolist() == ["train"] * 12 + ["test"] * 6
    assert ds.class_names == FASHION_MNIST_CLASSES
    assert str(data_dir / "fashion-mnist") in ds.source


def test_mnist_reads_dotted_file_names_from_path_option(tmp_path, rng):
    folder = tmp_path / "anywhere"
    arrays = write_idx_folder(folder, rng, gz=False)
    for f in folder.iterdir():  # some mirrors name them train-images.idx3-ubyte
        f.rename(f.with_name(f.name.replace("-idx", ".idx")))
    ds = load_dataset("mnist", path=folder)
    assert ds.name == "mnist" and ds.class_names == tuple("0123456789")
    np.testing.assert_array_equal(ds.images[:12, 0], arrays["train"][0])


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DatasetFormatError, match="not an IDX file"):
        read_idx(bad)
    short = write_idx(tmp_path / "short", np.zeros((4, 2, 2), np.uint8), gz=False)
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(DatasetFormatError, match=r"shape \(4, 2, 2\).*file has"):
        read_idx(short)


def test_idx_labels_count_must_match_images(data_dir, rng):
    write_idx_folder(data_dir / "mnist", rng, gz=True)
    write_idx(data_dir / "mnist" / "t10k-labels-idx1-ubyte", np.zeros(5, np.uint8), gz=True)
    with pytest.raises(DatasetFormatError, match="expected 6 labels"):
        load_dataset("mnist")


def test_real_fashion_mnist_from_debian_package():
    ds = load_dataset("fashion_mnist", path=FASHION_MNIST_SYSTEM_DIR)
    assert len(ds) == 70_000 and ds.shape == (1, 28, 28)
    assert np.bincount(ds.labels).tolist() == [7_000] * 10
    assert int((ds.split == "test").sum()) == 10_000


# ---- CIFAR ----------------------------------------------------------------------------------


def test_cifar10_batches(data_dir, rng):
    images, labels = write_cifar10_folder(data_dir / "cifar-10-batches-py", rng)
    ds = load_dataset("cifar10")
    assert ds.images.shape == (24, 3, 32, 32)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.split.tolist() == ["train"] * 20 + ["test"] * 4
    assert ds.class_names == tuple(f"class{i}" for i in range(10))


def test_cifar20_uses_superclasses_and_cifar100_fine_classes(data_dir, rng):
    written = write_cifar100_folder(data_dir / "cifar-100-python", rng)
    coarse = load_dataset("cifar20")
    assert coarse.num_classes == 20 and coarse.class_names[3] == "super3"
    np.testing.assert_array_equal(coarse.labels[:6], written["train"][2])
    np.testing.assert_array_equal(coarse.images[6:], written["test"][0])
    fine = load_dataset("cifar100")
    assert fine.num_classes == 100
    np.testing.assert_array_equal(fine.labels[6:], written["test"][1])


def test_cifar_pickle_with_foreign_globals_is_refused(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            # os.system rather than print: Ray replaces builtins.print once imported in the
            # process, and the pickle would then name Ray's function instead.
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(DatasetFormatError, match=r"refusing to load global (posix|os)\.system"):
        read_cifar_pickle(path)
    assert not marker.exists()


def test_cifar_batch_with_wrong_image_size(data_dir, rng):
    folder = data_dir / "cifar-10-batches-py"
    write_cifar10_folder(folder, rng)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f, protocol=2)
    with pytest.raises(DatasetFormatError, match=r"uint8 N x 3072.*\(4, 100\)"):
        load_dataset("cifar10")


# ---- STL-10 ---------------------------------------------------------------------------------


def test_stl10_column_major_images_and_one_based_labels(data_dir, rng):
    written = write_stl10_folder(data_dir / "stl10_binary", rng)
    ds = load_dataset("stl10")
    assert ds.images.shape == (5, 3, 96, 96)
    np.testing.assert_array_equal(ds.images[:3], written["train"][0])
    np.testing.assert_array_equal(ds.images[3:], written["test"][0])
    np.testing.assert_array_equal(ds.labels[3:], written["test"][1].astype(int) - 1)
    assert ds.class_names[0] == "airplane" and ds.num_classes == 10


def test_stl10_truncated_image_file(data_dir, rng):
    folder = data_dir / "stl10_binary"
    write_stl10_folder(folder, rng)
    (folder / "test_X.bin").write_bytes((folder / "test_X.bin").read_bytes()[:-1])
    with pytest.raises(DatasetFormatError, match="not a whole number of 3x96x96 images"):
        load_dataset("stl10")


# ---- image folders --------------------------------------------------------------------------


def _yale_like(top, rng, people=3, per_person=5, side=(12, 10)):
    """CroppedYale-style folders of 8-bit PGM faces, plus an ambient image per person."""
    faces = {}
    for p in range(1, people + 1):
        person = f"yaleB{p:02d}"
        for i in range(per_person):
            img = rng.integers(0, 256, size=side, dtype=np.uint8)
            write_image(top / person / f"{person}_P00A+{i:03d}E+00.pgm", img)
            faces[(person, i)] = img
        write_image(top / person / f"{person}_P00_Ambient.pgm", np.zeros(side, np.uint8))
    return faces


def test_image_folder_pgm_people_with_seeded_split(tmp_path, rng):
    top = tmp_path / "CroppedYale"
    faces = _yale_like(top, rng)
    ds = load_dataset(f"folder:{top}", exclude=["*Ambient*"], test_fraction=0.4, seed=3)
    assert ds.images.shape == (15, 1, 12, 10)
    assert ds.class_names == ("yaleB01", "yaleB02", "yaleB03")
    np.testing.assert_array_equal(ds.images[0, 0], faces[("yaleB01", 0)])
    assert np.bincount(ds.labels[ds.split == "test"]).tolist() == [2, 2, 2]
    again = load_dataset(f"folder:{top}", exclude=["*Ambient*"], test_fraction=0.4, seed=3)
    np.testing.assert_array_equal(ds.split, again.split)
    assert "seed=3" in ds.source


def test_image_folder_resize_and_max_per_class(tmp_path, rng):
    top = tmp_path / "faces"
    _yale_like(top, rng, per_person=4, side=(24, 20))
    ds = load_dataset(f"folder:{top}", size=(8, 6), max_per_class=3, exclude="*Ambient*")
    assert ds.images.shape == (9, 1, 8, 6)
    assert np.bincount(ds.labels).tolist() == [3, 3, 3]


def test_image_folder_train_test_layout_rgb_png(tmp_path, rng):
    top = tmp_path / "pets"
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                write_image(
                    top / split / cls / f"{i}.png",
                    rng.integers(0, 256, size=(7, 9, 3), dtype=np.uint8),
                )
    ds = load_dataset(f"folder:{top}")
    assert ds.images.shape == (10, 3, 7, 9)
    assert ds.class_names == ("cat", "dog")
    assert (ds.split == "train").sum() == 6 and (ds.split == "test").sum() == 4
    assert "train/ and test/ folders" in ds.source


def test_image_folder_mixed_sizes_need_size_option(tmp_path):
    top = tmp_path / "mixed"
    write_image(top / "a" / "1.png", np.zeros((4, 4), np.uint8))
    write_image(top / "b" / "1.png", np.zeros((5, 4), np.uint8))
    with pytest.raises(DatasetFormatError, match=r"2 different sizes.*pass size="):
        load_dataset(f"folder:{top}")
    assert load_dataset(f"folder:{top}", size=4).images.shape == (2, 1, 4, 4)


def test_image_folder_gray_and_rgb_mixed_becomes_rgb(tmp_path):
    top = tmp_path / "mixed_color"
    write_image(top / "a" / "1.png", np.full((4, 4), 200, np.uint8))
    write_image(top / "b" / "1.png", np.zeros((4, 4, 3), np.uint8))
    ds = load_dataset(f"folder:{top}")
    assert ds.images.shape == (2, 3, 4, 4)
    assert (ds.images[0] == 200).all()


# ---- missing data sets, registry ------------------------------------------------------------


def test_missing_fashion_mnist_says_apt_get(data_dir):
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion_mnist", path=data_dir / "nowhere")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("cifar10", r"cifar-10-batches-py/ holds data_batch_1"),
        ("cifar20", r"cifar-100-python/ holds train, test and meta"),
        ("stl10", r"stl10_binary/ holds train_X.bin"),
        ("mnist", r"train-images-idx3-ubyte.*<data root>/mnist"),
    ],
)
def test_missing_user_datasets_say_where_to_put_files(data_dir, name, expected):
    with pytest.raises(DatasetNotFound, match=expected) as info:
        load_dataset(name)
    assert str(data_dir) in str(info.value)  # the folders looked in are listed


def test_partial_folder_lists_missing_files(data_dir, rng):
    write_cifar10_folder(data_dir / "cifar-10-batches-py", rng)
    (data_dir / "cifar-10-batches-py" / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFound, match="missing data_batch_4"):
        load_dataset("cifar10")


def test_missing_image_folder(tmp_path):
    with pytest.raises(DatasetNotFound, match="one sub-folder per class"):
        load_dataset(f"folder:{tmp_path / 'absent'}")


def test_explicit_root_beats_environment(data_dir, tmp_path, rng):
    other = tmp_path / "other_root"
    write_idx_folder(other / "mnist", rng, gz=True, n_train=2, n_test=1)
    assert len(load_dataset("mnist", root=other)) == 3
    with pytest.raises(DatasetNotFound):
        load_dataset("mnist")  # $CLUSTERATTACK_DATA_DIR (data_dir) is empty


def test_registry_names_and_errors():
    assert {"fashion_mnist", "mnist", "mnist5k", "digits", "cifar10", "cifar20", "stl10"} <= set(
        list_datasets()
    )
    with pytest.raises(UnknownDataset, match="unknown data set 'imagenet'; known: cifar10"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"does not take option\(s\) \['size'\]"):
        load_dataset("digits", size=4)


def test_cifar_pickle_naming_old_numpy_core_module(tmp_path, rng):
    # The original batches were pickled under numpy 1, whose arrays name numpy.core.multiarray.
    x = rng.integers(0, 256, size=(2, 3072), dtype=np.uint8)
    raw = pickle.dumps({b"data": x, b"labels": [1, 2]}, protocol=2)
    assert b"numpy._core.multiarray" in raw
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    batch = read_cifar_pickle(path)
    np.testing.assert_array_equal(batch["data"], x)
    assert batch["labels"] == [1, 2]


def test_image_folder_16_bit_keeps_high_byte_and_relative_path_uses_data_root(data_dir):
    values = np.array([[0, 256, 65535], [4096, 512, 1024]], dtype=np.uint16)
    write_image(data_dir / "scans" / "p1" / "a.png", values)
    ds = load_dataset("folder:scans")  # not in the working directory: found in the data root
    np.testing.assert_array_equal(ds.images[0, 0], (values >> 8).astype(np.uint8))
