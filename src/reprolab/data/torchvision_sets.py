"""MNIST-like sets and CIFAR in torchvision's own on-disk layout under <paths.raw>/<dataset>/.

fetch asks torchvision to download only the files that are missing, so files placed by hand (on
a machine without network) are used as they are. Reading is done here, from the real formats
(IDX files, gzipped or not; CIFAR's pickled batches), one file at a time.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reprolab.errors import DataError


@dataclass(frozen=True)
class Spec:
    torchvision_class: str
    folder: str  # below the dataset's raw dir, as torchvision lays it out
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str | None = None  # CIFAR: the pickled class names
    classes: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        return self.train + self.test + ((self.meta,) if self.meta else ())


_IDX = dict(train=("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            test=("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"))
SPECS = {
    "mnist": Spec("MNIST", "MNIST/raw", **_IDX, classes=tuple(str(d) for d in range(10))),
    "fashion_mnist": Spec(
        "FashionMNIST", "FashionMNIST/raw", **_IDX,
        classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                 "Sneaker", "Bag", "Ankle boot"),
    ),
    "kmnist": Spec("KMNIST", "KMNIST/raw", **_IDX,
                   classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")),
    "cifar10": Spec("CIFAR10", "cifar-10-batches-py",
                    train=tuple(f"data_batch_{i}" for i in range(1, 6)), test=("test_batch",),
                    meta="batches.meta"),
    "cifar100": Spec("CIFAR100", "cifar-100-python", train=("train",), test=("test",),
                     meta="meta"),
}


def _present(path: Path) -> bool:
    """IDX files may also be placed gzipped, as they are published."""
    return path.exists() or path.with_name(path.name + ".gz").exists()


def missing_files(name: str, raw_dir: Path) -> list[Path]:
    folder = raw_dir / SPECS[name].folder
    return [folder / f for f in SPECS[name].files if not _present(folder / f)]


def fetch(name: str, raw_dir: Path) -> None:
    """Download what is missing with torchvision's own downloader (it checks md5 sums)."""
    missing = missing_files(name, raw_dir)
    if not missing:
        return
    import torchvision.datasets

    cls = getattr(torchvision.datasets, SPECS[name].torchvision_class)
    dataset = cls.__new__(cls)  # only its download(): loading is ours, file by file
    dataset.root = str(raw_dir)
    try:
        dataset.download()
    except Exception as exc:  # noqa: BLE001 - URLError, RuntimeError, OSError, ... all say one thing
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"data.dataset = {name!r}: the download failed ({reason}); without network, place "
            f"these files by hand (IDX files may stay .gz): {', '.join(map(str, missing))}"
        ) from None
    still = missing_files(name, raw_dir)
    if still:
        raise DataError(f"data.dataset = {name!r}: still missing after download: {still[0]}")


def _open(path: Path):
    return gzip.open(path.with_name(path.name + ".gz")) if not path.exists() else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format): magic 0x0000 08 <ndim>, big-endian int32 sizes, uint8 data."""
    with _open(path) as fh:
        data = fh.read()
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(v) for v in np.frombuffer(data, ">i4", count=ndim, offset=4))
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: holds {body.size} values, its header says {shape}")
    return body.reshape(shape).copy()  # writable, and the file bytes can go


def _read_cifar_batches(folder: Path, files: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in files:
        with open(folder / name, "rb") as fh:
            try:
                batch = pickle.load(fh, encoding="latin1")
            except Exception as exc:  # noqa: BLE001 - a damaged pickle fails in many ways
                raise DataError(f"{folder / name}: not a CIFAR batch ({exc})") from None
        labels = batch.get("labels", batch.get("fine_labels"))
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def idx_chunks(images: Path, labels: Path, chunk: int = 4096
               ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """An IDX split read `chunk` images at a time (gzipped or not): memory flat in its size."""
    with _open(images) as xf, _open(labels) as yf:
        shape, count = _idx_header(xf, images), _idx_header(yf, labels)
        if shape[0] != count[0]:
            raise DataError(f"{images}: {shape[0]} images but {labels} {count[0]} labels")
        row = int(np.prod(shape[1:]))
        for start in range(0, shape[0], chunk):
            n = min(chunk, shape[0] - start)
            x = np.frombuffer(xf.read(n * row), np.uint8)
            y = np.frombuffer(yf.read(n), np.uint8)
            if x.size != n * row or y.size != n:
                raise DataError(f"{images}: shorter than its header says ({shape})")
            yield x.reshape(n, 1, *shape[1:]).copy(), y.astype(np.int64)


def _idx_header(fh: Any, path: Path) -> tuple[int, ...]:
    head = fh.read(4)
    if len(head) < 4 or head[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not an IDX file of unsigned bytes")
    return tuple(int(v) for v in np.frombuffer(fh.read(4 * head[3]), ">i4"))


def read_chunks(name: str, raw_dir: Path
                ) -> tuple[dict[str, Callable[[], Iterator[tuple[np.ndarray, np.ndarray]]]],
                           list[str]]:
    """-> ({"train": chunks, "test": chunks}, class names): the official splits, read one file
    (CIFAR) or a few thousand images (IDX) at a time."""
    spec = SPECS[name]
    folder = raw_dir / spec.folder
    if spec.meta is None:
        return ({split: (lambda files=files: idx_chunks(folder / files[0], folder / files[1]))
                 for split, files in (("train", spec.train), ("test", spec.test))},
                list(spec.classes))
    with open(folder / spec.meta, "rb") as fh:
        meta = pickle.load(fh, encoding="latin1")
    classes = list(meta.get("label_names") or meta["fine_label_names"])
    return ({split: (lambda files=files: (_read_cifar_batches(folder, (f,)) for f in files))
             for split, files in (("train", spec.train), ("test", spec.test))}, classes)
