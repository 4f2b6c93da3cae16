"""Writers of tiny files in the real on-disk formats (independent of the readers under test)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """An IDX file as LeCun's spec defines it: 0, 0, type 0x08 (ubyte), ndim, big-endian dims."""
    array = np.asarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_idx_folder(folder: Path, rng: np.random.Generator, gz: bool, n_train=12, n_test=6):
    """An MNIST-style folder; images 6x5 (not square, so a transposition would show)."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        arrays[prefix] = (images, labels)
    return arrays


def _dump_py2_style(path: Path, obj: dict) -> None:
    # The CIFAR batches were pickled by Python 2: str keys and names arrive as bytes.
    def to_bytes(value):
        if isinstance(value, str):
            return value.encode()
        if isinstance(value, list):
            return [to_bytes(v) for v in value]
        return value

    with open(path, "wb") as f:
        pickle.dump({k.encode(): to_bytes(v) for k, v in obj.items()}, f, protocol=2)


def write_cifar10_folder(folder: Path, rng: np.random.Generator, per_batch: int = 4):
    """cifar-10-batches-py with 5 data batches and a test batch of ``per_batch`` images each."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"class{i}" for i in range(10)]
    _dump_py2_style(
        folder / "batches.meta",
        {"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072},
    )
    images, labels = [], []
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        x = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        _dump_py2_style(
            folder / file,
            {
                "batch_label": file,
                "labels": y,
                "data": x.reshape(per_batch, 3072),  # R plane, G plane, B plane
                "filenames": [f"{file}_{i}.png" for i in range(per_batch)],
            },
        )
        images.append(x)
        labels += y
    return np.concatenate(images), np.array(labels)


def write_cifar100_folder(folder: Path, rng: np.random.Generator, n_train=6, n_test=4):
    folder.mkdir(parents=True, exist_ok=True)
    _dump_py2_style(
        folder / "meta",
        {
            "fine_label_names": [f"fine{i}" for i in range(100)],
            "coarse_label_names": [f"super{i}" for i in range(20)],
        },
    )
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n)
        coarse = fine // 5
        _dump_py2_style(
            folder / split,
            {
                "batch_label": split,
                "fine_labels": [int(v) for v in fine],
                "coarse_labels": [int(v) for v in coarse],
                "data": x.reshape(n, 3072),
                "filenames": [f"{split}_{i}.png" for i in range(n)],
            },
        )
        out[split] = (x, fine, coarse)
    return out


def write_stl10_folder(folder: Path, rng: np.random.Generator, n_train=3, n_test=2):
    """stl10_binary with images stored column-major per channel, labels 1..10."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(names) + "\n")
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)  # C x H x W
        y = rng.integers(1, 11, size=n).astype(np.uint8)
        np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tofile(folder / f"{split}_X.bin")
        y.tofile(folder / f"{split}_y.bin")
        out[split] = (x, y)
    return out


def write_image(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
