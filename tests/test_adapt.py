"""Your own network, data source and metric, timm as the zoo, fine-tuning offline: each one file
of yours and one line of params.yaml, never an edit of src/reprolab/ (README: Adapt it to your
work). Real libraries, tiny data, nothing downloaded: the tests make their weights themselves."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from conftest import REPO, TINY, cli_argv, one_error, reprolab, training_run_id
from reprolab import evaluate, register, train
from reprolab.data import Split, load_training_data
from reprolab.device import seed_everything
from reprolab.engine import Hyper, fit
from reprolab.files import read_json, sha256_file
from reprolab.models import build, head_name, load_checkpoint, model_spec
from reprolab.pretrained import Weights, load_into

OWN = "model.name=nets.example:TinyNet"


def with_examples(cfg, *folders: str):
    """The repository's example folders (nets/, sources/, metrics/) in the test's project."""
    for folder in folders:
        shutil.copytree(REPO / folder, cfg.base_dir / folder)
    return cfg


# ---- your own network ----


def test_your_own_network_trains_and_its_spec_rebuilds_it(project):
    cfg = with_examples(project(OWN, "model.kwargs={hidden: 24}"), "nets")
    result = train.run(cfg)
    evaluate.run(cfg)
    spec = torch.load(cfg.model_file, weights_only=True)["spec"]
    assert (spec["name"], spec["kwargs"]) == ("nets.example:TinyNet", {"hidden": 24})
    model, _ = load_checkpoint(cfg.model_file, cfg.base_dir)
    assert model[1].head.in_features == 24  # rebuilt from the spec by evaluate, verify, resume
    tags = MlflowClient().get_run(result.run_id).data.tags
    assert tags["model.code_sha256"] == spec["code_sha256"] and len(spec["code_sha256"]) == 64
    assert result.history[-1]["val/accuracy"] > 0.3  # it learns (10 classes)


def test_editing_your_network_changes_the_study_and_the_checkpoint_identity(project):
    from reprolab import space

    cfg = with_examples(project(OWN), "nets")
    meta = read_json(cfg.processed_dir / "meta.json")
    before = space.study_name(cfg, meta)
    net = cfg.base_dir / "nets" / "example.py"
    net.write_text(net.read_text().replace("nn.ReLU()", "nn.GELU()"))
    assert space.study_name(cfg, meta) != before  # an edited net starts a new study


def test_a_timm_architecture_trains_and_evaluates(project):
    cfg = project("model.name=timm/test_resnet", "model.kwargs={}", "train.epochs=2")
    result = train.run(cfg)
    metrics = evaluate.run(cfg)
    assert torch.load(cfg.model_file, weights_only=True)["spec"]["name"] == "timm/test_resnet"
    assert metrics["accuracy"] > 0.2 and result.history[-1]["train/loss"] < 2.3


# ---- fine-tuning ----


def _digits(processed_once):
    return load_training_data(processed_once / "data" / "processed", "cpu")


def _tiny(meta, classes: int, seed: int):
    seed_everything(seed)
    spec = model_spec("nets.example:TinyNet", meta["shape"], classes, meta["mean"], meta["std"],
                      {"hidden": 16})
    return build(spec, REPO)


def test_fine_tuning_reaches_the_accuracy_in_fewer_steps_than_from_scratch(processed_once):
    """Task A: the ten digits. Task B, related: the same digits under other names (the classes
    renamed), from 50 labelled images. The backbone trained on A, frozen under a new head,
    reaches 70% validation accuracy on B within 6 epochs; the same architecture from scratch,
    same seed and settings, does not."""
    meta, train_split, val = _digits(processed_once)
    pretrain = _tiny(meta, 10, seed=0)
    fit(pretrain, train_split, val, Hyper(optimizer="adam", lr=3e-3, epochs=10, batch_size=32))
    weights = Weights(pretrain[1].state_dict(), "weights/digits.pt", "0" * 64)
    few = torch.randperm(len(train_split), generator=torch.Generator().manual_seed(0))[:50]
    task_b = Split(train_split.x[few], (train_split.y[few] + 3) % 10)
    val_b = Split(val.x, (val.y + 3) % 10)

    def epochs_to(target: float, pretrained: bool) -> int | None:
        model = _tiny(meta, 10, seed=1)
        head = ""
        if pretrained:
            head = head_name(model)
            load_into(model, weights, head, None)
        curve = []
        fit(model, task_b, val_b, Hyper(optimizer="adam", lr=0.03, epochs=6, batch_size=10,
                                        head=head, freeze_epochs=6 if pretrained else 0),
            on_epoch=lambda row: curve.append(row["val/accuracy"]))
        return next((epoch for epoch, acc in enumerate(curve, 1) if acc >= target), None)

    assert epochs_to(0.70, pretrained=True) is not None
    assert epochs_to(0.70, pretrained=False) is None


def _pretrain_file(cfg, processed_once, name: str = "digits.pt") -> Path:
    meta, train_split, val = _digits(processed_once)
    model = _tiny(meta, 10, seed=0)
    fit(model, train_split, val, Hyper(optimizer="adam", lr=3e-3, epochs=1, batch_size=64))
    path = cfg.base_dir / "weights" / name
    path.parent.mkdir(exist_ok=True)
    torch.save(model[1].state_dict(), path)
    return path


def test_a_frozen_backbone_is_bit_identical_after_training_and_the_head_is_not(
        project, processed_once):
    cfg = with_examples(project(OWN, "model.kwargs={hidden: 16}"), "nets")
    weights = _pretrain_file(cfg, processed_once)
    cfg = project(OWN, "model.kwargs={hidden: 16}", "model.pretrained=weights/digits.pt",
                  "train.freeze_backbone=true")
    result = train.run(cfg)
    start = torch.load(weights, weights_only=True)
    trained = torch.load(cfg.model_file, weights_only=True)
    net = {k.removeprefix("1."): v for k, v in trained["state_dict"].items() if k[:2] == "1."}
    backbone = [k for k in net if not k.startswith("head.")]
    assert backbone and all(torch.equal(net[k], start[k]) for k in backbone)  # BN stats too
    assert not torch.equal(net["head.weight"], start["head.weight"])
    assert trained["spec"]["pretrained"] == {"source": "weights/digits.pt",
                                             "sha256": sha256_file(weights)}
    tags = MlflowClient().get_run(result.run_id).data.tags
    assert tags["model.pretrained_sha256"] == sha256_file(weights)


def test_the_backbone_trains_at_its_own_rate_after_its_frozen_epochs(project, processed_once):
    cfg = with_examples(project(OWN, "model.kwargs={hidden: 16}"), "nets")
    _pretrain_file(cfg, processed_once)
    cfg = project(OWN, "model.kwargs={hidden: 16}", "model.pretrained=weights/digits.pt",
                  "train.freeze_backbone=1", "train.backbone_lr_scale=0.1",
                  "train.schedule=constant", "train.epochs=2")
    seen = []
    original = fit

    def spying(model, *args, **kwargs):
        on_epoch = kwargs.get("on_epoch")

        def watch(row):
            seen.append({k: v.detach().clone() for k, v in model[1].state_dict().items()})
            if on_epoch:
                on_epoch(row)
        return original(model, *args, **{**kwargs, "on_epoch": watch})

    from reprolab import checkpoint

    checkpoint.fit, saved = spying, checkpoint.fit
    try:
        train.run(cfg)
    finally:
        checkpoint.fit = saved
    start = torch.load(cfg.base_dir / "weights" / "digits.pt", weights_only=True)
    first, second = seen
    assert torch.equal(first["backbone.0.weight"], start["backbone.0.weight"])  # frozen
    assert not torch.equal(second["backbone.0.weight"], first["backbone.0.weight"])  # trains


def test_timm_weights_load_from_a_cache_the_test_fills_with_the_hub_off(project, tmp_path):
    """model.pretrained: true reads timm's own weights from the Hugging Face cache, offline:
    the test writes them there in the hub's layout, as a download would have."""
    import timm
    from safetensors.torch import save_file

    cfg = project("model.name=timm/test_resnet.r160_in1k", "model.kwargs={}",
                  "model.pretrained=true", "model.input_size=32", "train.epochs=1",
                  "train.freeze_backbone=true")
    cache = tmp_path / "hub"
    snapshot = cache / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--timm--test_resnet.r160_in1k" / "refs").mkdir()
    (cache / "models--timm--test_resnet.r160_in1k" / "refs" / "main").write_text("0" * 40)
    torch.manual_seed(3)
    weights = timm.create_model("test_resnet", num_classes=1000).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, snapshot / "model.safetensors")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    args = cli_argv("train", cfg.base_dir, *TINY, "model.name=timm/test_resnet.r160_in1k",
                    "model.kwargs={}", "model.pretrained=true", "model.input_size=32",
                    "train.epochs=1", "train.freeze_backbone=true")
    proc = subprocess.run([sys.executable, "-m", "reprolab", *args], cwd=cfg.base_dir, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    trained = torch.load(cfg.model_file, weights_only=True)
    assert trained["spec"]["pretrained"]["source"] == "timm/test_resnet.r160_in1k"
    assert trained["spec"]["in_chans"] == 3 and trained["spec"]["input_size"] == [32, 32]
    net = trained["state_dict"]
    assert torch.equal(net["1.conv1.0.weight"], weights["conv1.0.weight"])  # frozen: as cached
    # the model takes the data's 1x8x8 raw pixels: gray repeated to 3 channels, resized, timm's
    # mean and std (0.5, 0.5) in pixel units
    assert net["0.mean"].flatten().tolist() == [127.5] * 3
    missing = {**env, "HF_HUB_CACHE": str(tmp_path / "empty")}
    proc = subprocess.run([sys.executable, "-m", "reprolab", *args], cwd=cfg.base_dir,
                          env=missing, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "reprolab train: error: model.pretrained = true: no weights of timm/test_resnet.r160_in1k"
        " in the local cache (model.allow_download is false: no download) "
        f"({tmp_path / 'empty'}); allowed: put them in the cache, set model.allow_download: "
        "true, or give a file under weights/"]


# ---- your own data source and metric ----


def _csv_images(root: Path) -> Path:
    """labels/train.csv with 24 PNG images of two classes (bright top or bright bottom)."""
    from PIL import Image

    folder = root / "labels"
    (folder / "png").mkdir(parents=True)
    rows = ["path,label"]
    for i in range(24):
        label = ("top", "bottom")[i % 2]
        pixels = np.full((10, 10), 20, dtype=np.uint8)
        pixels[(slice(0, 5) if label == "top" else slice(5, 10)), :] = 230 - i
        Image.fromarray(pixels).save(folder / "png" / f"{i:02d}.png")
        rows.append(f"png/{i:02d}.png,{label}")
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    return folder / "train.csv"


def test_your_own_data_source_fetches_preprocesses_and_trains(make_config, monkeypatch):
    cfg = make_config("data.dataset=sources.example:CsvSource",
                      "data.kwargs={csv: labels/train.csv}", "data.val_fraction=0.25",
                      "data.test_fraction=0.25")
    with_examples(cfg, "sources")
    _csv_images(cfg.base_dir)
    from reprolab.data import fetch, preprocess

    monkeypatch.chdir(cfg.base_dir)  # the CSV's path is the repository's, where stages run
    fetch.run(cfg)
    assert cfg.raw_dir == cfg.base_dir / "data" / "raw" / "csv-train"
    manifest = read_json(cfg.raw_dir / "manifest.json")
    assert manifest["dataset"] == "csv-train" and "png/00.png" in manifest["files"]
    meta = preprocess.run(cfg)
    assert meta["classes"] == ["bottom", "top"] and meta["shape"] == [1, 10, 10]
    assert cfg.registered_model_name == "reprolab-csv-train"
    result = train.run(cfg)
    assert result.history[-1]["val/accuracy"] > 0.5


def test_your_own_metric_is_computed_logged_and_gates_register(project):
    cfg = with_examples(project("evaluate.metrics={balanced_accuracy: "
                                "metrics.example:balanced_accuracy}",
                                "register.metric=balanced_accuracy",
                                "register.model_name=own-metric"), "metrics")
    train.run(cfg)
    metrics = evaluate.run(cfg)
    assert 0 < metrics["balanced_accuracy"] <= 1
    assert read_json(cfg.metrics_file)["balanced_accuracy"] == metrics["balanced_accuracy"]
    run = MlflowClient().get_run(training_run_id(cfg))
    assert run.data.metrics["test/balanced_accuracy"] == pytest.approx(
        metrics["balanced_accuracy"])
    decision = register.run(cfg)
    assert decision["metric"] == "test/balanced_accuracy" and decision["alias"] == "champion"
    assert MlflowClient().get_registered_model("own-metric").tags[
        "reprolab.gate.metric"] == "balanced_accuracy"


# ---- bad input: one line, exit 2, nothing written ----


def _bad_net(root: Path, text: str) -> None:
    (root / "nets").mkdir(exist_ok=True)
    (root / "nets" / "bad.py").write_text(text)


BAD_MODELS = [
    ("model.name=nets.missing:Net", None,
     "model.name = 'nets.missing:Net': cannot import nets.missing (ModuleNotFoundError"),
    ("model.name=nets.bad:NOT_A_NET", "NOT_A_NET = 3\n",
     "model.name = 'nets.bad:NOT_A_NET': a int, not a callable"),
    ("model.name=nets.bad:make", "def make(num_classes, in_chans, hidden=1):\n    return 'net'\n",
     "model.name = 'nets.bad:make': built a str, not a torch.nn.Module"),
    ("model.kwargs={width: 3}", None,
     "model.kwargs = {'width': 3}: nets.example:TinyNet refuses them"),
    ("model.name=timm/resnet_18", None,
     "model.name = 'timm/resnet_18': timm has no architecture 'resnet_18'; did you mean "
     "timm/resnet18"),
]


@pytest.mark.parametrize(("override", "source", "message"), BAD_MODELS,
                         ids=["no-module", "not-callable", "not-a-module", "kwargs", "timm"])
def test_a_model_that_cannot_be_built_is_one_line_before_any_output(
        project, capsys, override, source, message):
    cfg = with_examples(project(), "nets")
    if source:
        _bad_net(cfg.base_dir, source)
    runs_before = len(MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()]))
    name = () if override.startswith("model.name") else (OWN,)
    code, _, err = reprolab(capsys, cfg.base_dir, "train", *TINY, *name, override)
    assert code == 2
    assert one_error(err, "train").startswith(message)
    assert not cfg.models_dir.exists()
    assert len(MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()])) == runs_before


