"""Realistic workloads without a download: MNIST-shaped and CIFAR-shaped synthetic data written in
the real on-disk formats (IDX files; CIFAR's pickled batches), so that `reprolab fetch` finds
every file in place and `reprolab preprocess` reads them as it reads the real sets.

The images are learnable but not trivially so: each class has a smooth random template; an image
is its class's template blended with another class's, shifted by a few pixels, scaled in
contrast and buried in pixel noise. A small CNN reaches high but not perfect accuracy in an
epoch or two, so an accuracy difference between two training loops means something.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Shape:
    dataset: str  # the reprolab dataset whose on-disk format the files take
    train: int
    test: int
    image: tuple[int, int, int]  # C x H x W

    def scaled(self, fraction: float) -> Shape:
        """The same workload with fewer images (quick runs and tests)."""
        return Shape(self.dataset, max(100, round(self.train * fraction)),
                     max(50, round(self.test * fraction)), self.image)


SHAPES = {
    "mnist": Shape("mnist", 60_000, 10_000, (1, 28, 28)),
    "cifar": Shape("cifar10", 50_000, 10_000, (3, 32, 32)),
}
CLASSES = 10


def templates(image: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """One smooth random pattern per class in [0, 1]: coarse noise on a quarter-size grid,
    upsampled, so that classes differ in shapes a convolution can find, not in single pixels."""
    import torch

    c, h, w = image
    coarse = torch.from_numpy(rng.random((CLASSES, c, max(2, h // 4), max(2, w // 4))))
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic",
                                             align_corners=False).numpy()
    lo = smooth.min(axis=(1, 2, 3), keepdims=True)
    hi = smooth.max(axis=(1, 2, 3), keepdims=True)
    return ((smooth - lo) / (hi - lo)).astype(np.float32)


def images(n: int, image: tuple[int, int, int], seed: int, chunk: int = 10_000,
           patterns: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 N x C x H x W, int64 labels, balanced and shuffled)."""
    rng = np.random.default_rng(seed)
    patterns = templates(image, np.random.default_rng(0)) if patterns is None else patterns
    labels = rng.permutation(np.arange(n) % CLASSES)
    out = np.empty((n, *image), dtype=np.uint8)
    for start in range(0, n, chunk):  # float32 temporaries stay small
        y = labels[start : start + chunk]
        m = len(y)
        other = (y + rng.integers(1, CLASSES, m)) % CLASSES  # never the same class
        mix = rng.uniform(0.0, 0.45, (m, 1, 1, 1)).astype(np.float32)
        x = (1 - mix) * patterns[y] + mix * patterns[other]
        shift = rng.integers(-2, 3, (m, 2))
        for i in range(m):  # a few pixels of translation, as handwriting and objects have
            x[i] = np.roll(x[i], tuple(shift[i]), axis=(1, 2))
        contrast = rng.uniform(0.6, 1.0, (m, 1, 1, 1)).astype(np.float32)
        noise = rng.normal(0.0, 0.35, x.shape).astype(np.float32)
        out[start : start + m] = np.clip((x * contrast + noise) * 255, 0, 255).astype(np.uint8)
    return out, labels.astype(np.int64)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">i4").tobytes()
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_mnist(raw_dir: Path, shape: Shape, seed: int = 0) -> None:
    """MNIST's four IDX files in torchvision's layout (<raw>/MNIST/raw/)."""
    folder = Path(raw_dir) / "MNIST" / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    patterns = templates(shape.image, np.random.default_rng(seed))
    for prefix, n, part in (("train", shape.train, 1), ("t10k", shape.test, 2)):
        x, y = images(n, shape.image, seed * 10 + part, patterns=patterns)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", x[:, 0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", y.astype(np.uint8))


def write_cifar(raw_dir: Path, shape: Shape, seed: int = 0) -> None:
    """CIFAR-10's pickled batches (five training batches, one test batch, the class names)."""
    folder = Path(raw_dir) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    patterns = templates(shape.image, np.random.default_rng(seed))
    x, y = images(shape.train, shape.image, seed * 10 + 1, patterns=patterns)
    for i, part in enumerate(np.array_split(np.arange(shape.train), 5), start=1):
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({"data": x[part].reshape(len(part), -1), "labels": y[part].tolist()}, fh)
    tx, ty = images(shape.test, shape.image, seed * 10 + 2, patterns=patterns)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": tx.reshape(len(tx), -1), "labels": ty.tolist()}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(CLASSES)]}, fh)


def write(raw_dir: Path, shape: Shape, seed: int = 0) -> None:
    """The raw files of `shape` under <paths.raw>/<dataset>/, as fetch expects to find them."""
    (write_mnist if shape.dataset == "mnist" else write_cifar)(raw_dir, shape, seed)
