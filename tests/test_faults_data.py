"""Hostile and broken input data, on real files: image folders that reach outside themselves
(symlinks out, loops, FIFOs, sockets), decompression bombs, raw folders that hold more or less
than their manifest. Each case ends in one line and exit code 2, or, with
data.skip_bad_images: true, in the bad entries skipped and listed; nothing outside the stage's
outputs changes, and nothing from outside the image folder reaches data/raw."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import reprolab
from reprolab.data import MANIFEST
from reprolab.data.imagefolder import DEFAULT_MAX_PIXELS
from reprolab.errors import ConfigError

FOLDER = ["data.dataset=imagefolder", "data.val_fraction=0.25", "data.test_fraction=0.25"]
FETCH_OUT = ("data/raw/imagefolder-images",)  # <raw>/<the source name>
PREPROCESS_OUT = ("data/processed", "reports/preprocess/report.json")
PER_CLASS = 16  # each class draws an image into every split (data/splits.py)


# -- helpers ------------------------------------------------------------------------------------


def write_images(folder: Path) -> None:
    """Two classes of 8x8 grayscale PNGs: dark cats, bright dogs."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("cat", "dog")):
        (folder / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 100, (8, 8), dtype=np.uint8) + 150 * c
            Image.fromarray(pixels, "L").save(folder / name / f"{i:02d}.png")


def huge_png(path: Path, side: int = 30000, rows: int = 100) -> None:
    """A genuine side x side 8-bit grayscale PNG of zeros, in under 1 MB and a few ms.

    Each run of `rows` rows (a filter byte and `side` zero pixels each) deflates to the same bytes
    after a full flush, so it is compressed twice and repeated; zlib's adler32 of n zero bytes is
    (n mod 65521) << 16 | 1. (Checked once by inflating all 900 MB: valid to the last byte.)"""
    block = b"\x00" * ((side + 1) * rows)
    packer = zlib.compressobj(9)
    head = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    adler = (((side + 1) * side % 65521) << 16) | 1
    stream = head + again * (side // rows - 1) + b"\x03\x00" + struct.pack(">I", adler)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream)
                     + chunk(b"IEND", b""))


