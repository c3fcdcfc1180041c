"""Stable splits: each image's split is a pure function of the seed and the image's content hash.

Adding, removing or relabelling other images never moves an image to another split, exact
duplicates always land in the same one, and changing `seed` reshuffles on purpose. The fractions
hold approximately (per class too: each image draws on its own); preprocess reports the
fractions it got per class and refuses a class with no image in some split.
"""

from __future__ import annotations

import hashlib

import numpy as np

from reprolab.errors import DataError

SPLITS = ("train", "val", "test")


def key_of(image: np.ndarray) -> bytes:
    """The content hash of one decoded image (C x H x W uint8): the default key."""
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).digest()


def draw(key: bytes, seed: int) -> float:
    """The image's uniform number in [0, 1), from the seed and its content hash."""
    digest = hashlib.sha256(seed.to_bytes(8, "little") + key).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def assign(keys: list[bytes], seed: int, carve: dict[str, float]) -> np.ndarray:
    """-> each image's split name, carving `carve` ({"test": f, "val": f}, the splits the data
    does not bring itself) out of train by each image's draw: test below f_test, val next."""
    out = np.full(len(keys), "train", dtype=object)
    for i, key in enumerate(keys):
        u, low = draw(key, seed), 0.0
        for name in ("test", "val"):
            if name in carve:
                if u < low + carve[name]:
                    out[i] = name
                    break
                low += carve[name]
    return out


def fractions(counts: dict[str, np.ndarray], classes: list[str]) -> dict[str, dict[str, float]]:
    """{class: {split: share of the class's images}} from per-split class counts; refuses, in
    one line, a class that has no image in some split."""
    total = sum(counts.values())
    out = {}
    for k, name in enumerate(classes):
        for split, per_class in counts.items():
            if per_class[k] == 0:
                raise DataError(
                    f"class {name!r} has no image in the {split} split ({int(total[k])} images "
                    "in all); add images of it, or change data.val_fraction, "
                    "data.test_fraction or seed")
        out[name] = {split: round(float(per_class[k] / total[k]), 4)
                     for split, per_class in counts.items()}
    return out
