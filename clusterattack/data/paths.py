"""Where user-provided data sets live on local disk, and finding a data set's folder there."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from clusterattack.data.errors import DatasetNotFound

__all__ = ["DATA_DIR_ENV", "data_root", "find_dataset_dir"]

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "CLUSTERATTACK_DATA_DIR"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The directory holding user-provided data sets.

    ``root`` if given, else ``$CLUSTERATTACK_DATA_DIR``, else ``$XDG_CACHE_HOME/clusterattack/data``
    (``~/.cache/clusterattack/data``). The directory need not exist: readers report what
    to put where.
    """
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "clusterattack" / "data"


def find_dataset_dir(
    name: str,
    *,
    root: str | os.PathLike | None,
    path: str | os.PathLike | None,
    subdirs: Sequence[str],
    missing_files: Callable[[Path], list[str]],
    how_to_get: str,
    system_dirs: Sequence[str | os.PathLike] = (),
) -> Path:
    """The first folder that holds all files of data set ``name``.

    ``path`` (an exact folder) wins when given. Otherwise ``<data root>/<subdir>`` for each
    of ``subdirs`` is tried, then ``system_dirs`` (e.g. a Debian package's location).
    ``missing_files(folder)`` lists what a folder lacks; an empty list means complete.
    Raises :class:`DatasetNotFound` whose message lists every place looked at, what was
    missing there, and ``how_to_get``.
    """
    if path is not None:
        candidates = [Path(path).expanduser()]
    else:
        base = data_root(root)
        candidates = [base / s for s in subdirs] + [Path(d) for d in system_dirs]
    looked: list[str] = []
    for folder in candidates:
        if not folder.is_dir():
            looked.append(f"  {folder}: no such folder")
            continue
        missing = missing_files(folder)
        if not missing:
            logger.debug("%s: using %s", name, folder)
            return folder
        looked.append(f"  {folder}: missing {', '.join(missing)}")
    raise DatasetNotFound(
        f"data set {name!r} not found. Looked in:\n" + "\n".join(looked) + f"\n{how_to_get}"
    )
