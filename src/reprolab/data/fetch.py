"""fetch stage: raw files of the configured source into <paths.raw>/<name>/ + manifest.json.

A source's files are written to a temp folder and renamed into place. Sources that complete in
place (torchvision's sets, in torchvision's layout) keep files already there (placed by hand on
an offline machine) and only add the missing ones.

The manifest lists exactly what preprocess may read (`data_entries`); preprocess refuses a raw
folder that holds anything more or less.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reprolab.config import Config
from reprolab.data import MANIFEST, data_entries
from reprolab.data.sources import Options
from reprolab.errors import DataError
from reprolab.files import atomic_dir, sha256_file, write_json


def build_manifest(root: Path, dataset: str, skipped: dict[str, str]) -> dict[str, Any]:
    """The sha256 and size of every entry of the raw folder, and what fetch left out (preprocess
    lists it in its report)."""
    files = {}
    for p in data_entries(root):
        if not p.is_file():  # a FIFO would block the hash forever; a folder link is not data
            raise DataError(f"{p}: not a regular file; a raw data folder may hold regular files "
                            "and folders (symlinks to regular files): remove it")
        files[p.relative_to(root).as_posix()] = {"sha256": sha256_file(p),
                                                 "size": p.stat().st_size}
    manifest: dict[str, Any] = {"dataset": dataset, "files": files}
    if skipped:
        manifest["skipped"] = skipped
    return manifest


def run(cfg: Config) -> Path:
    source, dest = cfg.source, cfg.raw_dir
    if getattr(source, "complete_in_place", False):
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST).unlink(missing_ok=True)  # no manifest while files may change
        skipped = source.fetch(dest, Options.of(cfg.data)) or {}
        write_json(dest / MANIFEST, build_manifest(dest, source.name, skipped))
        return dest
    with atomic_dir(dest) as tmp:
        skipped = source.fetch(tmp, Options.of(cfg.data)) or {}
        write_json(tmp / MANIFEST, build_manifest(tmp, source.name, skipped))
    return dest


def main(cfg: Config, args: Any) -> None:
    print(f"fetch: {cfg.source.name} -> {run(cfg)}")
