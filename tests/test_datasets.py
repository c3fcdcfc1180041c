"""Real on-disk formats, written small: MNIST's IDX files, CIFAR's pickled batches, a folder of
PNGs of mixed sizes and modes. Each goes through the real fetch and preprocess."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torchvision.datasets
from PIL import Image

from reprolab.data import SPLITS, fetch, load_meta, load_split, preprocess
from reprolab.errors import ConfigError, DataError


def write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    header = b"\x00\x00\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def fake_mnist(raw, folder="MNIST", n_train=100, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, gz in (("train", n_train, True), ("t10k", n_test, False)):
        y = np.arange(n) % 10
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        x[:, 0, 0] = y  # a fingerprint to check that image and label stay together
        write_idx(raw / folder / "raw" / f"{split}-images-idx3-ubyte", x, gz)
        write_idx(raw / folder / "raw" / f"{split}-labels-idx1-ubyte", y, gz)
        out[split] = (x, y)
    return out


def fake_cifar(raw, hundred=False, per_batch=20, seed=0):
    rng = np.random.default_rng(seed)
    k = 100 if hundred else 10
    folder = raw / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"
    names = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    sizes = [per_batch * (5 if hundred else 1)] * len(names)
    total = 0
    for name, n in zip(names + ["test" if hundred else "test_batch"], sizes + [per_batch],
                       strict=True):
        y = (np.arange(n) + total) % k
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        x[:, 0] = y  # red channel, top-left pixel
        x[:, 1024] = 255 - y  # green channel, top-left pixel
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": x, key: y.tolist(), "filenames": []}, fh)
        total += n
    meta_name, meta_key = ("meta", "fine_label_names") if hundred else ("batches.meta",
                                                                        "label_names")
    with open(folder / meta_name, "wb") as fh:
        pickle.dump({meta_key: [f"class{i}" for i in range(k)]}, fh)


def test_mnist_idx_files_placed_by_hand_need_no_network(make_config):
    cfg = make_config("data.dataset=mnist")
    written = fake_mnist(cfg.raw_dir)
    fetch.run(cfg)  # all four files present (two gzipped): nothing to download
    meta = preprocess.run(cfg)
    assert meta["shape"] == [1, 28, 28] and meta["classes"] == [str(d) for d in range(10)]
    assert meta["official_splits"] == ["test", "train"]
    assert meta["sizes"]["test"] == 20 and meta["sizes"]["train"] + meta["sizes"]["val"] == 100
    test = load_split(cfg.processed_dir, "test")
    np.testing.assert_array_equal(test.x[:, 0].numpy(), written["t10k"][0])  # the official test
    for name in ("train", "val"):
        split = load_split(cfg.processed_dir, name)
        np.testing.assert_array_equal(split.x[:, 0, 0, 0].numpy(), split.y.numpy())


@pytest.mark.parametrize(("dataset", "folder", "first"), [
    ("fashion_mnist", "FashionMNIST", "T-shirt/top"), ("kmnist", "KMNIST", "o"),
])
def test_other_mnist_like_sets_carry_their_class_names(make_config, dataset, folder, first):
    cfg = make_config(f"data.dataset={dataset}")
    fake_mnist(cfg.raw_dir, folder=folder)
    fetch.run(cfg)
    meta = preprocess.run(cfg)
    assert meta["classes"][0] == first and len(meta["classes"]) == 10


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_batches(make_config, hundred):
    cfg = make_config(f"data.dataset={'cifar100' if hundred else 'cifar10'}",
                      "data.val_fraction=0.5")
    fake_cifar(cfg.raw_dir, hundred=hundred, per_batch=200 if hundred else 20)
    fetch.run(cfg)
    meta = preprocess.run(cfg)
    k = 100 if hundred else 10
    assert meta["shape"] == [3, 32, 32]
    assert meta["classes"] == [f"class{i}" for i in range(k)]
    assert meta["sizes"]["test"] == (200 if hundred else 20)
    for name in SPLITS:
        split = load_split(cfg.processed_dir, name)
        # CIFAR rows are 1024 red, 1024 green, 1024 blue values: C x H x W after reshape
        np.testing.assert_array_equal(split.x[:, 0, 0, 0].numpy(), split.y.numpy())
        np.testing.assert_array_equal(split.x[:, 1, 0, 0].numpy(), 255 - split.y.numpy())
    assert cfg.data.crop_padding == 4 and cfg.data.flip is True  # CIFAR's default augmentation


def test_changed_cifar_batch_is_refused(make_config):
    cfg = make_config("data.dataset=cifar10")
    fake_cifar(cfg.raw_dir)
    fetch.run(cfg)
    batch = cfg.raw_dir / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-1] + b"\x00")
    with pytest.raises(DataError, match=r"data_batch_3: content differs"):
        preprocess.run(cfg)


def test_failed_download_names_the_files_to_place(make_config, monkeypatch):
    # A closed port on this machine: the download fails at once and nothing leaves it.
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    cfg = make_config("data.dataset=mnist")
    with pytest.raises(DataError) as info:
        fetch.run(cfg)
    message = str(info.value)
    assert message.startswith("data.dataset = 'mnist': the download failed")
    assert str(cfg.raw_dir / "MNIST/raw/train-images-idx3-ubyte") in message
    assert str(cfg.raw_dir / "MNIST/raw/t10k-labels-idx1-ubyte") in message
    assert "\n" not in message
    assert not (cfg.raw_dir / "manifest.json").exists()


def make_folder(root, per_class=16):
    """Two classes of PNGs in mixed sizes and modes, and one JPEG."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (12, 12) if i % 2 else (16, 10)
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            pixels[..., 0] = 200 * c  # red tells the class
            image = Image.fromarray(pixels, "RGB")
            if i % 3 == 1:
                image = image.convert("L")
            elif i % 3 == 2:
                image = image.convert("RGBA")
            image.save(root / name / f"{i:02d}.{'jpg' if i == 4 else 'png'}")
        (root / name / ".DS_Store").write_bytes(b"\x00")  # hidden files are left out


