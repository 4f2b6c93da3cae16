"""Readers of the CIFAR-10 and CIFAR-100 python-pickle batches (CIFAR-100 as 20 superclasses)."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import numpy as np

from clusterattack.data.dataset import ImageDataset
from clusterattack.data.errors import DatasetFormatError
from clusterattack.data.paths import find_dataset_dir

__all__ = [
    "load_cifar10",
    "load_cifar100",
    "load_cifar10_folder",
    "load_cifar100_folder",
    "load_cifar20",
    "read_cifar_pickle",
]

logger = logging.getLogger(__name__)

CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta")
CIFAR100_FILES = ("train", "test", "meta")
_DATA_ROOT_HINT = "(data root: --root, $CLUSTERATTACK_DATA_DIR or ~/.cache/clusterattack/data)"

# The only globals a CIFAR batch pickle refers to: numpy array reconstruction, and
# _codecs.encode, with which Python 3 writes bytes at protocol 2. numpy 2 moved numpy.core
# to numpy._core; the original batches (written under Python 2) name the old one.
_ALLOWED_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array-rebuilding globals, nothing else."""

    def __init__(self, file, source: Path):
        super().__init__(file, encoding="bytes")  # Python 2 pickles: keep str as bytes
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DatasetFormatError(
                f"{self.source}: refusing to load global {module}.{name} from a CIFAR pickle "
                "(a CIFAR batch holds only dicts, lists, bytes and numpy arrays)"
            )
        if module.startswith("numpy.core") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = module.replace("numpy.core", "numpy._core", 1)
        return super().find_class(module, name)


def read_cifar_pickle(path: str | os.PathLike) -> dict[str, object]:
    """One CIFAR batch or meta file as a dict with ``str`` keys and ``str`` label names.

    CIFAR is distributed as Python pickles: they are the data set's standard format and a
    user's own local files, so reading them with pickle is acceptable here. The unpickler
    still admits only numpy's array-rebuilding globals, so a foreign pickle cannot run code.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, path).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DatasetFormatError(f"{path}: not a readable CIFAR pickle: {err}") from err
    if not isinstance(obj, dict):
        raise DatasetFormatError(f"{path}: expected a dict in the pickle, got {type(obj).__name__}")
    out: dict[str, object] = {}
    for key, value in obj.items():
        key = key.decode("latin1") if isinstance(key, bytes) else str(key)
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode("utf-8") for v in value]
        out[key] = value
    return out


def _batch_arrays(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    batch = read_cifar_pickle(path)
    for key in ("data", label_key):
        if key not in batch:
            raise DatasetFormatError(f"{path}: no {key!r} entry (has {sorted(batch)})")
    data = np.asarray(batch["data"])
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(
            f"{path}: 'data' must be uint8 N x 3072 (32x32 RGB, channel planes row-major), "
            f"got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise DatasetFormatError(
            f"{path}: {data.shape[0]} images but {label_key!r} has shape {labels.shape}"
        )
    # Each row is the R plane, then G, then B, each 32x32 row-major: exactly C x H x W.
    return data.reshape(-1, 3, 32, 32), labels


def _names(meta: dict, key: str, path: Path, count: int) -> tuple[str, ...]:
    names = meta.get(key)
    if not isinstance(names, list) or len(names) != count:
        raise DatasetFormatError(f"{path}: expected {count} names under {key!r}, got {names!r}")
    return tuple(names)


def _assemble(name, pieces, class_names, source) -> ImageDataset:
    images = np.concatenate([p[0] for p in pieces])
    labels = np.concatenate([p[1] for p in pieces])
    split = np.concatenate([np.full(p[1].shape[0], p[2]) for p in pieces])
    bad = labels[(labels < 0) | (labels >= len(class_names))]
    if bad.size:
        raise DatasetFormatError(f"{source}: label {int(bad[0])} outside 0..{len(class_names) - 1}")
    return ImageDataset(name, np.ascontiguousarray(images), labels, split, class_names, source)


def load_cifar10_folder(folder: str | os.PathLike) -> ImageDataset:
    """CIFAR-10 from a ``cifar-10-batches-py`` folder: 50,000 train + 10,000 test, 3x32x32."""
    folder = Path(folder)
    class_names = _names(
        read_cifar_pickle(folder / "batches.meta"), "label_names", folder / "batches.meta", 10
    )
    pieces = []
    for file, split in [(f"data_batch_{i}", "train") for i in range(1, 6)] + [
        ("test_batch", "test")
    ]:
        images, labels = _batch_arrays(folder / file, "labels")
        pieces.append((images, labels, split))
        logger.info("cifar10: read %d images from %s", labels.shape[0], folder / file)
    return _assemble("cifar10", pieces, class_names, f"CIFAR-10 python batches in {folder}")


def load_cifar100_folder(folder: str | os.PathLike, coarse: bool = True) -> ImageDataset:
    """CIFAR-100 from a ``cifar-100-python`` folder, labelled by 20 superclasses or 100 classes.

    ``coarse=True`` (registry name ``cifar20``) uses ``coarse_labels`` and
    ``coarse_label_names``, as deep clustering papers (and the attacked paper) do.
    """
    folder = Path(folder)
    label_key, names_key, count = (
        ("coarse_labels", "coarse_label_names", 20)
        if coarse
        else ("fine_labels", "fine_label_names", 100)
    )
    class_names = _names(read_cifar_pickle(folder / "meta"), names_key, folder / "meta", count)
    pieces = []
    for split in ("train", "test"):
        images, labels = _batch_arrays(folder / split, label_key)
        pieces.append((images, labels, split))
        logger.info("cifar100: read %d images from %s", labels.shape[0], folder / split)
    name = "cifar20" if coarse else "cifar100"
    kind = "20 superclasses" if coarse else "100 classes"
    return _assemble(name, pieces, class_names, f"CIFAR-100 python files in {folder} ({kind})")


def _missing(files):
    return lambda folder: [f for f in files if not (folder / f).is_file()]


def load_cifar10(root=None, path=None) -> ImageDataset:
    """CIFAR-10 (Krizhevsky 2009), looked for in ``path`` or ``<data root>/cifar-10-batches-py``."""
    folder = find_dataset_dir(
        "cifar10",
        root=root,
        path=path,
        subdirs=("cifar-10-batches-py",),
        missing_files=_missing(CIFAR10_FILES),
        how_to_get=(
            "Unpack cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into "
            f"the data root so that <data root>/cifar-10-batches-py/ holds {', '.join(CIFAR10_FILES)} "
            f"{_DATA_ROOT_HINT}."
        ),
    )
    return load_cifar10_folder(folder)


def _find_cifar100(root, path, name) -> Path:
    return find_dataset_dir(
        name,
        root=root,
        path=path,
        subdirs=("cifar-100-python",),
        missing_files=_missing(CIFAR100_FILES),
        how_to_get=(
            "Unpack cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into "
            "the data root so that <data root>/cifar-100-python/ holds train, test and meta "
            f"{_DATA_ROOT_HINT}."
        ),
    )


def load_cifar20(root=None, path=None) -> ImageDataset:
    """CIFAR-100 with its 20 superclasses as labels (the clustering benchmark 'CIFAR-20')."""
    return load_cifar100_folder(_find_cifar100(root, path, "cifar20"), coarse=True)


def load_cifar100(root=None, path=None) -> ImageDataset:
    """CIFAR-100 with its 100 fine classes as labels."""
    return load_cifar100_folder(_find_cifar100(root, path, "cifar100"), coarse=False)
