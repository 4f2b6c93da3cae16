"""Reader of an image-folder layout: one folder per class or person (e.g. Extended Yale B)."""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from clusterattack.data.dataset import ImageDataset
from clusterattack.data.errors import DatasetFormatError, DatasetNotFound
from clusterattack.data.splits import stratified_split

__all__ = ["IMAGE_EXTENSIONS", "load_image_folder"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".pgm", ".ppm", ".pbm", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_LAYOUT_HINT = (
    "Expected one sub-folder per class or person holding image files "
    f"({', '.join(IMAGE_EXTENSIONS)}), e.g. CroppedYale/yaleB01/*.pgm, optionally below "
    "train/ and test/ top folders."
)


def _image_files(folder: Path, exclude: Sequence[str]) -> list[Path]:
    files = []
    for p in sorted(folder.rglob("*")):
        if (
            p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(folder).parts)
            and not any(fnmatch.fnmatch(p.name, pat) for pat in exclude)
        ):
            files.append(p)
    return files


def _class_folders(top: Path) -> list[Path]:
    return sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))


def _parse_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError) as err:
        raise ValueError(f"size must be an int or (height, width), got {size!r}") from err
    if h <= 0 or w <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return h, w


def _to_array(img, gray: bool) -> np.ndarray:
    """H x W (gray) or H x W x 3 (RGB) uint8 array of one Pillow image."""
    if gray and img.mode.startswith("I;16"):
        # 16-bit scans: Pillow's convert("L") would clip at 255, so keep the 8 high bits.
        return (np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8)
    return np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8)


def load_image_folder(
    path: str | os.PathLike,
    size: int | tuple[int, int] | None = None,
    color: str = "auto",
    test_fraction: float = 0.2,
    seed: int = 0,
    exclude: Sequence[str] = (),
    max_per_class: int | None = None,
    name: str | None = None,
) -> ImageDataset:
    """Images below ``path``, labelled by the name of the folder they sit in.

    Layout: ``path/<class>/**/<image>``; or ``path/train/<class>/...`` and
    ``path/test/<class>/...``, which fixes the split. Without train/test folders a seeded,
    per-class ``test_fraction`` of the images becomes test (see ``stratified_split``).

    ``size`` (int or (H, W)) resizes every image (bilinear, antialiased, aspect not kept);
    without it all images must already share one size. ``color`` is "gray", "rgb" or
    "auto" (gray when every image is single-channel). ``exclude`` holds file-name glob
    patterns to leave out (Extended Yale B: ``("*Ambient*",)``). ``max_per_class`` keeps a
    seeded random subset of each class, e.g. 10 images per person.
    """
    from PIL import Image, UnidentifiedImageError

    top = Path(path).expanduser()
    if not top.is_dir():
        raise DatasetNotFound(f"image folder {str(top)!r} does not exist. {_LAYOUT_HINT}")
    if color not in ("auto", "gray", "rgb"):
        raise ValueError(f"color must be 'auto', 'gray' or 'rgb', got {color!r}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    target = _parse_size(size)
    rng = np.random.default_rng(seed)

    fixed_split = (top / "train").is_dir() and (top / "test").is_dir()
    tops = [(top / "train", "train"), (top / "test", "test")] if fixed_split else [(top, None)]
    found: list[tuple[Path, str, str | None]] = []
    for t, split in tops:
        for folder in _class_folders(t):
            files = _image_files(folder, exclude)
            if max_per_class is not None and len(files) > max_per_class:
                keep = np.sort(rng.choice(len(files), size=max_per_class, replace=False))
                files = [files[i] for i in keep]
            found += [(f, folder.name, split) for f in files]
    # Only folders that hold images are classes: an empty folder would be a cluster of nothing.
    class_names = tuple(sorted({cls for _, cls, _ in found}))
    class_id = {cls: i for i, cls in enumerate(class_names)}
    entries = [(f, class_id[cls], split) for f, cls, split in found]
    if not entries:
        raise DatasetNotFound(f"no image files found below {str(top)!r}. {_LAYOUT_HINT}")

    # Headers first (cheap: Pillow reads pixels lazily) to settle color and size up front.
    modes, sizes = set(), set()
    for file, _, _ in entries:
        try:
            with Image.open(file) as img:
                modes.add(img.mode)
                sizes.add((img.height, img.width))
        except (UnidentifiedImageError, OSError) as err:
            raise DatasetFormatError(f"{file}: not a readable image: {err}") from err
    gray = color == "gray" or (color == "auto" and modes <= _GRAY_MODES)
    if target is None:
        if len(sizes) > 1:
            raise DatasetFormatError(
                f"images below {str(top)!r} have {len(sizes)} different sizes (H x W), e.g. "
                f"{sorted(sizes)[:3]}: pass size=(H, W) to resize them to one"
            )
        target = next(iter(sizes))

    h, w = target
    channels = 1 if gray else 3
    images = np.empty((len(entries), channels, h, w), dtype=np.uint8)
    for i, (file, _, _) in enumerate(tqdm(entries, desc=f"reading {top.name}", unit="img")):
        with Image.open(file) as img:
            if (img.height, img.width) != (h, w):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            arr = _to_array(img, gray)
        images[i] = arr[None] if gray else arr.transpose(2, 0, 1)
    labels = np.array([e[1] for e in entries], dtype=np.int64)
    if fixed_split:
        split = np.array([e[2] for e in entries])
        how = "train/ and test/ folders"
    else:
        split = stratified_split(labels, test_fraction, seed)
        how = f"seeded stratified split, test_fraction={test_fraction}, seed={seed}"
    logger.info(
        "%s: %d images in %d classes, %s %dx%d (%s)",
        top,
        len(entries),
        len(class_names),
        "gray" if gray else "RGB",
        h,
        w,
        how,
    )
    return ImageDataset(
        name=name or top.name,
        images=images,
        labels=labels,
        split=split,
        class_names=class_names,
        source=f"image folder {top} ({channels}x{h}x{w}; {how})",
    )
