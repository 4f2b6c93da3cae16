"""Registry of data sets by name (explicit dict of reader factories) and ``load_dataset``."""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path

from clusterattack.data.builtin import load_digits, load_mnist5k
from clusterattack.data.cifar import load_cifar10, load_cifar20, load_cifar100
from clusterattack.data.dataset import ImageDataset
from clusterattack.data.errors import UnknownDataset
from clusterattack.data.idx import load_fashion_mnist, load_mnist
from clusterattack.data.imagefolder import load_image_folder
from clusterattack.data.paths import data_root
from clusterattack.data.stl10 import load_stl10

__all__ = [
    "DATASETS",
    "FOLDER_PREFIX",
    "canonical_name",
    "list_datasets",
    "load_dataset",
    "reader_options",
    "resolve_reader",
]

logger = logging.getLogger(__name__)

DatasetFactory = Callable[..., ImageDataset]

# name -> factory. Factories that read user-provided files take ``root`` (the data root)
# and ``path`` (an exact folder); the package-installed ones take only their options.
DATASETS: dict[str, DatasetFactory] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "cifar10": load_cifar10,
    "cifar20": load_cifar20,
    "cifar100": load_cifar100,
    "stl10": load_stl10,
}
# "folder:/path/to/CroppedYale" reads an image-folder layout (see load_image_folder).
FOLDER_PREFIX = "folder:"


def list_datasets() -> list[str]:
    """Registered names, plus the ``folder:PATH`` form."""
    return sorted(DATASETS) + [FOLDER_PREFIX + "PATH"]


def canonical_name(name: str) -> str:
    """The registry key for ``name`` ("Fashion-MNIST" -> "fashion_mnist"); folders unchanged."""
    if name.startswith(FOLDER_PREFIX):
        return name
    key = name.strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise UnknownDataset(f"unknown data set {name!r}; known: {', '.join(list_datasets())}")
    return key


def _folder_path(spec: str, root) -> Path:
    # Relative folders are looked up in the working directory first, then in the data root.
    path = Path(spec).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return data_root(root) / path


def resolve_reader(name: str) -> tuple[str, DatasetFactory]:
    """The canonical name and reader factory of ``name`` (a registry key or ``folder:PATH``)."""
    if name.startswith(FOLDER_PREFIX):
        if not name[len(FOLDER_PREFIX) :]:
            raise UnknownDataset(
                f"{name!r}: give the folder after the prefix, e.g. folder:/data/yale"
            )
        return name, load_image_folder
    key = canonical_name(name)
    return key, DATASETS[key]


def reader_options(name: str) -> list[str]:
    """Options ``load_dataset(name, **opts)`` accepts (``root`` is separate)."""
    _, factory = resolve_reader(name)
    fixed = ("root", "path") if name.startswith(FOLDER_PREFIX) else ("root",)
    return [p for p in inspect.signature(factory).parameters if p not in fixed]


def _check_options(name: str, opts: dict) -> None:
    accepted = reader_options(name)
    bad = sorted(set(opts) - set(accepted))
    if bad:
        raise ValueError(
            f"data set {name!r} does not take option(s) {bad}; it takes {accepted or 'none'}"
        )


def load_dataset(name: str, root: str | os.PathLike | None = None, **opts) -> ImageDataset:
    """Read data set ``name`` (a registry key or ``folder:PATH``) into memory.

    ``root`` is the directory of user-provided data sets (else ``$CLUSTERATTACK_DATA_DIR``,
    else ~/.cache/clusterattack/data). ``opts`` go to the reader, e.g. ``path=`` for an exact
    folder, ``seed``/``test_fraction`` for the package data sets, ``size=``/``color=`` for
    image folders. A data set that is not present raises
    :class:`~clusterattack.data.errors.DatasetNotFound` saying how to get it.
    """
    key, factory = resolve_reader(name)
    _check_options(key, opts)
    logger.info("loading data set %s", key)
    if key.startswith(FOLDER_PREFIX):
        return factory(_folder_path(key[len(FOLDER_PREFIX) :], root), **opts)
    if "root" in inspect.signature(factory).parameters:
        opts["root"] = root
    return factory(**opts)
