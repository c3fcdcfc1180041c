"""fetch stage: raw files of the configured dataset into <paths.raw>/<dataset>/ + manifest.json.

digits and your own folders are written to a temp folder and renamed into place. torchvision's
sets live in torchvision's layout and are completed in place: files already there (placed by
hand on an offline machine) are kept, and only missing ones are downloaded.

The manifest lists exactly what preprocess may read (`data_entries`); preprocess refuses a raw
folder that holds anything more or less.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reprolab.config import Config
from reprolab.data import (
    MANIFEST,
    data_entries,
    digits,
    imagefolder,
    raw_top_level,
    torchvision_sets,
)
from reprolab.errors import DataError
from reprolab.files import atomic_dir, sha256_file, write_json


def build_manifest(root: Path, dataset: str) -> dict[str, Any]:
    files = {}
    for p in data_entries(root):
        if not p.is_file():  # a FIFO would block the hash forever; a folder link is not data
            raise DataError(f"{p}: not a regular file; a raw data folder may hold regular files "
                            "and folders (symlinks to regular files): remove it")
        files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p),
                                                 "size": p.stat().st_size}
    return {"dataset": dataset, "files": files}


def run(cfg: Config) -> Path:
    dest, dataset = cfg.raw_dir, cfg.data.dataset
    if dataset in torchvision_sets.SPECS:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST).unlink(missing_ok=True)  # no manifest while files may change
        torchvision_sets.fetch(dataset, dest)
        write_json(dest / MANIFEST, build_manifest(dest, dataset))
        return dest
    with atomic_dir(dest, raw_top_level(dest)) as tmp:
        skipped = {}
        if dataset == "digits":
            digits.fetch(tmp)
        else:
            skipped = imagefolder.fetch(cfg.data.image_folder, tmp, cfg.data.skip_bad_images)
        manifest = build_manifest(tmp, dataset)
        if skipped:  # preprocess lists them in its report
            manifest["skipped"] = skipped
        write_json(tmp / MANIFEST, manifest)
    return dest


def main(cfg: Config, args: Any) -> None:
    print(f"fetch: {cfg.data.dataset} -> {run(cfg)}")