def test_imagefolder_mixed_sizes_and_modes(make_config, tmp_path):
    make_folder(tmp_path / "images")
    cfg = make_config("data.dataset=imagefolder", f"data.image_folder={tmp_path / 'images'}",
                      "data.image_size=8", "data.val_fraction=0.25", "data.test_fraction=0.25")
    fetch.run(cfg)
    meta = preprocess.run(cfg)
    assert meta["classes"] == ["cat", "dog"]
    assert meta["shape"] == [3, 8, 8]  # some images are RGB: three channels inferred
    assert sum(meta["sizes"].values()) == 32
    for name in SPLITS:
        split = load_split(cfg.processed_dir, name)
        red_is_class = split.x[:, 0].float().mean((1, 2)) > 100
        gray = split.x[:, 0].float() == split.x[:, 1].float()
        # RGB images keep red as the class; grayscale ones are the same in all channels
        for i in range(len(split)):
            if not bool(gray[i].all()):
                assert bool(red_is_class[i]) == bool(split.y[i] == 1)
    again = preprocess.run(cfg)
    assert again == meta  # deterministic order and split


def test_imagefolder_refuses_mixed_sizes_without_image_size(make_config, tmp_path):
    make_folder(tmp_path / "images")
    cfg = make_config("data.dataset=imagefolder", f"data.image_folder={tmp_path / 'images'}")
    fetch.run(cfg)
    with pytest.raises(DataError, match=r"images differ in size .*set data.image_size"):
        preprocess.run(cfg)


def test_imagefolder_bad_file_is_named_or_skipped(make_config, tmp_path):
    make_folder(tmp_path / "images")
    (tmp_path / "images" / "dog" / "notes.png").write_text("not an image")
    base = ["data.dataset=imagefolder", f"data.image_folder={tmp_path / 'images'}",
            "data.image_size=8", "data.channels=1"]
    cfg = make_config(*base)
    fetch.run(cfg)
    with pytest.raises(DataError, match=r"dog/notes\.png: not a readable image"):
        preprocess.run(cfg)
    cfg = make_config(*base, "data.skip_bad_images=true")
    meta = preprocess.run(cfg)
    assert meta["shape"] == [1, 8, 8]
    report = load_meta(cfg.processed_dir)  # meta, and the report beside the stage's outputs
    assert report["sizes"] == meta["sizes"]
    import json

    skipped = json.loads((cfg.report_dir("preprocess") / "report.json").read_text())
    assert skipped["skipped_files"] == ["dog/notes.png"]


