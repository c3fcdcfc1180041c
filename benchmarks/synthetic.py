"""A data source of any size, made on the fly (the data source contract, src/reprolab/data/
sources.py): `images` RGB images of `size` x `size`, each its class's smooth pattern plus pixel
noise, learnable and as large as a benchmark needs, without a file per image. Its raw folder holds
only the spec (spec.json, which the manifest hashes); `read` regenerates the same pixels from it,
chunk by chunk, so preprocess streams them as it streams a folder of photos.

    data:
      dataset: sources.synthetic:Synthetic      # this file copied into the project's sources/
      kwargs: {images: 100000, size: 64}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 2048


class Synthetic:
    def __init__(self, images: int, size: int = 64, classes: int = 10, seed: int = 0):
        self.spec = {"images": int(images), "size": int(size), "classes": int(classes),
                     "seed": int(seed)}
        self.name = f"synthetic-{images}x{size}"

    def fetch(self, dest: Path, options: Any) -> dict[str, str]:
        (Path(dest) / "spec.json").write_text(json.dumps(self.spec, sort_keys=True))
        return {}

    def read(self, raw: Path, options: Any) -> Any:
        from reprolab.data.sources import Images

        spec = json.loads((Path(raw) / "spec.json").read_text())
        classes = [f"class{i}" for i in range(spec["classes"])]
        return Images(classes, {"train": lambda: chunks(**spec)})


def patterns(classes: int, size: int, seed: int) -> np.ndarray:
    """One smooth pattern per class, uint8 classes x 3 x size x size (in 0..159)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 160, (classes, 3, 4, 4)).astype(np.float32)
    steps = np.linspace(0, 3, size)
    low = np.floor(steps).astype(int).clip(0, 2)
    frac = (steps - low).astype(np.float32)
    rows = coarse[:, :, low] * (1 - frac)[:, None] + coarse[:, :, low + 1] * frac[:, None]
    smooth = rows[..., low] * (1 - frac) + rows[..., low + 1] * frac
    return smooth.astype(np.uint8)


def chunks(images: int, size: int, classes: int, seed: int
           ) -> Iterator[tuple[np.ndarray, np.ndarray, list[bytes]]]:
    """The images in chunks of CHUNK: pattern + noise in 0..95, each keyed by its index."""
    base = patterns(classes, size, seed)
    for start in range(0, images, CHUNK):
        n = min(CHUNK, images - start)
        rng = np.random.default_rng([seed, start])
        y = (np.arange(start, start + n) * 7919) % classes
        x = base[y] + rng.integers(0, 96, (n, 3, size, size), dtype=np.uint8)
        yield x, y.astype(np.int64), [f"{seed}:{i}".encode() for i in range(start, start + n)]
