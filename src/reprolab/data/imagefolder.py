"""A folder of your own images: one subfolder per class, PNG/JPEG (anything PIL reads).

fetch copies the folder into <paths.raw>/imagefolder/ (so DVC versions what was trained on), and
only what is the folder's own: regular files, real subfolders, and symlinks to regular files
inside the folder (copied as those files). Every other entry is refused with one line, or skipped
and listed with data.skip_bad_images: a symlink that leaves the folder, loops, is broken or names
a folder (its images would be copied twice, maybe into two classes), a FIFO, socket or device.
Hidden entries (.DS_Store, .git) are left out. fetch copies bytes and decodes nothing.

preprocess reads the copy in a fixed order (class folders sorted, files sorted), converts every
image to the same channel count and size, and writes them into one preallocated uint8 array. As in
torchvision's ImageFolder, only files with an image extension are read (notes.txt is left out,
and listed in the preprocess report). An image with more than data.max_image_pixels pixels is
unreadable: PIL reads its size from the header, and it is refused before a pixel is decoded.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import shutil
import stat
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from reprolab.errors import ConfigError, DataError

Chunk = tuple[np.ndarray, np.ndarray, list[bytes]]  # images, labels, their keys

log = logging.getLogger(__name__)

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
# params.yaml's data.max_image_pixels, for callers that have no config
DEFAULT_MAX_PIXELS = 100_000_000
KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symlink"}
ALLOWED = ("data.image_folder may hold regular files, folders and symlinks to regular files "
           "inside it")


class NotAFile(OSError):
    """A path that is not a regular file (FIFO, socket, device, folder): never opened as one."""


def open_regular(path: Path, follow: bool = True) -> BinaryIO:
    """`path` opened for reading, if it is a regular file. Checked before opening (opening a FIFO
    waits for a writer forever, opening a device can act on it), and again on the open descriptor
    (non-blocking, so a FIFO swapped in meanwhile cannot make it wait)."""
    mode = (os.stat if follow else os.lstat)(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotAFile(f"not a regular file ({KINDS.get(stat.S_IFMT(mode), 'special')})")
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    fh = open(os.open(path, flags), "rb")  # noqa: SIM115 - the caller closes it
    if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
        fh.close()
        raise NotAFile("not a regular file (replaced while being opened)")
    return fh


def fetch(source: str | None, dest: Path, skip_bad: bool,
          base_dir: Path | None = None) -> dict[str, str]:
    """Copy the folder's own files into `dest` -> {entry left out (relative path): why}. A
    relative `source` is read from `base_dir` (the project's folder), wherever the process runs."""
    if not source:
        raise ConfigError("data.image_folder: required when data.dataset is 'imagefolder'")
    src = Path(base_dir or ".") / Path(source).expanduser()
    if not src.is_dir():
        raise ConfigError(f"data.image_folder = {source!r}: not a directory")
    root = src.resolve()  # the folder itself may be a symlink; what it holds may not leave it
    skipped: dict[str, str] = {}
    for path, why in copy_own_files(src, dest, root):
        # the message names a link's target; the manifest (a DVC output) keeps no such path
        shown = f"{path} -> {os.readlink(path)}" if path.is_symlink() else str(path)
        if not skip_bad:
            raise DataError(f"{shown}: {why}; {ALLOWED}: remove it, or set "
                            "data.skip_bad_images: true to skip such entries")
        log.warning("skipping %s: %s", shown, why)
        skipped[path.relative_to(src).as_posix()] = why
    return skipped


def copy_own_files(folder: Path, dest: Path, root: Path) -> Iterator[tuple[Path, str]]:
    """Copy `folder`'s own files into `dest`, recursively -> each entry left out, and why.

    Subfolders are entered only when they are real folders, never through a symlink: a walk that
    follows no folder link cannot loop or leave `root`."""
    dest.mkdir(exist_ok=True)
    try:
        with os.scandir(folder) as listing:
            entries = sorted(listing, key=lambda e: e.name)
    except OSError as exc:
        yield folder, f"cannot be listed ({exc.strerror})"
        return
    for entry in entries:
        if entry.name.startswith("."):
            continue  # hidden (.DS_Store, .git): never data, never copied, never read
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            yield from copy_own_files(path, dest / entry.name, root)
            continue
        source, why = link_target(path, root) if entry.is_symlink() else (path, "")
        if source is not None:
            why = copy_file(source, dest / entry.name)
        if why:
            yield path, why


def link_target(link: Path, root: Path) -> tuple[Path | None, str]:
    """-> (the regular file inside `root` that `link` names, "") or (None, why it may not be
    followed)."""
    try:
        target = Path(os.path.realpath(link, strict=True))
    except OSError as exc:
        return None, "a symlink loop" if exc.errno == errno.ELOOP else "a broken symlink"
    if not target.is_relative_to(root):
        return None, "a symlink leading outside the folder"
    if target.is_dir():
        if link.parent.resolve().is_relative_to(target):
            return None, "a symlink loop (to a folder that holds it)"
        return None, "a symlink to a folder"
    return target, ""


def copy_file(source: Path, dest: Path) -> str:
    """Copy one regular file (never through a symlink) -> "" or why it is not copied."""
    try:
        fh = open_regular(source, follow=False)
    except NotAFile as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    with fh, open(dest, "wb") as out:
        shutil.copyfileobj(fh, out)
    return ""


@contextlib.contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's decompression-bomb check at `max_pixels`, always an error.

    PIL checks an image's size from its header when it opens it (and a frame's or tile's size when
    it decodes one), so a larger image is refused before anything is decoded. PIL only warns up to
    twice its limit, and raises above that: here both raise DecompressionBombError naming the knob.
    PIL's limit is a module global: set for the block, then restored.
    """
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found[1])} pixels" if found else "too many pixels"
        raise Image.DecompressionBombError(
            f"{size}, more than data.max_image_pixels = {max_pixels}"
        ) from None
    finally:
        Image.MAX_IMAGE_PIXELS = old


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


# What counts as an image file: torchvision's IMG_EXTENSIONS (what its ImageFolder reads) and
# GIF, which PIL reads and reprolab always read. Written out, with torchvision's rule for class
# folders below: importing torchvision for them cost every preprocess of a folder 2.5 s of CPU
# (torch comes with it). tests/test_datasets.py holds both to torchvision's own.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                    ".gif")


def is_image_name(name: str) -> bool:
    """torchvision's has_file_allowed_extension: the lower-cased name's ending."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def class_names(root: Path) -> list[str]:
    """torchvision's find_classes (subfolders, sorted), less hidden ones: the manifest does not
    list what they hold, so they are never read."""
    try:
        found = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    except FileNotFoundError:  # no folder at all
        found = []
    classes = [name for name in found if not name.startswith(".")]
    if len(classes) < 2:
        raise DataError(f"{root}: expected one subfolder per class, found {len(classes)}")
    return classes