def _weights(root: Path, kind: str) -> str:
    folder = root / "weights"
    folder.mkdir(exist_ok=True)
    if kind == "pickled":
        torch.save({"state": object()}, folder / "w.pt")  # an object: pickled code to run
    elif kind == "not-a-state-dict":
        torch.save([torch.zeros(3)], folder / "w.pt")
    elif kind == "other-architecture":
        seed_everything(0)
        torch.save(torch.nn.Linear(64, 10).state_dict(), folder / "w.pt")
    return "model.pretrained=weights/w.pt"


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "model.pretrained = 'weights/w.pt': not found"),
    ("pickled", "model.pretrained = 'weights/w.pt': holds pickled code or objects other than "
                "tensors"),
    ("not-a-state-dict", "model.pretrained = 'weights/w.pt': not a state dict"),
    ("other-architecture", "model.pretrained = 'weights/w.pt': not weights of this network: "),
])
def test_weights_that_cannot_be_loaded_are_one_line_before_any_output(project, capsys, kind,
                                                                       message):
    cfg = with_examples(project(), "nets")
    override = _weights(cfg.base_dir, kind)
    code, _, err = reprolab(capsys, cfg.base_dir, "train", *TINY, OWN, "model.kwargs={}",
                            override)
    assert code == 2
    assert one_error(err, "train").startswith(message)
    assert not cfg.models_dir.exists()


