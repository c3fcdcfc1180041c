"""A folder of your own images: one subfolder per class, PNG/JPEG (anything PIL reads).

fetch copies the folder into <paths.raw>/imagefolder/ (so DVC versions what was trained on);
preprocess reads it in a fixed order (class folders sorted, files sorted), converts every image
to the same channel count and size, and writes them into one preallocated uint8 array.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from reprolab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def fetch(source: str | None, dest: Path) -> None:
    if not source:
        raise ConfigError("data.image_folder: required when data.dataset is 'imagefolder'")
    src = Path(source).expanduser()
    if not src.is_dir():
        raise ConfigError(f"data.image_folder = {source!r}: not a directory")
    shutil.copytree(src, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".*"))


def to_pixels(image, channels: int, height: int, width: int) -> np.ndarray:
    """A PIL image -> uint8 C x H x W with the channel count and size a model takes.

    preprocess and `reprolab predict` both use it, so a served image is prepared exactly like
    the training images were."""
    from PIL import Image

    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def list_files(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """-> ([(file, class index)], class names): sorted, hidden files left out."""
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root}: expected one subfolder per class, found {len(classes)}")
    files = [
        (path, index)
        for index, name in enumerate(classes)
        for path in sorted((root / name).rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    return files, classes


def read(
    root: Path, channels: int | None, image_size: int | None, skip_bad: bool
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """-> (uint8 images N x C x H x W, int64 labels, class names, skipped files)."""
    from PIL import Image, UnidentifiedImageError

    files, classes = list_files(root)
    skipped: list[str] = []

    def bad(path: Path, why: str) -> None:
        if not skip_bad:
            raise DataError(
                f"{path}: {why}; remove it, or set data.skip_bad_images: true to skip such files"
            )
        log.warning("skipping %s: %s", path, why)
        skipped.append(str(path.relative_to(root)))

    # Pass 1: headers only (cheap) -> which files are images, their modes and sizes.
    good, modes, sizes = [], set(), set()
    for path, label in files:
        try:
            with Image.open(path) as image:
                modes.add(image.mode)
                sizes.add(image.size)
            good.append((path, label))
        except (UnidentifiedImageError, OSError) as exc:
            bad(path, f"not a readable image ({type(exc).__name__})")
    if not good:
        raise DataError(f"{root}: no readable images")
    if channels is None:
        channels = 1 if modes <= GRAY_MODES else 3
    if image_size is None and len(sizes) > 1:
        examples = ", ".join(f"{w}x{h}" for w, h in sorted(sizes)[:3])
        raise DataError(
            f"{root}: images differ in size ({examples}, ...); set data.image_size to resize them"
        )
    width, height = (image_size, image_size) if image_size else next(iter(sizes))

    # Pass 2: decode into one preallocated array, image by image.
    images = np.empty((len(good), channels, height, width), dtype=np.uint8)
    labels = np.empty(len(good), dtype=np.int64)
    kept = 0
    for path, label in good:
        try:
            with Image.open(path) as image:
                images[kept] = to_pixels(image, channels, height, width)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            bad(path, f"cannot be decoded ({type(exc).__name__}: {exc})")
            continue
        labels[kept] = label
        kept += 1
    return images[:kept], labels[:kept], classes, skipped
