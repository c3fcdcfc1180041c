"""fetch stage: raw files of the configured dataset into <paths.raw>/<dataset>/ + manifest.json.

digits and your own folders are written to a temp folder and renamed into place. torchvision's
sets live in torchvision's layout and are completed in place: files already there (placed by
hand on an offline machine) are kept, and only missing ones are downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reprolab.config import Config
from reprolab.data import MANIFEST, digits, imagefolder, torchvision_sets
from reprolab.io import atomic_dir, sha256_file, write_json


def build_manifest(root: Path, dataset: str) -> dict[str, Any]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {
        "dataset": dataset,
        "files": {
            p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in files
        },
    }


def run(cfg: Config) -> Path:
    dest, dataset = cfg.raw_dir, cfg.data.dataset
    if dataset in torchvision_sets.SPECS:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST).unlink(missing_ok=True)  # no manifest while files may change
        torchvision_sets.fetch(dataset, dest)
        write_json(dest / MANIFEST, build_manifest(dest, dataset))
        return dest
    with atomic_dir(dest) as tmp:
        if dataset == "digits":
            digits.fetch(tmp)
        else:
            imagefolder.fetch(cfg.data.image_folder, tmp)
        write_json(tmp / MANIFEST, build_manifest(tmp, dataset))
    return dest


def main(cfg: Config, args: Any) -> None:
    print(f"fetch: {cfg.data.dataset} -> {run(cfg)}")
