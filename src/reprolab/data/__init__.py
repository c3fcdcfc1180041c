"""Datasets: fetch raw files, preprocess them into uint8 tensor splits, load those splits."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprolab.errors import DataError
from reprolab.files import read_json

SPLITS = ("train", "val", "test")
META = "meta.json"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Split:
    """Images as uint8 N x C x H x W (raw pixels, 0..255) and int64 labels."""

    x: Any  # torch.Tensor; torch is imported only by the commands that need it
    y: Any

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: Any) -> Split:
        return Split(self.x.to(device), self.y.to(device))


def load_meta(processed_dir: Path) -> dict[str, Any]:
    path = Path(processed_dir) / META
    if not path.exists():
        raise DataError(f"{path}: not found; run `reprolab preprocess` (or `dvc repro`) first")
    return read_json(path)


def data_entries(root: Path) -> list[Path]:
    """What a raw folder's manifest lists, and all preprocess may read: every entry but real
    folders and hidden entries (the manifest itself, reprolab's output marker, .DS_Store),
    which no reader touches. A symlinked folder is an entry: never entered."""
    return sorted(
        p for p in Path(root).rglob("*")
        if (p.is_symlink() or not p.is_dir())
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
        and p != Path(root) / MANIFEST
    )


def processed_digest(meta: dict[str, Any]) -> str:
    """One hash for the processed data: the hashes of its splits (meta.json records them)."""
    blob = json.dumps(meta["split_sha256"], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()


def load_split(processed_dir: Path, name: str) -> Split:
    """A split, checked against the sha256 that preprocess recorded for it in meta.json."""
    import torch

    path = Path(processed_dir) / f"{name}.pt"
    if not path.exists():
        raise DataError(f"{path}: not found; run `reprolab preprocess` (or `dvc repro`) first")
    expected = load_meta(processed_dir).get("split_sha256", {}).get(name)
    data = path.read_bytes()
    if expected is None or hashlib.sha256(data).hexdigest() != expected:
        raise DataError(
            f"{path}: content does not match the sha256 in {META} (changed, truncated or from "
            "another preprocess run); run `dvc repro preprocess` (or `reprolab preprocess`)"
        )
    blob = torch.load(io.BytesIO(data), weights_only=True)
    return Split(blob["x"], blob["y"])


def load_training_data(processed_dir: Path, device: Any) -> tuple[dict[str, Any], Split, Split]:
    """meta.json and the train and val splits, moved to `device` once."""
    meta = load_meta(processed_dir)
    train = load_split(processed_dir, "train").to(device)
    val = load_split(processed_dir, "val").to(device)
    return meta, train, val
