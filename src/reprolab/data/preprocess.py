"""preprocess stage: verified raw files -> seeded stratified splits of uint8 tensors + meta.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from reprolab.config import Config
from reprolab.data import MANIFEST, META, SPLITS, digits
from reprolab.errors import DataError
from reprolab.io import atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)
READERS = {"digits": digits.read}


def verify_manifest(raw_dir: Path) -> str:
    """Check every file the manifest lists by size and sha256; -> the manifest's own hash."""
    path = raw_dir / MANIFEST
    if not path.exists():
        raise DataError(f"{path}: manifest not found; run `reprolab fetch` first")
    manifest = read_json(path)
    for rel, entry in manifest["files"].items():
        file = raw_dir / rel
        if not file.is_file():
            raise DataError(f"{file}: listed in {path} but missing; run `reprolab fetch` again")
        # Content, not modification time: a changed file with its mtime restored is still caught.
        if file.stat().st_size != entry["size"] or sha256_file(file) != entry["sha256"]:
            raise DataError(
                f"{file}: content differs from {path} (sha256 mismatch); "
                "the raw data changed since fetch, run `reprolab fetch` again"
            )
    return sha256_file(path)


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Seeded, stratified train/val/test indices (each sorted, so files are stable)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    counts = np.bincount(labels)
    if counts.min() < 3:
        raise DataError(
            f"class {int(counts.argmin())} has {int(counts.min())} images; "
            "each class needs at least 3 for train/val/test splits"
        )
    rest, test = train_test_split(
        index, test_size=test_fraction, stratify=labels, random_state=seed
    )
    val_share = val_fraction / (1.0 - test_fraction)
    train, val = train_test_split(
        rest, test_size=val_share, stratify=labels[rest], random_state=seed
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images N x C x H x W, in pixel units (0..255)."""
    as_float = images.astype(np.float64)
    mean = as_float.mean(axis=(0, 2, 3))
    std = as_float.std(axis=(0, 2, 3))
    return mean.tolist(), np.maximum(std, 1e-6).tolist()


def run(cfg: Config) -> dict[str, Any]:
    import torch

    raw_dir = cfg.raw_dir
    manifest_hash = verify_manifest(raw_dir)
    dataset = read_json(raw_dir / MANIFEST)["dataset"]
    if dataset != cfg.data.dataset:
        raise DataError(
            f"{raw_dir / MANIFEST}: holds dataset {dataset!r}, params say {cfg.data.dataset!r}"
        )
    images, labels, classes = READERS[dataset](raw_dir)
    index = stratified_split(labels, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed)
    mean, std = channel_stats(images[index["train"]])
    meta = {
        "dataset": dataset,
        "classes": classes,
        "num_classes": len(classes),
        "shape": list(images.shape[1:]),
        "mean": mean,
        "std": std,
        "sizes": {name: len(index[name]) for name in SPLITS},
        "manifest_sha256": manifest_hash,
        "seed": cfg.seed,
    }
    with atomic_dir(cfg.processed_dir) as tmp:
        for name in SPLITS:
            blob = {
                "x": torch.from_numpy(np.ascontiguousarray(images[index[name]])),
                "y": torch.from_numpy(labels[index[name]]),
            }
            torch.save(blob, tmp / f"{name}.pt")
        write_json(tmp / META, meta)
    log.info("preprocess: %s -> %s", meta["sizes"], cfg.processed_dir)
    return meta


def main(cfg: Config, args: Any) -> None:
    meta = run(cfg)
    print(f"preprocess: {meta['dataset']} {meta['sizes']} -> {cfg.processed_dir}")