@pytest.mark.parametrize(("override", "message"), [
    ("data.dataset=sources.missing:Src",
     "data.dataset = 'sources.missing:Src': cannot import sources.missing"),
    ("data.dataset=sources.example:CsvSource", "data.kwargs = {'bogus': 1}: "
     "sources.example:CsvSource refuses them"),
])
def test_a_source_that_cannot_be_made_is_one_line_before_any_output(make_config, capsys,
                                                                   override, message):
    cfg = with_examples(make_config(), "sources")
    kwargs = "data.kwargs={bogus: 1}" if "CsvSource" in override else "data.kwargs={}"
    code, _, err = reprolab(capsys, cfg.base_dir, "fetch", override, kwargs)
    assert code == 2
    assert one_error(err, "fetch").startswith(message)
    assert not (cfg.base_dir / "data").exists()


def test_a_metric_that_does_not_import_is_one_line_before_any_output(project, capsys):
    cfg = project()
    train.run(cfg)
    code, _, err = reprolab(capsys, cfg.base_dir, "evaluate", *TINY,
                            "evaluate.metrics={mine: metrics.nothing:here}")
    assert code == 2
    assert one_error(err, "evaluate").startswith(
        "evaluate.metrics.mine = 'metrics.nothing:here': cannot import metrics.nothing")
    assert not cfg.metrics_file.exists()


