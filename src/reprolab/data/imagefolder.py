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
import logging
import os
import re
import shutil
import stat
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from reprolab.errors import ConfigError, DataError

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


def fetch(source: str | None, dest: Path, skip_bad: bool) -> dict[str, str]:
    """Copy the folder's own files into `dest` -> {entry left out (relative path): why}."""
    if not source:
        raise ConfigError("data.image_folder: required when data.dataset is 'imagefolder'")
    src = Path(source).expanduser()
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


def image_extensions() -> tuple[str, ...]:
    """What counts as an image file: torchvision's IMG_EXTENSIONS (what its ImageFolder reads)
    and GIF, which PIL reads and reprolab always read. torchvision takes seconds to import, so
    only listing a folder imports it."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return (*IMG_EXTENSIONS, ".gif")


def is_image_name(name: str) -> bool:
    from torchvision.datasets.folder import has_file_allowed_extension

    return has_file_allowed_extension(name, image_extensions())


def class_names(root: Path) -> list[str]:
    """torchvision's find_classes (subfolders, sorted), less hidden ones: the manifest does not
    list what they hold, so they are never read."""
    from torchvision.datasets.folder import find_classes

    try:
        found, _ = find_classes(root)
    except FileNotFoundError:  # no subfolder at all
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


def read(
    root: Path, channels: int | None, image_size: int | None, skip_bad: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, list[str], list[str], list[str]]:
    """-> (uint8 images N x C x H x W, int64 labels, class names, skipped files, files that are
    not images by their extension)."""
    files, classes, ignored = list_files(root)
    images, labels, skipped = decode_files(files, root, channels, image_size, skip_bad,
                                           max_pixels)
    return images, labels, classes, skipped, ignored


def decode_files(
    files: list[tuple[Path, int]], root: Path, channels: int | None, image_size: int | None,
    skip_bad: bool, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """[(image file, label)] -> (uint8 images N x C x H x W, int64 labels, skipped files
    relative to `root`): every image converted to one channel count (`channels`, or 1 when all
    are grayscale) and size (`image_size`, or their own when all agree). An unreadable file is
    refused in one line, or skipped and listed with `skip_bad`. Sources of your own use it too
    (sources/example.py)."""
    from PIL import Image, UnidentifiedImageError

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
            with pixel_limit(max_pixels), Image.open(path) as image:
                modes.add(image.mode)
                sizes.add(image.size)
            good.append((path, label))
        except Image.DecompressionBombError as exc:
            bad(path, f"not a readable image (DecompressionBombError: {exc})")
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
            # the limit again: some formats hold frames or tiles larger than their header says
            with pixel_limit(max_pixels), Image.open(path) as image:
                images[kept] = to_pixels(image, channels, height, width)
        except (UnidentifiedImageError, OSError, ValueError,
                Image.DecompressionBombError) as exc:
            bad(path, f"cannot be decoded ({type(exc).__name__}: {exc})")
            continue
        labels[kept] = label
        kept += 1
    return images[:kept], labels[:kept], skipped
