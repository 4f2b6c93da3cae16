"""Reader of the STL-10 binary release (stl10_binary/: 3x96x96 column-major images, labels 1..10)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from clusterattack.data.dataset import ImageDataset
from clusterattack.data.errors import DatasetFormatError
from clusterattack.data.paths import find_dataset_dir

__all__ = ["STL10_FILES", "load_stl10", "load_stl10_folder", "read_stl10_images"]

logger = logging.getLogger(__name__)

STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")
STL10_SIDE = 96


def read_stl10_images(path: str | os.PathLike) -> np.ndarray:
    """Images of one ``*_X.bin`` file as uint8 N x 3 x 96 x 96 (row-major, i.e. C x H x W)."""
    path = Path(path)
    raw = np.fromfile(path, dtype=np.uint8)
    per_image = 3 * STL10_SIDE * STL10_SIDE
    if raw.size % per_image:
        raise DatasetFormatError(
            f"{path}: {raw.size} bytes is not a whole number of 3x96x96 images ({per_image} bytes each)"
        )
    # Each channel plane is stored column-major (Matlab order): the file's axes are C, W, H.
    return np.ascontiguousarray(raw.reshape(-1, 3, STL10_SIDE, STL10_SIDE).transpose(0, 1, 3, 2))


def load_stl10_folder(folder: str | os.PathLike) -> ImageDataset:
    """The labelled part of STL-10 (5,000 train + 8,000 test); ``unlabeled_X.bin`` is not read."""
    folder = Path(folder)
    class_names = tuple(
        line.strip()
        for line in (folder / "class_names.txt").read_text(encoding="utf-8").splitlines()
        if line.strip()
    )
    parts_x, parts_y, parts_split = [], [], []
    for split in ("train", "test"):
        images = read_stl10_images(folder / f"{split}_X.bin")
        labels = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64)
        if labels.shape[0] != images.shape[0]:
            raise DatasetFormatError(
                f"{folder / f'{split}_y.bin'}: {labels.shape[0]} labels for {images.shape[0]} "
                f"images in {split}_X.bin"
            )
        if labels.size and (labels.min() < 1 or labels.max() > len(class_names)):
            raise DatasetFormatError(
                f"{folder / f'{split}_y.bin'}: labels must lie in 1..{len(class_names)} "
                f"(one per line of class_names.txt), got {labels.min()}..{labels.max()}"
            )
        parts_x.append(images)
        parts_y.append(labels - 1)  # the release numbers classes from 1
        parts_split.append(np.full(labels.shape[0], split))
        logger.info("stl10: read %d %s images from %s", labels.shape[0], split, folder)
    return ImageDataset(
        name="stl10",
        images=np.concatenate(parts_x),
        labels=np.concatenate(parts_y),
        split=np.concatenate(parts_split),
        class_names=class_names,
        source=f"STL-10 binary files in {folder} (labelled train + test)",
    )


def load_stl10(root=None, path=None) -> ImageDataset:
    """STL-10 (Coates et al. 2011), looked for in ``path`` or ``<data root>/stl10_binary``."""
    folder = find_dataset_dir(
        "stl10",
        root=root,
        path=path,
        subdirs=("stl10_binary",),
        missing_files=lambda f: [n for n in STL10_FILES if not (f / n).is_file()],
        how_to_get=(
            "Unpack stl10_binary.tar.gz (https://cs.stanford.edu/~acoates/stl10/) into the data "
            f"root so that <data root>/stl10_binary/ holds {', '.join(STL10_FILES)} (data root: "
            "--root, $CLUSTERATTACK_DATA_DIR or ~/.cache/clusterattack/data)."
        ),
    )
    return load_stl10_folder(folder)