def test_the_registered_model_of_your_network_predicts_without_nets_on_the_path(project):
    """The logged model is traced (torch.export), so a consumer needs none of your code."""
    cfg = with_examples(project(OWN, "model.kwargs={hidden: 8}", "train.epochs=1"), "nets")
    result = train.run(cfg)
    script = ("import sys, json, numpy as np, mlflow\n"
              "assert not any('nets' in m for m in sys.modules)\n"
              f"model = mlflow.pytorch.load_model({result.model_uri!r})\n"
              "out = model(__import__('torch').zeros(2, 1, 8, 8))\n"
              "assert 'nets' not in sys.modules and 'nets.example' not in sys.modules\n"
              "print(json.dumps(out.shape[1]))\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    proc = subprocess.run([sys.executable, "-c", script], cwd="/", env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == 10


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_every_optimizer_trains_a_backbone_after_its_frozen_epochs(processed_once, optimizer):
    """The backbone's parameters have no optimizer state while frozen, the head's do: each
    optimizer (fused SGD included) starts the backbone's state when it thaws."""
    meta, train_split, val = _digits(processed_once)
    model = _tiny(meta, 10, seed=0)
    before = model[1].backbone[0].weight.detach().clone()
    seen = []
    fit(model, Split(train_split.x[:64], train_split.y[:64]), val,
        Hyper(optimizer=optimizer, lr=0.01, epochs=2, batch_size=16, head=head_name(model),
              freeze_epochs=1, backbone_lr_scale=0.5),
        on_epoch=lambda row: seen.append(model[1].backbone[0].weight.detach().clone()))
    assert torch.equal(seen[0], before) and not torch.equal(seen[1], before)
