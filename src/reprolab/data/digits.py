"""scikit-learn's bundled digits: 1,797 real 8x8 grayscale handwritten digits, offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = [str(d) for d in range(10)]


def fetch(dest: Path) -> None:
    """Copy the bundled arrays as they are (pixel values 0..16) into `dest`."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    np.save(dest / "images.npy", bunch.images.astype(np.uint8))
    np.save(dest / "labels.npy", bunch.target.astype(np.int64))


def read(raw_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """-> uint8 images N x 1 x 8 x 8 scaled to 0..255 like any image file, int64 labels, names."""
    images = np.load(raw_dir / "images.npy")
    labels = np.load(raw_dir / "labels.npy")
    pixels = np.rint(images.astype(np.float32) * (255.0 / 16.0)).astype(np.uint8)
    return pixels[:, None, :, :], labels.astype(np.int64), CLASSES
