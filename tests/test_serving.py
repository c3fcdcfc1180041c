"""predict, `mlflow models serve` and `mlflow server`, for real.

One tiny pipeline runs in-process against the session store; the servers are real processes
on 127.0.0.1 reading that store.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, digits_project
from reprolab import cli, evaluate, predict, register, train
from reprolab.config import load_config
from reprolab.data import load_split
from reprolab.recipe import run_name
from servers import free_port, get, post, post_status, scoring_server, serve, stop

MODEL = "serving-test"


def _project(root: Path, processed_once: Path, *overrides: str):
    return load_config(digits_project(root, processed_once) / "params.yaml",
                       [*TINY, f"register.model_name={MODEL}", "tracking.experiment=serving",
                        *overrides])


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


def test_mlflow_models_serve_answers_like_predict_and_refuses_what_is_not_pixels(
        pipeline, images):
    cfg, _ = pipeline
    _, files, _ = images
    batch = np.stack([predict.load_image(f, (1, 8, 8)) for f in files])
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.mlflow_uri}
    with scoring_server(f"models:/{MODEL}@champion", env) as url:
        status, answer = post_status(url, {"inputs": batch.tolist()})
        refused = [post_status(url, {"inputs": np.full_like(batch, value).tolist()})
                   for value in (1e30, -5.0)]
    served = np.array(answer["predictions"], dtype=np.float32)
    local = predict.run(f"models:/{MODEL}@champion", [str(f) for f in files], cfg)
    assert [int(row.argmax()) for row in served] == [int(p.label) for p in local]
    np.testing.assert_allclose(served, [p.probabilities for p in local], atol=1e-6)
    for (code, body), shown in zip(refused, ("1e+30..1e+30", "-5..-5"), strict=True):
        assert code == 400, body
        assert "the inputs are not pixel values: the model takes numbers within 0..255" in \
            body["message"] and shown in body["message"], body


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


def test_predict_works_from_any_directory(pipeline, images, tmp_path, monkeypatch, capsys):
    """No params.yaml: a registry URI through MLFLOW_TRACKING_URI; an MLflow model folder and
    the models/model.pt checkpoint with no store at all."""
    import mlflow

    cfg, result = pipeline
    _, files, _ = images
    expected = _expected(result, files)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = Path(mlflow.artifacts.download_artifacts(result.model_uri,
                                                      dst_path=str(tmp_path / "download")))
    monkeypatch.chdir(elsewhere)

    def predict_json(model: str) -> np.ndarray:
        code = cli.main(["predict", "-q", "--json", "--model", model, *map(str, files)])
        out, err = capsys.readouterr()
        assert code == 0 and not err, err
        got = json.loads(out)
        assert [p["path"] for p in got] == [str(f) for f in files]
        return np.array([p["probabilities"] for p in got])

    np.testing.assert_allclose(predict_json(f"models:/{MODEL}@champion"), expected, atol=1e-6)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    np.testing.assert_allclose(predict_json(str(folder)), expected, atol=1e-6)
    np.testing.assert_allclose(predict_json(str(cfg.model_file)), expected, atol=1e-6)

    # a registry URI without a store to find it in, or no model at all: one line each
    for args, expected_line in (
            (["--model", f"models:/{MODEL}@champion"], "no params.yaml here to find the project's"
                                                       " MLflow store"),
            ([], "reprolab predict: error: no params.yaml here; pass --model URI")):
        assert cli.main(["predict", "-q", *args, str(files[0])]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected_line in err, err
    assert not list(elsewhere.iterdir())  # no store or anything else created here


def test_predict_warns_about_dark_ink_on_light_paper_and_inverts(pipeline, tmp_path, capsys):
    cfg, result = pipeline
    test = load_split(cfg.processed_dir, "test")
    light, dark = [], []
    for i in range(4):
        pixels = test.x[i, 0].numpy()  # light strokes on black, as trained
        dark.append(tmp_path / f"dark{i}.png")
        Image.fromarray(pixels, "L").save(dark[-1])
        light.append(tmp_path / f"paper{i}.png")  # black ink on white paper
        Image.fromarray(255 - pixels, "L").save(light[-1])

    def run(files, *args):
        code = cli.main(["predict", "-q", "--json", "--params", str(cfg.base_dir / "params.yaml"),
                         "--model", f"models:/{MODEL}@champion", *args, *map(str, files)])
        out, err = capsys.readouterr()
        assert code == 0
        return json.loads(out), err.strip().splitlines()

    as_trained, warned = run(dark)
    assert warned == [] and not any(p["ink_mismatch"] for p in as_trained)
    on_paper, warned = run(light)
    assert warned == [
        f"reprolab predict: warning: {light[0]} and 3 more: dark strokes on a light background, "
        "but the model was trained on light strokes on a dark one; pass --invert to flip them"]
    assert all(p["ink_mismatch"] for p in on_paper)
    inverted, warned = run(light, "--invert")
    assert warned == []
    np.testing.assert_allclose([p["probabilities"] for p in inverted],
                               [p["probabilities"] for p in as_trained], atol=1e-6)
    _, warned = run(dark[:1], "--invert")
    assert len(warned) == 1 and warned[0].endswith("; drop --invert"), warned


def test_only_models_of_light_strokes_on_dark_look_at_the_ink():
    from reprolab.models import build, model_spec

    def model(channels, mean, std):
        return build(model_spec("simple_cnn", (channels, 8, 8), 10, [mean] * channels,
                                [std] * channels))

    assert predict.trained_on_dark(model(1, 33.3, 78.6))  # MNIST
    assert not predict.trained_on_dark(model(1, 120.0, 60.0))  # grayscale photos
    assert not predict.trained_on_dark(model(3, 30.0, 80.0))  # colour: no ink to speak of
    flat = np.full((1, 8, 8), 200.0, np.float32)
    assert not predict.light_background(flat)  # no strokes at all
    flat[0, 3:5, 2:6] = 0.0
    assert predict.light_background(flat)
