"""fetch and preprocess on real data: the manifest, integrity, the split files (mapped, checked),
and splits that stay put when the data grows (data/splits.py)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from reprolab.data import MANIFEST, META, SPLITS, fetch, load_meta, load_split, preprocess
from reprolab.data.splits import assign
from reprolab.errors import DataError
from reprolab.files import read_json, sha256_file


def test_fetch_writes_raw_arrays_and_a_manifest_of_every_file(make_config):
    cfg = make_config()
    raw = fetch.run(cfg)
    manifest = read_json(raw / MANIFEST)
    assert manifest["dataset"] == "digits"
    assert set(manifest["files"]) == {"images.npy", "labels.npy"}
    for rel, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(raw / rel)
        assert entry["size"] == (raw / rel).stat().st_size
    images = np.load(raw / "images.npy")
    assert images.shape == (1797, 8, 8) and images.max() == 16
    assert not list(raw.parent.glob(".*.tmp"))  # no temp folder left behind



def test_digits_are_scikit_learns_without_importing_it():
    """fetch reads the file load_digits reads, to the same arrays, and imports no scikit-learn
    (`fetch` runs on every `dvc repro`)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from reprolab.data import digits

    images, labels = digits.bundled()
    bunch = load_digits()
    assert np.array_equal(images, bunch.images) and np.array_equal(labels, bunch.target)
    probe = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom reprolab.data import digits\ndigits.bundled()\n"
         "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy')))"],
        capture_output=True, text=True, check=True)
    assert probe.stdout.strip() == "[]"

def test_preprocess_writes_mapped_uint8_splits_with_fractions_per_class(make_config):
    cfg = make_config()
    fetch.run(cfg)
    meta = preprocess.run(cfg)
    assert meta == read_json(cfg.processed_dir / META)
    assert meta["classes"] == [str(d) for d in range(10)] and meta["shape"] == [1, 8, 8]
    assert meta["manifest_sha256"] == sha256_file(cfg.raw_dir / MANIFEST)
    sizes = meta["sizes"]
    assert sum(sizes.values()) == 1797
    # each image draws its split: the shares hold within a few binomial deviations
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=60)
    assert sizes["val"] == pytest.approx(0.15 * 1797, abs=60)
    report = read_json(cfg.report_dir("preprocess") / "report.json")
    for name, shares in report["fractions"].items():
        assert shares["test"] == pytest.approx(0.2, abs=0.12), name
        assert shares["val"] == pytest.approx(0.15, abs=0.12), name
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3)

    splits = {name: load_split(cfg.processed_dir, name) for name in SPLITS}
    for split in splits.values():
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
        assert tuple(split.x.shape[1:]) == (1, 8, 8)
        assert split.x.max() == 255  # 0..16 scaled to image pixel values
    # mapped, not read: the file is a mapping of this process
    assert str(cfg.processed_dir / "train.x.npy") in Path("/proc/self/maps").read_text()
    train = splits["train"].x.double()  # mean/std come from the train split only
    assert meta["mean"][0] == pytest.approx(train.mean().item())
    assert meta["std"][0] == pytest.approx(train.std(unbiased=False).item())


def test_a_flipped_byte_in_a_split_is_refused_at_read_time(make_config):
    cfg = make_config()
    fetch.run(cfg)
    preprocess.run(cfg)
    path = cfg.processed_dir / "val.x.npy"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"val\.\*\.npy: content does not match the sha256"):
        load_split(cfg.processed_dir, "val")


def test_the_split_rule_is_a_pure_function_of_seed_and_content():
    rng = random.Random(0)
    keys = [rng.randbytes(16) for _ in range(2000)]
    carve = {"test": 0.2, "val": 0.15}
    first = dict(zip(keys, assign(keys, 7, carve), strict=True))
    assert {k: first[k] for k in keys[:10]} == dict(zip(keys[:10], assign(keys[:10], 7, carve),
                                                        strict=True))
    shares = {s: np.mean([v == s for v in first.values()]) for s in ("train", "val", "test")}
    assert shares["test"] == pytest.approx(0.2, abs=0.03)
    assert shares["val"] == pytest.approx(0.15, abs=0.03)
    other_seed = assign(keys, 8, carve)
    assert np.mean(other_seed != np.array(list(first.values()))) > 0.3  # reshuffled on purpose


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> None:
    """Digits as PNG files, one subfolder per class, named by their index."""
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, "L").save(folder / f"{i:04d}.png")


def _digits(n_per_class: int, classes: int = 3, seed: int = 0):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    index = np.concatenate([np.flatnonzero(bunch.target == c)[:n_per_class]
                            for c in range(classes)])
    return pixels[index], bunch.target[index]


