"""The examples of docs/adapt.md, run as written: each yaml block, applied to params.yaml, trains
(and evaluates, registers) on tiny data with the example files the repository ships."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import yaml

from conftest import REPO
from reprolab import evaluate, register, train
from reprolab.config import _flatten
from reprolab.data import fetch, preprocess
from reprolab.files import read_json

DOC = REPO / "docs" / "adapt.md"


def examples() -> dict[str, dict]:
    """`<!-- example: NAME -->` followed by a yaml block -> {NAME: the block's mapping}."""
    found = re.findall(r"<!-- example: ([\w-]+) -->\s*```yaml\n(.*?)```", DOC.read_text(), re.S)
    return {name: yaml.safe_load(block) for name, block in found}


def overrides(block: dict) -> list[str]:
    """A yaml block as -S overrides, a mapping value whole (as `-S 'model.kwargs={...}'`)."""
    out = []
    for section, values in block.items():
        for key, value in values.items():
            out.append(f"{section}.{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
                       .replace("\n...", ""))
    return out


def test_every_section_of_the_page_has_its_example():
    assert set(examples()) == {"own-network", "timm", "fine-tune", "own-source", "own-metric"}
    assert _flatten(examples()["own-network"])["model.name"] == "nets.example:TinyNet"


def test_your_own_network_as_the_page_writes_it(project):
    cfg = project(*overrides(examples()["own-network"]))
    shutil.copytree(REPO / "nets", cfg.base_dir / "nets")
    train.run(cfg)
    assert evaluate.run(cfg)["accuracy"] > 0.3


def test_a_timm_model_as_the_page_writes_it(project):
    cfg = project(*overrides(examples()["timm"]), "train.epochs=1")
    train.run(cfg)
    assert "accuracy" in evaluate.run(cfg)


def _photos(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, colour in (("cat", (200, 80, 40)), ("dog", (40, 90, 210))):
        (root / "photos" / label).mkdir(parents=True)
        for i in range(16):
            pixels = rng.integers(0, 60, (80, 80, 3)).astype(np.uint8) + np.array(colour, np.uint8)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(
                root / "photos" / label / f"{i}.jpg")


def test_fine_tuning_on_your_photos_as_the_page_writes_it(make_config, monkeypatch):
    import timm
    from safetensors.torch import save_file

    cfg = make_config(*overrides(examples()["fine-tune"]), "train.epochs=3")
    monkeypatch.chdir(cfg.base_dir)
    _photos(cfg.base_dir)
    (cfg.base_dir / "weights").mkdir()
    save_file(timm.create_model("resnet18").state_dict(),
              cfg.base_dir / "weights" / "resnet18.safetensors")
    fetch.run(cfg)
    preprocess.run(cfg)
    result = train.run(cfg)
    spec = result.model[0]
    assert spec.size == (224, 224)  # the stored 64x64 images, resized on the device
    assert [round(v, 2) for v in spec.mean.flatten().tolist()] == [123.68, 116.28, 103.53]
    assert evaluate.run(cfg)["accuracy"] >= 0.5


def test_your_own_source_as_the_page_writes_it(make_config, monkeypatch):
    from PIL import Image

    cfg = make_config(*overrides(examples()["own-source"]))
    shutil.copytree(REPO / "sources", cfg.base_dir / "sources")
    monkeypatch.chdir(cfg.base_dir)
    rows = ["path,label"]
    (cfg.base_dir / "labels" / "img").mkdir(parents=True)
    for i in range(40):
        label = ("light", "dark")[i % 2]
        Image.new("L", (40, 40), (220 if label == "light" else 30) + i // 2).save(
            cfg.base_dir / "labels" / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{label}")
    (cfg.base_dir / "labels" / "train.csv").write_text("\n".join(rows) + "\n")
    fetch.run(cfg)
    assert preprocess.run(cfg)["shape"] == [1, 32, 32]
    train.run(cfg)
    assert evaluate.run(cfg)["accuracy"] == 1.0


def test_your_own_metric_as_the_page_writes_it(project):
    cfg = project(*overrides(examples()["own-metric"]), "register.model_name=docs-metric")
    shutil.copytree(REPO / "metrics", cfg.base_dir / "metrics")
    train.run(cfg)
    evaluate.run(cfg)
    assert "balanced_accuracy" in read_json(cfg.metrics_file)
    assert register.run(cfg)["metric"] == "test/balanced_accuracy"
