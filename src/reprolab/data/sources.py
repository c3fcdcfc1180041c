"""Data sources: the one contract every dataset keeps, the built-ins behind it, and the table by
which fetch and preprocess dispatch.

A source is an object with
- `name`: a short name of its own (letters, digits, `_`, `-`, `.`): its raw folder
  `<paths.raw>/<name>/` and the default registered model `reprolab-<name>`;
- `fetch(dest, options)`: put the raw files into the folder `dest` (a fresh temporary folder
  that becomes the raw folder; with `complete_in_place = True` the raw folder itself, so that
  files placed by hand are kept) -> {entry left out: why} (empty when nothing was);
- `read(raw, options)`: the raw folder (its files checked against the manifest first) ->
  `Images`: the class names and, for each split the source owns (`train` always; `val` and
  `test` when it has official ones), a callable that yields the images and labels in chunks.

`data.dataset: package.module:Class` plugs in your own: `Class(**data.kwargs)` (sources/example.py
reads a CSV of `path,label` rows). Fetch writes the manifest (the sha256 of every raw file) and
preprocess checks it before calling `read`, for every source alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from reprolab.errors import ConfigError

# uint8 images N x C x H x W (0..255), int64 labels N, and optionally each image's key for the
# stable splits (bytes: its file's sha256, say); without keys, the hash of its pixels
Chunk = tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, list[bytes]]
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Options:
    """The data section's knobs that a source may use when it reads images."""

    channels: int | None  # 1 or 3; None: the source decides (grayscale when all images are)
    image_size: int | None  # square size to resize to; None: the images' own (all alike)
    skip_bad_images: bool  # skip (and list) unreadable files instead of refusing them
    max_image_pixels: int  # larger images are refused from their header, never decoded
    folder_splits: bool | None = None  # a folder's own train/val/test: None detects them

    @classmethod
    def of(cls, data: Any) -> Options:
        """The options of a config's data section."""
        return cls(data.channels, data.image_size, data.skip_bad_images, data.max_image_pixels,
                   data.folder_splits)


@dataclass
class Images:
    """What a source's `read` returns."""

    classes: list[str]
    splits: dict[str, Callable[[], Iterable[Chunk]]]  # "train"; "val", "test" when official
    skipped: list[str] = field(default_factory=list)  # files not read (skip_bad_images)
    not_images: list[str] = field(default_factory=list)  # left out for their extension


class Source(Protocol):
    name: str

    def fetch(self, dest: Path, options: Options) -> dict[str, str]: ...

    def read(self, raw: Path, options: Options) -> Images: ...


def whole(x: np.ndarray, y: np.ndarray) -> Callable[[], Iterator[Chunk]]:
    """A split held in memory, as one chunk."""
    return lambda: iter([(x, y)])


class Digits:
    """scikit-learn's bundled digits: 1,797 real 8x8 grayscale handwritten digits, offline."""

    name = "digits"

    def fetch(self, dest: Path, options: Options) -> dict[str, str]:
        from reprolab.data import digits

        digits.fetch(dest)
        return {}

    def read(self, raw: Path, options: Options) -> Images:
        from reprolab.data import digits

        x, y, classes = digits.read(raw)
        return Images(classes, {"train": whole(x, y)})


class TorchvisionSet:
    """MNIST-like sets and CIFAR in torchvision's layout, with their official test splits."""

    complete_in_place = True  # files placed by hand (offline) are kept; only missing ones fetched

    def __init__(self, name: str):
        self.name = name

    def fetch(self, dest: Path, options: Options) -> dict[str, str]:
        from reprolab.data import torchvision_sets

        torchvision_sets.fetch(self.name, dest)
        return {}

    def read(self, raw: Path, options: Options) -> Images:
        from reprolab.data import torchvision_sets

        splits, classes = torchvision_sets.read_chunks(self.name, raw)
        return Images(classes, splits)


class ImageFolder:
    """A folder of your own images (data.image_folder): one subfolder per class, or its own
    split folders train/, val/ (and test/), each with one subfolder per class."""

    def __init__(self, folder: str | None, base_dir: Path | None = None):
        from reprolab.data.imagefolder import slug

        if not folder:
            raise ConfigError("data.image_folder: required when data.dataset is 'imagefolder' "
                              "(a folder with one subfolder of images per class)")
        self.folder, self.base_dir = folder, base_dir
        self.name = f"imagefolder-{slug(folder)}"

    def fetch(self, dest: Path, options: Options) -> dict[str, str]:
        from reprolab.data import imagefolder

        return imagefolder.fetch(self.folder, dest, options.skip_bad_images, self.base_dir)

    def read(self, raw: Path, options: Options) -> Images:
        from reprolab.data import imagefolder

        splits, classes, skipped, ignored = imagefolder.read_splits(
            raw, options.channels, options.image_size, options.skip_bad_images,
            options.max_image_pixels, options.folder_splits)
        return Images(classes, splits, skipped, ignored)


# data.dataset -> the source, from the data section and the project's folder (a relative
# data.image_folder is read from there, as every path of params.yaml); one entry per built-in
BUILTIN: dict[str, Callable[[Any, Path | None], Any]] = {
    "digits": lambda data, base_dir: Digits(),
    **{name: (lambda data, base_dir, name=name: TorchvisionSet(name))
       for name in ("mnist", "fashion_mnist", "kmnist", "cifar10", "cifar100")},
    "imagefolder": lambda data, base_dir: ImageFolder(data.image_folder, base_dir),
}
ALLOWED = (f"a built-in dataset ({', '.join(BUILTIN)}), or package.module:Class (your own "
           "source, as sources/example.py)")


def make(data: Any, base_dir: Path | None) -> Source:
    """The data section -> its source, checked against the contract (one line otherwise)."""
    from reprolab.plugins import load_object

    if data.dataset in BUILTIN:
        if data.kwargs:
            raise ConfigError(f"data.kwargs = {data.kwargs}: only a source of your own takes "
                              f"them (data.dataset = {data.dataset!r}); allowed: {{}}")
        return BUILTIN[data.dataset](data, base_dir)
    key = f"data.dataset = {data.dataset!r}"
    cls = load_object(data.dataset, base_dir, "data.dataset", ALLOWED)
    try:
        source = cls(**data.kwargs)
    except TypeError as exc:
        raise ConfigError(f"data.kwargs = {data.kwargs}: {data.dataset} refuses them "
                          f"({exc})") from None
    missing = [m for m in ("fetch", "read") if not callable(getattr(source, m, None))]
    if missing:
        raise ConfigError(f"{key}: has no {' or '.join(missing)} method; allowed: a class with "
                          "name, fetch(dest, options) and read(raw, options), as "
                          "sources/example.py")
    name = getattr(source, "name", None)
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{key}: its name {name!r} cannot name a folder and a registered "
                          "model; allowed: a short name of letters, digits, '_', '-' and '.', "
                          "without ':' or '/'")
    return source