def _where(processed: Path) -> dict[bytes, str]:
    """Each image of the processed splits (by its pixels) -> the split holding it."""
    out = {}
    for name in SPLITS:
        split = load_split(processed, name)
        for image in split.x.numpy():
            out[image.tobytes()] = name
    return out


def test_adding_and_removing_images_leaves_every_other_image_in_its_split(make_config):
    """A property test over random additions and removals: the images present before and after
    each change sit in the same split, and duplicates share one."""
    images, labels = _digits(60)
    folder = make_config().base_dir / "folder"
    names = ["zero", "one", "two"]
    cfg = make_config("data.dataset=imagefolder", f"data.image_folder={folder}")
    rng = random.Random(1)
    present = set(range(90))
    before = None
    for _ in range(4):
        shutil.rmtree(folder, ignore_errors=True)
        keep = sorted(present)
        write_folder(folder, images[keep], labels[keep], names)
        fetch.run(cfg)
        preprocess.run(cfg)
        where = _where(cfg.processed_dir)
        if before is not None:
            for image in set(where) & set(before):
                assert where[image] == before[image]
        before = where
        gone = set(rng.sample(sorted(present), 5))
        present = (present - gone) | set(rng.sample(range(90, 180), 12))
    # an exact duplicate (another file, the same bytes) lands where its twin is
    dup = folder / "one" / "copy.png"
    shutil.copyfile(next((folder / "one").glob("*.png")), dup)
    fetch.run(cfg)
    preprocess.run(cfg)
    counts = {}
    for name in SPLITS:
        split = load_split(cfg.processed_dir, name).x.numpy()
        for image in split:
            counts.setdefault(image.tobytes(), []).append(name)
    assert all(len(set(where)) == 1 for where in counts.values())


def test_a_class_with_no_image_in_some_split_is_one_line(make_config):
    images, labels = _digits(40)
    folder = make_config().base_dir / "folder"
    write_folder(folder, images[:42], labels[:42], ["a", "b", "c"])  # class b: 2 images
    cfg = make_config("data.dataset=imagefolder", f"data.image_folder={folder}")
    fetch.run(cfg)
    with pytest.raises(DataError, match=r"class 'b' has no image in the \w+ split \(2 images "
                                        r"in all\); add images of it"):
        preprocess.run(cfg)
    assert not cfg.processed_dir.exists()


def test_a_folder_with_its_own_splits_keeps_them(make_config):
    images, labels = _digits(30)
    folder = make_config().base_dir / "folder"
    write_folder(folder / "train", images[::2], labels[::2], ["a", "b", "c"])
    write_folder(folder / "val", images[1::2], labels[1::2], ["a", "b", "c"])
    cfg = make_config("data.dataset=imagefolder", f"data.image_folder={folder}")
    fetch.run(cfg)
    meta = preprocess.run(cfg)
    assert meta["classes"] == ["a", "b", "c"] and meta["official_splits"] == ["train", "val"]
    val = {i.tobytes() for i in load_split(cfg.processed_dir, "val").x.numpy()}
    assert val == {i[None].tobytes() for i in images[1::2]}  # the folder's val, exactly
    assert meta["sizes"]["val"] == 45
    assert meta["sizes"]["test"] > 0  # no test/ folder: carved from train by the stable rule
    (folder / "val" / "c").rename(folder / "val" / "d")
    fetch.run(cfg)
    with pytest.raises(DataError, match=r"val: its classes \['a', 'b', 'd'\] are not train/'s "
                                        r"\['a', 'b', 'c'\]"):
        preprocess.run(cfg)
    forced = make_config("data.dataset=imagefolder", f"data.image_folder={folder}",
                         "data.folder_splits=false")
    fetch.run(forced)
    assert preprocess.run(forced)["classes"] == ["train", "val"]  # the top level, as asked


def test_changed_raw_file_is_refused_even_with_mtime_restored(make_config):
    cfg = make_config()
    raw = fetch.run(cfg)
    target = raw / "labels.npy"
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01  # same size, other content
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match=r"labels\.npy: content differs"):
        preprocess.run(cfg)
    assert not cfg.processed_dir.exists()  # nothing written


def test_missing_raw_file_and_missing_manifest_are_named(make_config):
    cfg = make_config()
    raw = fetch.run(cfg)
    (raw / "images.npy").unlink()
    with pytest.raises(DataError, match=r"images\.npy: listed in .* but missing"):
        preprocess.run(cfg)
    (raw / MANIFEST).unlink()
    with pytest.raises(DataError, match="manifest not found"):
        preprocess.run(cfg)


def test_loading_before_preprocess_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="run `reprolab preprocess`"):
        load_meta(tmp_path)