def list_files(root: Path) -> tuple[list[tuple[Path, int]], list[str], list[str]]:
    """-> ([(image file, class index)], class names, files left out for their extension):
    sorted; hidden files and folders left out (the manifest does not list them either)."""
    classes = class_names(root)
    files, ignored = [], []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if not path.is_file() or any(p.startswith(".") for p in path.relative_to(root).parts):
                continue
            if is_image_name(path.name):
                files.append((path, index))
            else:
                ignored.append(path.relative_to(root).as_posix())
    if ignored:
        log.info("not image files (by extension), left out: %s", ", ".join(ignored))
    return files, classes, ignored


def slug(folder: str) -> str:
    """A folder's name as part of a source name (`imagefolder-<slug>`): its last part, with
    anything but letters, digits, `_`, `.` and `-` made `-`."""
    import re
    from pathlib import PurePosixPath

    name = PurePosixPath(str(folder).rstrip("/")).name
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "images"


SPLIT_FOLDERS = ("train", "val", "test")


def own_splits(root: Path, knob: bool | None) -> list[str]:
    """The folder's own splits: [] when its top level is the classes; ["train", "val"] or
    ["train", "val", "test"] when it is split folders, each holding one subfolder per class
    (the layout of ImageNet and PyTorch's transfer-learning tutorial). `knob`
    (data.folder_splits): None detects, True requires, False never splits."""
    top = {p.name for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith(".")}
    found = [s for s in SPLIT_FOLDERS if s in top]
    layout = found[:2] == ["train", "val"] and top == set(found)
    if knob is True and not layout:
        raise DataError(f"{root}: data.folder_splits is true, but its top level is "
                        f"{sorted(top)}; allowed: train/ and val/ (and test/), each with one "
                        "subfolder per class")
    return found if layout and knob is not False else []


