"""scikit-learn's bundled digits: 1,797 real 8x8 grayscale handwritten digits, offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = [str(d) for d in range(10)]


def bundled() -> tuple[np.ndarray, np.ndarray]:
    """-> the 1,797 images (pixel values 0..16) and labels as scikit-learn's load_digits gives
    them, read from the file it reads (its datasets/data/digits.csv.gz) without importing
    scikit-learn (a second of CPU: fetch runs on every `dvc repro`); load_digits itself where
    that file is not found."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")  # finds the package, imports nothing
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec else None
    if csv is None or not csv.is_file():
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.images, bunch.target
    with gzip.open(csv, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")  # 64 pixels, then the label, per row
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def fetch(dest: Path) -> None:
    """Copy the bundled arrays as they are (pixel values 0..16) into `dest`."""
    images, labels = bundled()
    np.save(dest / "images.npy", images.astype(np.uint8))
    np.save(dest / "labels.npy", labels.astype(np.int64))


def read(raw_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """-> uint8 images N x 1 x 8 x 8 scaled to 0..255 like any image file, int64 labels, names."""
    images = np.load(raw_dir / "images.npy")
    labels = np.load(raw_dir / "labels.npy")
    pixels = np.rint(images.astype(np.float32) * (255.0 / 16.0)).astype(np.uint8)
    return pixels[:, None, :, :], labels.astype(np.int64), CLASSES
