"""Datasets: fetch raw files, preprocess them into uint8 splits, load those splits (checked, and
mapped or held whole in memory)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprolab.errors import DataError
from reprolab.files import read_json

SPLITS = ("train", "val", "test")
META = "meta.json"
MANIFEST = "manifest.json"
FORMAT = "npy"  # the split files' format (meta.json says it): <split>.x.npy and <split>.y.npy
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Images as uint8 N x C x H x W (raw pixels, 0..255) and int64 labels."""

    x: Any  # torch.Tensor; torch is imported only by the commands that need it
    y: Any

    def __len__(self) -> int:
        return len(self.y)

    def to(self, device: Any) -> Split:
        return Split(self.x.to(device), self.y.to(device))

    @property
    def nbytes(self) -> int:
        return self.x.nelement() * self.x.element_size() + \
            self.y.nelement() * self.y.element_size()


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


def split_files(processed_dir: Path, name: str) -> list[Path]:
    return [Path(processed_dir) / f"{name}.{part}.npy" for part in ("x", "y")]


def load_split(processed_dir: Path, name: str) -> Split:
    """A split, mapped (not read into memory), checked first against the sha256 that preprocess
    recorded for it in meta.json (the files are read once, in blocks, for the hash)."""
    import warnings

    import torch

    from reprolab.data.arrays import open_array, sha256_stream

    meta = load_meta(processed_dir)
    files = split_files(processed_dir, name)
    if meta.get("format") != FORMAT:
        raise DataError(f"{Path(processed_dir) / META}: processed data in the format of an "
                        "earlier reprolab; run `dvc repro preprocess` (or `reprolab preprocess`)")
    for path in files:
        if not path.exists():
            raise DataError(f"{path}: not found; run `reprolab preprocess` (or `dvc repro`) "
                            "first")
    if sha256_stream(files) != meta.get("split_sha256", {}).get(name):
        raise DataError(
            f"{files[0].parent / name}.*.npy: content does not match the sha256 in {META} "
            "(changed, truncated or from another preprocess run); run `dvc repro preprocess` "
            "(or `reprolab preprocess`)"
        )
    with warnings.catch_warnings():  # a read-only mapping: nothing here writes to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        x, y = (torch.from_numpy(open_array(path)) for path in files)
    return Split(x, y)


def memory_budget(device: Any, budget_mb: float | None, sharers: int = 1) -> int:
    """Bytes of data that this process may hold whole on `device`: train.memory_budget_mb, or
    (None) half of what the device has free now: on a GPU its free memory; on the CPU the least
    of the machine's MemAvailable and what each memory cgroup the process is in (a container's
    limit, a `systemd-run -p MemoryMax=`) leaves under its limit, shared by the `sharers`
    processes of this machine that load the data alike (torchrun's ranks, tuning workers)."""
    if budget_mb is not None:
        return int(budget_mb * 2**20)
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        text = Path("/proc/meminfo").read_text()
        available = int(next(line.split()[1] for line in text.splitlines()
                             if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration, ValueError):  # no /proc (macOS): physical memory
        import os

        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min([available, *cgroup_room()]) // 2 // max(1, sharers)


def cgroup_room(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")
                ) -> list[int]:
    """For each memory cgroup this process is in, and each above it, that has a limit: the
    limit less the anonymous memory charged to it (page cache is the kernel's to reclaim).
    cgroup v2 (memory.max, `anon` in memory.stat) and v1 (memory.limit_in_bytes, `total_rss`);
    [] where there is none, or no /proc."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return []
    room = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            limit_file, anon_key = "memory.max", "anon"
        elif "memory" in controllers.split(","):
            base, limit_file, anon_key = root / "memory", "memory.limit_in_bytes", "total_rss"
        else:
            continue
        folder = base / path.lstrip("/")
        for level in (folder, *folder.parents):
            if not level.is_relative_to(base):
                break
            try:
                limit = (level / limit_file).read_text().strip()
                stat = (level / "memory.stat").read_text().split("\n")
            except OSError:
                continue
            if limit == "max" or int(limit) >= 2**62:  # no limit at this level
                continue
            anon = next((int(s.split()[1]) for s in stat if s.startswith(f"{anon_key} ")), 0)
            room.append(max(0, int(limit) - anon))
    return room


def load_training_data(processed_dir: Path, device: Any, budget_mb: float | None = None,
                       sharers: int = 1) -> tuple[dict[str, Any], Split, Split]:
    """meta.json and the train and val splits. When they fit the memory budget they are held
    whole on `device` (the fastest path); otherwise they stay mapped on the CPU, and fit() reads
    them batch by batch from the page cache (engine.py)."""
    meta = load_meta(processed_dir)
    train, val = load_split(processed_dir, "train"), load_split(processed_dir, "val")
    size, budget = train.nbytes + val.nbytes, memory_budget(device, budget_mb, sharers)
    if size > budget:
        log.info("data: %.0f MiB of train and val splits over a budget of %.0f MiB: read from "
                 "the mapped files, batch by batch", size / 2**20, budget / 2**20)
        return meta, train, val
    return meta, in_memory(train, device), in_memory(val, device)


def in_memory(split: Split, device: Any) -> Split:
    """The split held whole on `device`: one copy (a GPU's, or a private one on the CPU)."""
    if getattr(device, "type", str(device)) == "cpu":
        return Split(split.x.clone(), split.y.clone())
    return Split(split.x.to(device), split.y.to(device))
