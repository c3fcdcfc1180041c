"""preprocess stage: verified raw files -> train, val and test splits (uint8 arrays that can be
memory-mapped, data/arrays.py) + meta.json, written in one streaming pass: memory stays flat in
the data's size. Each image's split is stable (data/splits.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from reprolab.config import Config
from reprolab.data import FORMAT, MANIFEST, META, SPLITS, data_entries
from reprolab.data.arrays import ArrayWriter, sha256_stream
from reprolab.data.sources import Images, Options
from reprolab.data.splits import assign, fractions, key_of
from reprolab.errors import DataError
from reprolab.files import atomic_dir, read_json, sha256_file, write_json
from reprolab.lifecycle import startup_over

log = logging.getLogger(__name__)
REPORT_FILE = "report.json"


def verify_manifest(raw_dir: Path) -> str:
    """The raw folder must hold exactly the files its manifest lists, each with the size and
    sha256 recorded there; -> the manifest's own hash."""
    path = raw_dir / MANIFEST
    if not path.exists():
        raise DataError(f"{path}: manifest not found; run `reprolab fetch` first")
    listed = read_json(path)["files"]
    same_entries(raw_dir, set(listed))
    for rel, entry in listed.items():
        file = raw_dir / rel
        if not file.is_file():  # a FIFO in its place would block the hash forever
            raise DataError(f"{file}: not a regular file, {MANIFEST} lists one; "
                            "run `dvc repro fetch` (or `reprolab fetch`)")
        # Content, not modification time: a changed file with its mtime restored is still caught.
        if file.stat().st_size != entry["size"] or sha256_file(file) != entry["sha256"]:
            raise DataError(
                f"{file}: content differs from {path} (sha256 mismatch); "
                "the raw data changed since fetch, run `reprolab fetch` again"
            )
    return sha256_file(path)


def on_disk(raw_dir: Path) -> set[str]:
    """Entries a manifest must list (the rule fetch lists them by)."""
    return {p.relative_to(raw_dir).as_posix() for p in data_entries(raw_dir)}


def same_entries(raw_dir: Path, listed: set[str]) -> None:
    """Refuse an entry the manifest lacks (it would be read unverified) or one it lists that is
    gone, naming the first of them."""
    found = on_disk(raw_dir)
    fix = "run `dvc repro fetch` (or `reprolab fetch`)"
    for names, problem in ((listed - found, f"listed in {MANIFEST} but missing; {fix}"),
                           (found - listed, f"not in {MANIFEST}; {fix} or remove it")):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise DataError(f"{raw_dir / min(names)}: {problem}{more}")


def fetch_skipped(manifest: dict[str, Any], raw_dir: Path, skip_bad: bool) -> list[str]:
    """Entries of the image folder that fetch left out (data.skip_bad_images) -> their paths.
    Refused when skip_bad_images is now false: no image may go missing unannounced."""
    skipped = manifest.get("skipped", {})
    for rel, why in sorted(skipped.items()):
        if not skip_bad:
            raise DataError(
                f"{raw_dir / MANIFEST}: fetch left out {rel} ({why}) under "
                "data.skip_bad_images: true, which is now false; run `dvc repro fetch` "
                "(or `reprolab fetch`)"
            )
        log.warning("skipped by fetch: %s: %s", rel, why)
    return sorted(skipped)