def snapshot(root: Path, outputs: tuple[str, ...] = ()) -> dict[str, str]:
    """Every entry below `root` -> its content hash, link text or kind, opening no FIFO and
    following no link. `outputs` (the stage's declared outputs) are left out, and so are the
    folders that hold them (writing an output may create those)."""
    holders = {str(Path(out).parents[i]) for out in outputs for i in range(len(Path(out).parts))}
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            if rel in outputs or any(rel.startswith(out + "/") for out in outputs):
                continue
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                seen[rel] = "link " + os.readlink(path)
            elif stat.S_ISREG(mode):
                seen[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif rel not in holders:
                seen[rel] = f"kind {stat.S_IFMT(mode)}"
    return seen


def one_error(lines: list[str], stage: str) -> str:
    """The single stderr line of a refused stage, without its prefix."""
    assert len(lines) == 1, lines  # one line: no traceback, no second message
    prefix = f"reprolab {stage}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0][len(prefix):]


def raw_files(raw: Path) -> dict[str, bytes]:
    return {p.relative_to(raw).as_posix(): p.read_bytes() for p in sorted(raw.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


@pytest.fixture
def folder(make_config, tmp_path):
    """-> (project root, its image folder, overrides): 2 classes x 16 PNGs inside the project."""
    make_config()  # the project's params.yaml
    images = tmp_path / "images"
    write_images(images)
    return tmp_path, images, [*FOLDER, f"data.image_folder={images}"]


# -- bad entries in an image folder --------------------------------------------------------------


def outside_file(images: Path, root: Path) -> tuple[Path, str]:
    secret = root / "secret.txt"  # beside the image folder, not in it
    secret.write_text("SECRET beside the folder\n")
    (images / "cat" / "notes.png").symlink_to(secret)
    return images / "cat" / "notes.png", "a symlink leading outside the folder"


def system_file(images: Path, root: Path) -> tuple[Path, str]:
    (images / "cat" / "host.png").symlink_to("/etc/hostname")
    return images / "cat" / "host.png", "a symlink leading outside the folder"


def outside_folder(images: Path, root: Path) -> tuple[Path, str]:
    other = root / "elsewhere"
    write_images(other)  # a whole folder of (readable) images
    (images / "cat" / "more").symlink_to(other / "cat")
    return images / "cat" / "more", "a symlink leading outside the folder"


def outside_image(images: Path, root: Path) -> tuple[Path, str]:
    stray = root / "stray.png"
    Image.fromarray(np.full((8, 8), 7, np.uint8), "L").save(stray)
    (images / "dog" / "stray.png").symlink_to(stray)
    return images / "dog" / "stray.png", "a symlink leading outside the folder"


def link_loop(images: Path, root: Path) -> tuple[Path, str]:
    (images / "cat" / "a.png").symlink_to("b.png")
    (images / "cat" / "b.png").symlink_to("a.png")
    return images / "cat" / "a.png", "a symlink loop"


def folder_loop(images: Path, root: Path) -> tuple[Path, str]:
    (images / "cat" / "up").symlink_to("..")
    return images / "cat" / "up", "a symlink loop (to a folder that holds it)"


def folder_link_inside(images: Path, root: Path) -> tuple[Path, str]:
    (images / "cat" / "dogs").symlink_to("../dog")  # would put every dog in two classes
    return images / "cat" / "dogs", "a symlink to a folder"


def broken_link(images: Path, root: Path) -> tuple[Path, str]:
    (images / "cat" / "gone.png").symlink_to("nowhere.png")
    return images / "cat" / "gone.png", "a broken symlink"


def fifo(images: Path, root: Path) -> tuple[Path, str]:
    os.mkfifo(images / "cat" / "pipe.png")  # opening it to copy would wait forever
    return images / "cat" / "pipe.png", "not a regular file (a FIFO)"


def unix_socket(images: Path, root: Path) -> tuple[Path, str]:
    cwd = os.getcwd()
    os.chdir(images / "dog")  # bind a short relative name: socket paths have a length limit
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind("sock.png")
    finally:
        os.chdir(cwd)
    return images / "dog" / "sock.png", "not a regular file (a socket)"


BAD_ENTRIES = [outside_file, system_file, outside_folder, outside_image, link_loop, folder_loop,
               folder_link_inside, broken_link, fifo, unix_socket]


@pytest.mark.parametrize("make_bad", BAD_ENTRIES, ids=lambda f: f.__name__)
def test_fetch_refuses_what_is_not_the_folders_own(folder, make_bad, capsys):
    root, images, overrides = folder
    bad, why = make_bad(images, root)
    before = snapshot(root, FETCH_OUT)
    code, _, err = reprolab(capsys, root, "fetch", *overrides)
    assert code == 2
    line = one_error(err, "fetch")
    shown = f"{bad} -> {os.readlink(bad)}" if bad.is_symlink() else str(bad)  # names the target
    assert line.startswith(f"{shown}: {why}; data.image_folder may hold regular files, folders "
                           "and symlinks to regular files inside it"), line
    assert "data.skip_bad_images: true" in line
    assert snapshot(root, FETCH_OUT) == before  # nothing else changed, no temp folder left
    assert not (root / FETCH_OUT[0]).exists()  # nothing copied at all


def test_skip_bad_images_leaves_every_bad_entry_out_and_lists_it(folder, capsys, caplog):
    root, images, overrides = folder
    bad = {make_bad(images, root)[0].relative_to(images).as_posix()
           for make_bad in BAD_ENTRIES} | {"cat/b.png"}  # the other half of the link loop
    (images / "cat" / "alias.png").symlink_to("00.png")  # inside the folder: copied as the file
    own = {p.read_bytes() for p in images.rglob("*") if p.is_file() and not p.is_symlink()}
    overrides = [*overrides, "data.skip_bad_images=true"]
    before = snapshot(root, FETCH_OUT + PREPROCESS_OUT)

    assert reprolab(capsys, root, "fetch", *overrides)[0] == 0
    assert reprolab(capsys, root, "preprocess", *overrides)[0] == 0

    raw = root / FETCH_OUT[0]
    copied = raw_files(raw)
    good = {f"{c}/{i:02d}.png" for c in ("cat", "dog") for i in range(PER_CLASS)}
    assert set(copied) == good | {"cat/alias.png", MANIFEST}
    assert not [p for p in raw.rglob("*") if p.is_symlink() or not (p.is_file() or p.is_dir())]
    assert all(data in own for name, data in copied.items() if name != MANIFEST)  # nothing from
    assert b"SECRET" not in b"".join(copied.values())  # outside the folder, not even a name's
    assert copied["cat/alias.png"] == (images / "cat" / "00.png").read_bytes()
    assert str(root) not in copied[MANIFEST].decode()  # a DVC output: no absolute paths
    report = json.loads((root / PREPROCESS_OUT[1]).read_text())
    assert report["skipped_files"] == sorted(bad)
    assert sum(report["sizes"].values()) == 2 * PER_CLASS + 1  # every good image, and the alias
    logged = caplog.text
    assert all(name in logged for name in bad)
    assert snapshot(root, FETCH_OUT + PREPROCESS_OUT) == before


def test_preprocess_refuses_what_fetch_skipped_once_skipping_is_off(folder, capsys):
    root, images, overrides = folder
    bad, why = fifo(images, root)
    assert reprolab(capsys, root, "fetch", *overrides, "data.skip_bad_images=true")[0] == 0
    before = snapshot(root)
    code, _, err = reprolab(capsys, root, "preprocess", *overrides)
    assert code == 2
    assert one_error(err, "preprocess").startswith(
        f"{root / FETCH_OUT[0] / MANIFEST}: fetch left out cat/pipe.png ({why})")
    assert snapshot(root) == before


# -- decompression bombs --------------------------------------------------------------------------


def bomb(images: Path) -> tuple[str, list[str], str]:
    """-> (the file, the overrides, why it is refused)."""
    huge_png(images / "cat" / "huge.png")
    why = f"900000000 pixels, more than data.max_image_pixels = {DEFAULT_MAX_PIXELS}"
    return "cat/huge.png", [], why


def above_knob_warned(images: Path) -> tuple[str, list[str], str]:
    # 144 pixels: between PIL's limit and twice it, where PIL itself only warns and decodes
    Image.new("L", (12, 12)).save(images / "cat" / "big.png")
    why = "144 pixels, more than data.max_image_pixels = 100"
    return "cat/big.png", ["data.max_image_pixels=100"], why


def above_knob_twice(images: Path) -> tuple[str, list[str], str]:
    Image.new("L", (20, 20)).save(images / "cat" / "big.png")  # 400 pixels: PIL raises
    why = "400 pixels, more than data.max_image_pixels = 100"
    return "cat/big.png", ["data.max_image_pixels=100"], why


BOMBS = [bomb, above_knob_warned, above_knob_twice]


def test_the_bomb_is_a_genuine_png(tmp_path):
    huge_png(tmp_path / "huge.png")
    assert (tmp_path / "huge.png").stat().st_size < 1 << 20
    old, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(tmp_path / "huge.png") as image:
            assert (image.size, image.mode) == ((30000, 30000), "L")
    finally:
        Image.MAX_IMAGE_PIXELS = old
    huge_png(tmp_path / "small.png", side=300)  # the same construction decodes to the last row
    with Image.open(tmp_path / "small.png") as image:
        assert image.size == (300, 300) and image.getextrema() == (0, 0)


@pytest.mark.parametrize("make_bomb", BOMBS, ids=lambda f: f.__name__)
def test_preprocess_refuses_an_image_beyond_the_pixel_limit(folder, make_bomb, capsys):
    root, images, overrides = folder
    name, knob, why = make_bomb(images)
    assert reprolab(capsys, root, "fetch", *overrides, *knob)[0] == 0  # fetch decodes nothing
    before = snapshot(root, PREPROCESS_OUT)
    code, _, err = reprolab(capsys, root, "preprocess", *overrides, *knob)
    assert code == 2
    assert one_error(err, "preprocess") == (
        f"{root / FETCH_OUT[0] / name}: not a readable image (DecompressionBombError: "
        f"{why}); remove it, or set data.skip_bad_images: true to skip such files")
    assert snapshot(root, PREPROCESS_OUT) == before
    assert not (root / "data/processed").exists()


def test_skip_bad_images_skips_images_beyond_the_limit(folder, capsys):
    root, images, overrides = folder
    huge_png(images / "cat" / "huge.png")
    Image.new("L", (12, 12)).save(images / "dog" / "big.png")
    overrides = [*overrides, "data.skip_bad_images=true", "data.max_image_pixels=100"]
    assert reprolab(capsys, root, "fetch", *overrides)[0] == 0
    assert reprolab(capsys, root, "preprocess", *overrides)[0] == 0
    report = json.loads((root / PREPROCESS_OUT[1]).read_text())
    assert report["skipped_files"] == ["cat/huge.png", "dog/big.png"]
    assert sum(report["sizes"].values()) == 2 * PER_CLASS


def test_max_image_pixels_is_a_validated_knob(make_config):
    assert make_config().data.max_image_pixels == DEFAULT_MAX_PIXELS  # predict's default
    assert make_config("data.max_image_pixels=100").data.max_image_pixels == 100
    for bad in ("0", "1.5", "many"):
        with pytest.raises(ConfigError, match=r"data\.max_image_pixels"):
            make_config(f"data.max_image_pixels={bad}")


@pytest.fixture
def fake_model(monkeypatch):
    """A tiny real torch model in place of a registry lookup: predict's own code runs."""
    import torch

    from reprolab import registry

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2), torch.nn.Softmax(1))
    monkeypatch.setattr(registry, "load_classifier",
                        lambda *args, **kwargs: (model, (1, 8, 8), ["cat", "dog"]))


def test_predict_names_each_image_beyond_the_pixel_limit(folder, fake_model, capsys):
    root, images, _ = folder
    huge_png(root / "huge.png")
    huge_png(root / "warned.png", side=12000)  # 144M pixels: PIL alone would decode it
    good = images / "cat" / "00.png"
    files = (str(good), str(root / "huge.png"), str(root / "warned.png"))
    code, out, err = reprolab(capsys, root, "predict",
                              args=("--json", "--model", "models:/x@champion", *files))
    assert code == 2
    assert err == [
        f"reprolab predict: {root / name}: cannot read image (DecompressionBombError: "
        f"{pixels} pixels, more than data.max_image_pixels = {DEFAULT_MAX_PIXELS})"
        for name, pixels in (("huge.png", 900000000), ("warned.png", 144000000))
    ]
    got = {Path(p["path"]).name: p for p in json.loads(out)}
    assert got["00.png"]["label"] in {"cat", "dog"} and got["huge.png"]["label"] is None


def test_predict_does_not_wait_on_a_fifo(tmp_path):
    from reprolab import predict

    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    outcome = []

    def load():
        try:
            predict.load_image(pipe, (1, 8, 8))
        except Exception as exc:  # noqa: BLE001 - whatever it is, the test names it
            outcome.append(exc)

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():
        with open(pipe, "wb"):  # a writer releases the blocked reader: fail, don't hang
            pass
        worker.join()
        pytest.fail("load_image waited on a FIFO")
    assert [str(exc) for exc in outcome] == ["not a regular file (a FIFO)"]


# -- raw folders hold exactly their manifest's files -----------------------------------------------


def extra_file(raw: Path) -> str:
    (raw / "extra.bin").write_bytes(b"\x00" * 10)
    return "extra.bin"


def extra_nested(raw: Path) -> str:
    (raw / "sub").mkdir()
    (raw / "sub" / "extra.npy").write_bytes(b"\x93NUMPY")
    return "sub/extra.npy"


def extra_fifo(raw: Path) -> str:
    os.mkfifo(raw / "pipe")
    return "pipe"


def extra_folder_link(raw: Path) -> str:
    (raw / "linked").symlink_to(raw.parent)  # a folder link: never entered, still an entry
    return "linked"


@pytest.mark.parametrize("make_extra", [extra_file, extra_nested, extra_fifo, extra_folder_link],
                         ids=lambda f: f.__name__)
def test_preprocess_refuses_a_file_the_manifest_lacks(project, make_extra, capsys):
    cfg = project()
    name = make_extra(cfg.raw_dir)
    before = snapshot(cfg.base_dir)
    code, _, err = reprolab(capsys, cfg.base_dir, "preprocess")
    assert code == 2
    assert one_error(err, "preprocess") == (
        f"{cfg.raw_dir / name}: not in {MANIFEST}; run `dvc repro fetch` (or `reprolab fetch`) "
        "or remove it")
    assert snapshot(cfg.base_dir) == before  # processed data untouched too


def test_preprocess_names_a_missing_file_and_counts_the_others(project, capsys):
    cfg = project()
    (cfg.raw_dir / "labels.npy").unlink()
    (cfg.raw_dir / "zz.bin").write_bytes(b"1")
    (cfg.raw_dir / "zzz.bin").write_bytes(b"2")
    before = snapshot(cfg.base_dir)
    code, _, err = reprolab(capsys, cfg.base_dir, "preprocess")
    assert code == 2
    assert one_error(err, "preprocess") == (
        f"{cfg.raw_dir / 'labels.npy'}: listed in {MANIFEST} but missing; run `dvc repro fetch` "
        "(or `reprolab fetch`)")
    (cfg.raw_dir / "labels.npy").write_bytes(b"")  # present again (wrong, but present)
    code, _, err = reprolab(capsys, cfg.base_dir, "preprocess")
    assert one_error(err, "preprocess").endswith("or remove it (and 1 more)")
    assert code == 2 and "zz.bin: not in" in err[0]
    assert snapshot(cfg.base_dir) == {**before, "data/raw/digits/labels.npy":
                                      hashlib.sha256(b"").hexdigest()}


def test_an_image_added_to_the_raw_folder_is_refused_a_hidden_one_never_read(folder, capsys):
    root, images, overrides = folder
    assert reprolab(capsys, root, "fetch", *overrides)[0] == 0
    raw = root / FETCH_OUT[0]
    hidden = raw / "cat" / ".cache"
    hidden.mkdir()
    (hidden / "thumb.png").write_bytes((images / "dog" / "00.png").read_bytes())
    (raw / ".DS_Store").write_bytes(b"\x00")
    assert reprolab(capsys, root, "preprocess", *overrides)[0] == 0
    report = json.loads((root / PREPROCESS_OUT[1]).read_text())
    assert sum(report["sizes"].values()) == 2 * PER_CLASS  # the hidden thumbnail was not read

    (raw / "cat" / "new.png").write_bytes((images / "dog" / "00.png").read_bytes())
    before = snapshot(root)
    code, _, err = reprolab(capsys, root, "preprocess", *overrides)
    assert code == 2
    assert one_error(err, "preprocess").startswith(f"{raw / 'cat/new.png'}: not in {MANIFEST}")
    assert snapshot(root) == before


def test_torchvision_raw_folder_is_checked_both_ways(make_config, capsys):
    from test_datasets import fake_mnist

    cfg = make_config("data.dataset=mnist")
    fake_mnist(cfg.raw_dir)  # two files gzipped, two not: the manifest holds what is on disk
    assert reprolab(capsys, cfg.base_dir, "fetch", "data.dataset=mnist")[0] == 0
    assert reprolab(capsys, cfg.base_dir, "preprocess", "data.dataset=mnist")[0] == 0
    extra = cfg.raw_dir / "MNIST" / "raw" / "notes.txt"
    extra.write_text("placed by hand")
    code, _, err = reprolab(capsys, cfg.base_dir, "preprocess", "data.dataset=mnist")
    assert code == 2
    assert one_error(err, "preprocess").startswith(f"{extra}: not in {MANIFEST}")


def test_fetch_refuses_a_fifo_in_a_torchvision_raw_folder(make_config, capsys):
    from test_datasets import fake_mnist

    cfg = make_config("data.dataset=mnist")
    fake_mnist(cfg.raw_dir)
    os.mkfifo(cfg.raw_dir / "MNIST" / "raw" / "pipe")  # hashing it would wait forever
    before = snapshot(cfg.base_dir)
    code, _, err = reprolab(capsys, cfg.base_dir, "fetch", "data.dataset=mnist")
    assert code == 2
    assert one_error(err, "fetch").startswith(
        f"{cfg.raw_dir / 'MNIST/raw/pipe'}: not a regular file; ")
    assert snapshot(cfg.base_dir) == before