def read_splits(
    root: Path, channels: int | None, image_size: int | None, skip_bad: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS, folder_splits: bool | None = None,
) -> tuple[dict[str, Callable[[], Iterator[Chunk]]], list[str], list[str], list[str]]:
    """The folder's images, split by its own split folders or not at all -> ({split: chunks},
    class names, skipped files (filled as the chunks are read), files left out for their
    extension). Class names must agree across the split folders."""
    splits = own_splits(root, folder_splits)
    listed = {s: list_files(root / s) for s in splits} if splits else {"train": list_files(root)}
    classes = listed["train"][1]
    for split, (_, names, _) in listed.items():
        if names != classes:
            raise DataError(f"{root / split}: its classes {names} are not train/'s {classes}; "
                            "allowed: the same class folders in every split folder")
    ignored = [f"{s}/{n}" if splits else n for s, (_, _, gone) in listed.items() for n in gone]
    skipped: list[str] = []
    files = {s: [(path, label) for path, label in found] for s, (found, _, _) in listed.items()}
    good, shape = scan([f for fs in files.values() for f in fs], root, channels, image_size,
                       skip_bad, max_pixels, skipped)
    keep = set(good)
    chunks = {s: (lambda fs=[f for f in fs if f in keep]: decode_chunks(
        fs, root, shape, skip_bad, max_pixels, skipped)) for s, fs in files.items()}
    return chunks, classes, skipped, ignored


def scan(files: list[tuple[Path, int]], root: Path, channels: int | None,
         image_size: int | None, skip_bad: bool, max_pixels: int, skipped: list[str]
         ) -> tuple[list[tuple[Path, int]], tuple[int, int, int]]:
    """Pass 1, headers only (cheap): -> (the files that are images, the C x H x W every image is
    converted to: `channels`, or 1 when all are grayscale; `image_size`, or their own size when
    all agree). An unreadable file is refused in one line, or skipped and listed with
    `skip_bad`."""
    from PIL import Image, UnidentifiedImageError

    good, modes, sizes = [], set(), set()
    for path, label in files:
        try:
            with pixel_limit(max_pixels), Image.open(path) as image:
                modes.add(image.mode)
                sizes.add(image.size)
            good.append((path, label))
        except Image.DecompressionBombError as exc:
            _bad(path, f"not a readable image (DecompressionBombError: {exc})", root,
                 skip_bad, skipped)
        except (UnidentifiedImageError, OSError) as exc:
            _bad(path, f"not a readable image ({type(exc).__name__})", root, skip_bad, skipped)
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
    return good, (channels, height, width)


def _bad(path: Path, why: str, root: Path, skip_bad: bool, skipped: list[str]) -> None:
    if not skip_bad:
        raise DataError(
            f"{path}: {why}; remove it, or set data.skip_bad_images: true to skip such files"
        )
    log.warning("skipping %s: %s", path, why)
    skipped.append(str(path.relative_to(root)))


def decode_chunks(files: list[tuple[Path, int]], root: Path, shape: tuple[int, int, int],
                  skip_bad: bool, max_pixels: int, skipped: list[str], chunk: int = 256
                  ) -> Iterator[Chunk]:
    """Pass 2: decode `chunk` images at a time -> (uint8 images N x C x H x W, int64 labels,
    the files' sha256: each image's key for the stable splits). Memory stays flat in the number
    of images."""
    import hashlib

    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    for start in range(0, len(files), chunk):
        images = np.empty((min(chunk, len(files) - start), *shape), dtype=np.uint8)
        labels, keys = [], []
        for path, label in files[start:start + chunk]:
            try:
                data = path.read_bytes()
                # the limit again: some formats hold frames or tiles larger than their header
                with pixel_limit(max_pixels), Image.open(io.BytesIO(data)) as image:
                    images[len(labels)] = to_pixels(image, channels, height, width)
            except (UnidentifiedImageError, OSError, ValueError,
                    Image.DecompressionBombError) as exc:
                _bad(path, f"cannot be decoded ({type(exc).__name__}: {exc})", root, skip_bad,
                     skipped)
                continue
            labels.append(label)
            keys.append(hashlib.sha256(data).digest())
        yield images[:len(labels)], np.array(labels, dtype=np.int64), keys


def decode_files(
    files: list[tuple[Path, int]], root: Path, channels: int | None, image_size: int | None,
    skip_bad: bool, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """[(image file, label)] -> (uint8 images N x C x H x W, int64 labels, skipped files
    relative to `root`), all in memory: the simple form of scan and decode_chunks, for sources
    of your own with few images (sources/example.py)."""
    skipped: list[str] = []
    good, shape = scan(files, root, channels, image_size, skip_bad, max_pixels, skipped)
    chunks = list(decode_chunks(good, root, shape, skip_bad, max_pixels, skipped))
    return (np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks]),
            skipped)
