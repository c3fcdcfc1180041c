"""fetch and preprocess on the real bundled digits: manifest, integrity, stratified splits."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from reprolab.data import MANIFEST, META, SPLITS, fetch, load_meta, load_split, preprocess
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


def test_preprocess_writes_stratified_uint8_splits_and_meta(make_config):
    cfg = make_config()
    fetch.run(cfg)
    meta = preprocess.run(cfg)
    assert meta == read_json(cfg.processed_dir / META)
    assert meta["classes"] == [str(d) for d in range(10)]
    assert meta["shape"] == [1, 8, 8]
    assert meta["manifest_sha256"] == sha256_file(cfg.raw_dir / MANIFEST)
    sizes = meta["sizes"]
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == pytest.approx(0.2 * 1797, abs=1)
    assert sizes["val"] == pytest.approx(0.15 * 1797, abs=1)

    splits = {name: load_split(cfg.processed_dir, name) for name in SPLITS}
    overall = np.bincount(np.concatenate([s.y.numpy() for s in splits.values()])) / 1797
    for name, split in splits.items():
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
        assert tuple(split.x.shape[1:]) == (1, 8, 8)
        assert split.x.max() == 255  # 0..16 scaled to image pixel values
        share = np.bincount(split.y.numpy(), minlength=10) / len(split)
        assert np.abs(share - overall).max() < 0.02, name  # stratified

    # mean/std come from the train split only
    train = splits["train"].x.double()
    assert meta["mean"][0] == pytest.approx(train.mean().item())
    assert meta["std"][0] == pytest.approx(train.std(unbiased=False).item())
    test_mean = splits["test"].x.double().mean().item()
    assert meta["mean"][0] != pytest.approx(test_mean, abs=1e-6)


def test_splits_are_disjoint_and_identical_for_the_same_seed():
    labels = np.repeat(np.arange(10), 50)
    a = preprocess.stratified_split(labels, 0.15, 0.2, seed=1)
    b = preprocess.stratified_split(labels, 0.15, 0.2, seed=1)
    c = preprocess.stratified_split(labels, 0.15, 0.2, seed=2)
    for name in SPLITS:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["test"], c["test"])
    everything = np.concatenate([a[name] for name in SPLITS])
    assert sorted(everything) == list(range(500))


def test_too_few_images_in_a_class_is_a_clear_error():
    labels = np.array([0] * 20 + [1] * 2)
    with pytest.raises(DataError, match="class '1' has 2 images"):
        preprocess.stratified_split(labels, 0.15, 0.2, seed=0)


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


def test_too_small_splits_are_a_clear_error():
    labels = np.repeat(np.arange(10), 5)  # 50 images: a 10% validation split holds 5 < 10
    with pytest.raises(DataError, match=r"cannot split 50 images of 10 classes with "
                                        r"data.val_fraction = 0.1"):
        preprocess.stratified_split(labels, 0.1, 0.0, seed=0)


def test_loading_before_preprocess_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="run `reprolab preprocess`"):
        load_meta(tmp_path)