def test_imagefolder_reads_only_image_extensions_and_lists_the_rest(make_config, tmp_path):
    """As torchvision's ImageFolder: notes.txt is not an image file, whatever it holds; it is
    left out (no error, skip_bad_images or not) and listed in the preprocess report."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    make_folder(tmp_path / "images")
    (tmp_path / "images" / "dog" / "notes.txt").write_text("a note, not an image")
    # a real PNG under a name that is not an image's: not read either
    Image.new("L", (8, 8), 255).save(tmp_path / "images" / "cat" / "cover.bin", format="PNG")
    # upper case and GIF (which PIL reads and reprolab always read) are images
    Image.new("L", (8, 8), 9).save(tmp_path / "images" / "cat" / "UPPER.PNG")
    Image.new("L", (8, 8), 9).save(tmp_path / "images" / "cat" / "anim.gif")
    cfg = make_config("data.dataset=imagefolder", f"data.image_folder={tmp_path / 'images'}",
                      "data.image_size=8")
    fetch.run(cfg)
    meta = preprocess.run(cfg)
    assert sum(meta["sizes"].values()) == 32 + 2
    import json

    report = json.loads((cfg.report_dir("preprocess") / "report.json").read_text())
    assert report["not_image_files"] == ["cat/cover.bin", "dog/notes.txt"]
    assert report["skipped_files"] == []
    from reprolab.data.imagefolder import IMAGE_EXTENSIONS

    assert set(IMG_EXTENSIONS) < set(IMAGE_EXTENSIONS)  # torchvision's list, and GIF


def test_imagefolder_lists_as_torchvision_does_without_importing_it(tmp_path):
    """imagefolder.py writes torchvision's rules out (importing torchvision costs a preprocess
    seconds): its extensions and GIF, any case; class folders sorted, symlinked ones included,
    hidden ones left out. Here they are held to torchvision's own functions."""
    import ast
    import os

    from torchvision.datasets import folder

    from reprolab.data import imagefolder

    assert (*folder.IMG_EXTENSIONS, ".gif") == imagefolder.IMAGE_EXTENSIONS
    for name in ("a.PNG", "b.jpeg", "c.gif", "d.txt", "e.png.bak", "f.TIFF", "webp", ".webp"):
        assert imagefolder.is_image_name(name) == folder.has_file_allowed_extension(
            name, imagefolder.IMAGE_EXTENSIONS), name
    for name in ("b", "a", "C", ".hidden", "with space"):
        (tmp_path / "root" / name).mkdir(parents=True)
    (tmp_path / "root" / "file.png").write_bytes(b"")
    os.symlink(tmp_path / "root" / "a", tmp_path / "root" / "linked")
    found, _ = folder.find_classes(tmp_path / "root")
    assert imagefolder.class_names(tmp_path / "root") == [n for n in found if n[0] != "."]
    # nothing in the module imports torchvision (or torch) any more
    with open(imagefolder.__file__) as source:
        tree = ast.parse(source.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {m for m in imported if m and m.split(".")[0] in ("torch", "torchvision")}


def test_imagefolder_class_with_too_few_images(make_config, tmp_path):
    make_folder(tmp_path / "images")
    (tmp_path / "images" / "bird").mkdir()
    Image.new("RGB", (12, 12)).save(tmp_path / "images" / "bird" / "only.png")
    cfg = make_config("data.dataset=imagefolder", f"data.image_folder={tmp_path / 'images'}",
                      "data.image_size=8")
    fetch.run(cfg)
    with pytest.raises(DataError,
                       match=r"class 'bird' has no image in the \w+ split \(1 images in all\)"):
        preprocess.run(cfg)


def test_imagefolder_needs_its_folder(make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"data.image_folder: required"):
        make_config("data.dataset=imagefolder")
    cfg = make_config("data.dataset=imagefolder", f"data.image_folder={tmp_path / 'none'}")
    with pytest.raises(ConfigError, match=r"data.image_folder = .*: not a directory"):
        fetch.run(cfg)



def test_a_relative_image_folder_is_read_from_the_project_whatever_the_cwd(
        make_config, tmp_path, monkeypatch):
    """As every path in params.yaml: `reprolab fetch --params elsewhere/params.yaml` and the
    stages called in-process read the project's photos/, not the current directory's."""
    make_folder(tmp_path / "photos")
    (tmp_path / "elsewhere" / "photos").mkdir(parents=True)  # an empty namesake in the cwd
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = make_config("data.dataset=imagefolder", "data.image_folder=photos",
                      "data.image_size=8", "data.val_fraction=0.25", "data.test_fraction=0.25")
    fetch.run(cfg)
    assert sum(preprocess.run(cfg)["sizes"].values()) == 32
    assert cfg.source.name == "imagefolder-photos"  # named as written

def _whole_pipeline(cfg):
    from reprolab import evaluate, register, train, tune

    fetch.run(cfg)
    meta = preprocess.run(cfg)
    tune.run(cfg)
    result = train.run(cfg)
    metrics = evaluate.run(cfg)
    decision = register.run(cfg)
    return meta, result, metrics, decision


def test_whole_pipeline_on_a_folder_of_images(make_config, tmp_path):
    make_folder(tmp_path / "images", per_class=10)
    cfg = make_config("data.dataset=imagefolder", f"data.image_folder={tmp_path / 'images'}",
                      "data.image_size=8", "data.val_fraction=0.2", "data.test_fraction=0.2",
                      "train.use_tuned=true", "register.model_name=folder-test",
                      "tracking.experiment=folder-test")
    meta, result, metrics, decision = _whole_pipeline(cfg)
    assert meta["classes"] == ["cat", "dog"]
    assert metrics["accuracy"] >= 0.75  # red tells the class in RGB images
    assert decision["alias"] == "champion"
    from reprolab import predict

    got = predict.run("models:/folder-test@champion", [str(tmp_path / "images" / "dog")], cfg)
    assert {p.label for p in got} <= {"cat", "dog"} and len(got) == 10


def test_whole_pipeline_on_mnist_files_placed_by_hand(make_config, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    cfg = make_config("data.dataset=mnist", "train.epochs=1", "tune.n_trials=2",
                      "tune.epochs=1", "register.model_name=mnist-test",
                      "tracking.experiment=mnist-test")
    fake_mnist(cfg.raw_dir, n_train=200, n_test=40)
    meta, result, metrics, decision = _whole_pipeline(cfg)
    assert meta["shape"] == [1, 28, 28] and meta["sizes"]["test"] == 40
    assert result.run_id and decision["version"] == "1"
