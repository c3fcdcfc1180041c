"""predict, `mlflow models serve` and `mlflow server`, for real.

One tiny pipeline runs in-process against the session store; the servers are real processes
on 127.0.0.1 reading that store.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, TINY
from reprolab import cli, evaluate, predict, register, train
from reprolab.config import load_config
from reprolab.data import load_split
from reprolab.recipe import run_name
from servers import free_port, get, post, serve, served_probabilities, stop

MODEL = "serving-test"


def _project(root: Path, processed_once: Path, *overrides: str):
    root.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    for rel in ("data/raw", "data/processed"):
        shutil.copytree(processed_once / rel, root / rel)
    return load_config(root / "params.yaml", [*TINY, f"register.model_name={MODEL}",
                                              "tracking.experiment=serving", *overrides])


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, processed_once):
    cfg = _project(tmp_path_factory.mktemp("serving") / "p", processed_once)
    result = train.run(cfg)
    evaluate.run(cfg)
    decision = register.run(cfg)
    assert decision["alias"] == "champion"
    return cfg, result


@pytest.fixture(scope="module")
def images(pipeline, tmp_path_factory):
    """Test digits written as image files the way a user would have them."""
    cfg, result = pipeline
    test = load_split(cfg.processed_dir, "test")
    root = tmp_path_factory.mktemp("images")
    (root / "dir").mkdir()
    files = []
    for i in range(6):
        pixels = test.x[i, 0].numpy()
        if i % 2:  # grayscale 8x8 PNG in a directory
            path = root / "dir" / f"digit{i}.png"
            Image.fromarray(pixels, "L").save(path)
        else:  # an RGB JPEG-free 32x32 upscale: converted and resized on the way in
            path = root / f"digit{i}.png"
            Image.fromarray(pixels, "L").resize((32, 32), Image.NEAREST).convert("RGB").save(path)
        files.append(path)
    (root / "broken.png").write_bytes(b"not an image")
    return root, files, test


def _expected(result, files):
    """What the in-memory model says about the files as predict reads them."""
    shape = (1, 8, 8)
    x = torch.from_numpy(np.stack([predict.load_image(f, shape) for f in files]))
    with torch.no_grad():
        return result.model(x).softmax(1).numpy()


def test_predict_prints_class_and_probability_and_names_bad_files(pipeline, images, capsys):
    cfg, result = pipeline
    root, files, test = images
    code = cli.main(["predict", "-q", "--params", str(cfg.base_dir / "params.yaml"), "--json",
                     "--model", f"models:/{MODEL}@champion",
                     str(root / "digit0.png"), str(root / "broken.png"), str(root / "dir"),
                     str(root / "digit2.png"), str(root / "digit4.png")])
    out, err = capsys.readouterr()
    assert code == 2  # one file could not be read; the others were predicted
    assert f"{root / 'broken.png'}: cannot read image" in err
    got = {Path(p["path"]).name: p for p in json.loads(out)}
    assert got["broken.png"]["error"] and got["broken.png"]["label"] is None
    order = [root / "digit0.png", root / "dir/digit1.png", root / "dir/digit3.png",
             root / "dir/digit5.png", root / "digit2.png", root / "digit4.png"]
    probs = _expected(result, order)
    for path, row in zip(order, probs, strict=True):
        entry = got[path.name]
        assert entry["label"] == str(int(row.argmax()))
        assert entry["probability"] == pytest.approx(float(row.max()), abs=1e-6)


def test_predict_table_and_default_model(pipeline, images, capsys):
    cfg, result = pipeline
    root, files, _ = images
    code = cli.main(["predict", "-q", "--params", str(cfg.base_dir / "params.yaml"),
                     "-S", f"register.model_name={MODEL}", str(files[1])])
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0].split() == ["path", "class", "probability"]
    label = str(int(_expected(result, [files[1]])[0].argmax()))
    assert out[1].split()[:2] == [str(files[1]), label]


def test_mlflow_models_serve_answers_like_predict(pipeline, images):
    cfg, _ = pipeline
    _, files, _ = images
    batch = np.stack([predict.load_image(f, (1, 8, 8)) for f in files])
    served = served_probabilities(f"models:/{MODEL}@champion", batch,
                                  {**os.environ, "MLFLOW_TRACKING_URI": cfg.mlflow_uri})
    local = predict.run(f"models:/{MODEL}@champion", [str(f) for f in files], cfg)
    assert [int(row.argmax()) for row in served] == [int(p.label) for p in local]
    np.testing.assert_allclose(served, [p.probabilities for p in local], atol=1e-6)


def test_mlflow_server_shows_runs_metrics_and_the_champion(pipeline):
    cfg, result = pipeline
    port = free_port()
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    proc = serve([mlflow_cli, "server", "--backend-store-uri", cfg.mlflow_uri,
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                  port, dict(os.environ), "/health")
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    try:
        exp = get(f"{api}/experiments/get-by-name?experiment_name=serving")["experiment"]
        runs = post(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]]})["runs"]
        alias = get(f"{api}/registered-models/alias?name={MODEL}&alias=champion")
    finally:
        stop(proc)
    by_id = {r["info"]["run_id"]: r for r in runs}
    run = by_id[result.run_id]
    assert run["info"]["run_name"] == run_name("simple_cnn", "adam", cfg.train.lr)
    metrics = {m["key"] for m in run["data"]["metrics"]}
    assert {"train/loss", "val/loss", "val/accuracy", "test/accuracy", "test/f1_macro",
            "test/top5_accuracy"} <= metrics
    assert alias["model_version"]["run_id"] == result.run_id
