"""preprocess stage: verified raw files -> seeded stratified splits of uint8 tensors + meta.json."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from reprolab.config import Config
from reprolab.data import MANIFEST, META, SPLITS, data_entries
from reprolab.data.sources import Options
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


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int,
    classes: list[str] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded, stratified train/val/test indices, each sorted so that files are stable.

    `test_fraction` 0 leaves the test split empty (the dataset brings its own).
    """
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    counts = np.bincount(labels, minlength=len(classes) if classes else 0)
    need = 3 if test_fraction else 2
    if counts.min() < need:
        worst = int(counts.argmin())
        name = classes[worst] if classes else str(worst)
        raise DataError(
            f"class {name!r} has {int(counts.min())} images; each class needs at least {need} "
            "for the train/val/test splits"
        )
    rest, test = index, index[:0]
    try:
        if test_fraction:
            rest, test = train_test_split(
                index, test_size=test_fraction, stratify=labels, random_state=seed
            )
        val_share = val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(
            rest, test_size=val_share, stratify=labels[rest], random_state=seed
        )
    except ValueError as exc:  # too few images for one of each class in every split
        raise DataError(
            f"cannot split {len(labels)} images of {len(counts)} classes with "
            f"data.val_fraction = {val_fraction:g} and data.test_fraction = {test_fraction:g}: "
            f"{exc}; raise the fractions or add images"
        ) from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def channel_stats(
    images: np.ndarray, index: np.ndarray, chunk: int = 2048
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of images[index] (uint8 N x C x H x W) in pixel units, summed
    in chunks so that memory stays flat however many images there are."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for start in range(0, len(index), chunk):
        block = images[index[start : start + chunk]].astype(np.float64)
        total += block.sum(axis=(0, 2, 3))
        squares += np.square(block).sum(axis=(0, 2, 3))
    count = len(index) * images.shape[2] * images.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return mean.tolist(), np.maximum(std, 1e-6).tolist()


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


def collect(chunks: Any) -> tuple[np.ndarray, np.ndarray]:
    """A split's chunks as one array of images and one of labels."""
    xs, ys = zip(*chunks, strict=True) if chunks else ((), ())
    if not xs:
        return np.empty((0, 1, 1, 1), np.uint8), np.empty(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def read_raw(cfg: Config, raw_dir: Path):
    """The source's splits -> (images, labels, official test images or None, their labels,
    classes, skipped, files left out for not being images by their extension)."""
    images = cfg.source.read(raw_dir, Options.of(cfg.data))
    x, y = collect(list(images.splits["train"]()))
    test = images.splits.get("test")
    tx, ty = collect(list(test())) if test else (None, None)
    return x, y, tx, ty, images.classes, images.skipped, images.not_images


def run(cfg: Config) -> dict[str, Any]:
    import torch

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
    images, labels, test_x, test_y, classes, skipped, ignored = read_raw(cfg, raw_dir)
    skipped = sorted({*left_out, *skipped})
    official = test_x is not None
    index = stratified_split(labels, cfg.data.val_fraction,
                             0.0 if official else cfg.data.test_fraction, cfg.seed, classes)
    mean, std = channel_stats(images, index["train"])
    sizes = {name: len(index[name]) for name in SPLITS}
    if official:
        sizes["test"] = len(test_y)
    meta = {
        "dataset": dataset,
        "classes": classes,
        "num_classes": len(classes),
        "shape": list(images.shape[1:]),
        "mean": mean,
        "std": std,
        "sizes": sizes,
        "official_test_split": official,
        "manifest_sha256": manifest_hash,
        "seed": cfg.seed,
    }
    with atomic_dir(cfg.processed_dir) as tmp:
        for name in SPLITS:  # one split in memory at a time
            if name == "test" and official:
                x, y = test_x, test_y
            else:
                x, y = images[index[name]], labels[index[name]]
            torch.save({"x": torch.from_numpy(np.ascontiguousarray(x)),
                        "y": torch.from_numpy(np.ascontiguousarray(y))}, tmp / f"{name}.pt")
            del x, y
            # checked on every load: a changed or truncated split is refused, never trained on
            meta.setdefault("split_sha256", {})[name] = sha256_file(tmp / f"{name}.pt")
        write_json(tmp / META, meta)
    write_json(cfg.report_dir("preprocess") / REPORT_FILE,
               {"sizes": sizes, "skipped_files": skipped, "not_image_files": ignored,
                "official_test_split": official})
    log.info("preprocess: %s -> %s", meta["sizes"], cfg.processed_dir)
    return meta


def main(cfg: Config, args: Any) -> None:
    meta = run(cfg)
    print(f"preprocess: {meta['dataset']} {meta['sizes']} -> {cfg.processed_dir}")