class SplitWriters:
    """The three splits' files, written a chunk at a time, with the train split's pixel sums
    (its mean and std) and every split's class counts kept as they go."""

    def __init__(self, folder: Path, classes: int):
        self.folder, self.classes = folder, classes
        self.files = {s: (ArrayWriter(folder / f"{s}.x.npy", np.uint8),
                          ArrayWriter(folder / f"{s}.y.npy", np.int64)) for s in SPLITS}
        self.counts = {s: np.zeros(classes, np.int64) for s in SPLITS}
        self.shape: tuple[int, ...] | None = None
        self.sums: np.ndarray | None = None
        self.squares: np.ndarray | None = None

    def write(self, split: str, x: np.ndarray, y: np.ndarray) -> None:
        if self.shape is None:
            self.shape = x.shape[1:]
            self.sums, self.squares = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        if x.shape[1:] != self.shape:
            raise DataError(f"images of {'x'.join(map(str, x.shape[1:]))} after "
                            f"{'x'.join(map(str, self.shape))} ones; a source yields one shape")
        if len(y) and (y.min() < 0 or y.max() >= self.classes):
            raise DataError(f"labels {int(y.min())}..{int(y.max())} for {self.classes} classes")
        xs, ys = self.files[split]
        xs.append(x)
        ys.append(y)
        self.counts[split] += np.bincount(y, minlength=self.classes)
        if split == "train":
            pixels = x.astype(np.float64)
            self.sums += pixels.sum(axis=(0, 2, 3))
            self.squares += np.square(pixels).sum(axis=(0, 2, 3))

    def close(self) -> dict[str, str]:
        """-> each split's sha256 (its two files, read back in blocks)."""
        hashes = {}
        for split, (xs, ys) in self.files.items():
            xs.close(self.shape or ())
            ys.close()
            hashes[split] = sha256_stream([xs.path, ys.path])
        return hashes

    def stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the train split, in pixel units."""
        count = self.counts["train"].sum() * self.shape[1] * self.shape[2]
        mean = self.sums / count
        std = np.sqrt(np.maximum(self.squares / count - mean**2, 0.0))
        return mean.tolist(), np.maximum(std, 1e-6).tolist()


def write_splits(images: Images, folder: Path, seed: int, val: float, test: float
                 ) -> SplitWriters:
    """Stream the source's splits into the split files. What the source does not bring itself
    (val, test) is carved out of its train split by the stable rule (data/splits.py)."""
    carve = {s: f for s, f in (("test", test), ("val", val)) if s not in images.splits}
    writers = SplitWriters(folder, len(images.classes))
    for split, chunks in images.splits.items():
        for chunk in chunks():
            x, y = chunk[0], np.asarray(chunk[1], dtype=np.int64)
            if split != "train" or not carve:
                writers.write(split, x, y)
                continue
            keys = chunk[2] if len(chunk) > 2 else [key_of(image) for image in x]
            names = assign(list(keys), seed, carve)
            for name in SPLITS:
                mask = names == name
                if mask.any():
                    writers.write(name, x[mask], y[mask])
    return writers


def run(cfg: Config) -> dict[str, Any]:
    raw_dir = cfg.raw_dir
    manifest_hash = verify_manifest(raw_dir)
    manifest = read_json(raw_dir / MANIFEST)
    dataset = manifest["dataset"]
    if dataset != cfg.source.name:
        raise DataError(
            f"{raw_dir / MANIFEST}: holds dataset {dataset!r}, params say {cfg.source.name!r}"
        )
    left_out = fetch_skipped(manifest, raw_dir, cfg.data.skip_bad_images)
    startup_over()  # reading the raw files can be long: the garbage collector back on
    images = cfg.source.read(raw_dir, Options.of(cfg.data))
    with atomic_dir(cfg.processed_dir) as tmp:
        writers = write_splits(images, tmp, cfg.seed, cfg.data.val_fraction,
                               cfg.data.test_fraction)
        hashes = writers.close()  # checked on every load: a changed split is never trained on
        shares = fractions(writers.counts, images.classes)  # refuses a class missing somewhere
        mean, std = writers.stats()
        sizes = {s: int(c.sum()) for s, c in writers.counts.items()}
        meta = {
            "dataset": dataset,
            "classes": images.classes,
            "num_classes": len(images.classes),
            "shape": list(writers.shape),
            "mean": mean,
            "std": std,
            "sizes": sizes,
            "official_splits": sorted(images.splits),
            "manifest_sha256": manifest_hash,
            "seed": cfg.seed,
            "format": FORMAT,
            "split_sha256": hashes,
        }
        write_json(tmp / META, meta)
    skipped = sorted({*left_out, *images.skipped})
    write_json(cfg.report_dir("preprocess") / REPORT_FILE,
               {"sizes": sizes, "fractions": shares, "skipped_files": skipped,
                "not_image_files": images.not_images, "official_splits": sorted(images.splits)})
    log.info("preprocess: %s -> %s", sizes, cfg.processed_dir)
    return meta


def main(cfg: Config, args: Any) -> None:
    meta = run(cfg)
    print(f"preprocess: {meta['dataset']} {meta['sizes']} -> {cfg.processed_dir}")
