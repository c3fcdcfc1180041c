"""fetch stage: raw files of the configured dataset into <paths.raw>/<dataset>/ + manifest.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reprolab.config import Config
from reprolab.data import MANIFEST, digits
from reprolab.io import atomic_dir, sha256_file, write_json

FETCHERS = {"digits": digits.fetch}


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
    dest = cfg.raw_dir
    with atomic_dir(dest) as tmp:
        FETCHERS[cfg.data.dataset](tmp)
        manifest = build_manifest(tmp, cfg.data.dataset)
        write_json(tmp / MANIFEST, manifest)
    return dest


def main(cfg: Config, args: Any) -> None:
    print(f"fetch: {cfg.data.dataset} -> {run(cfg)}")
