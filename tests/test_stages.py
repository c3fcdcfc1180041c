"""tune, train, evaluate and register in-process on digits, against a real MLflow store."""

from __future__ import annotations

import csv
import json
import os

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import TINY, cli_argv, training_run_id
from reprolab import evaluate, register, space, train, tune
from reprolab.data import load_split
from reprolab.files import read_json, sha256_file, write_json


def _runs(experiment: str, filter_string: str = "") -> list:
    exp = MlflowClient().get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], filter_string=filter_string)


def test_tune_runs_a_study_with_nested_mlflow_runs_and_resumes(project):
    cfg = project("tracking.experiment=tune-test", "tune.n_trials=4")
    summary = tune.run(cfg)

    assert summary["trials_complete"] + summary["trials_pruned"] == 4
    best = yaml.safe_load(cfg.best_params_file.read_text())
    assert best["optimizer"] in cfg.tune.optimizers
    assert cfg.tune.lr_low <= best["lr"] <= cfg.tune.lr_high
    assert read_json(cfg.report_dir("tune") / "summary.json") == summary
    assert cfg.optuna_journal.exists()  # its own store, not the MLflow database

    parents = _runs("tune-test", "tags.`optuna.study` != ''")
    assert len(parents) == 1
    parent = parents[0]
    children = _runs("tune-test", f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    assert parent.data.metrics["best/val/accuracy"] == pytest.approx(summary["best_value"])
    assert {c.data.tags["optuna.state"] for c in children} <= {"COMPLETE", "PRUNED"}

    again = tune.run(cfg)  # a finished study adds no trial
    assert again["trials_complete"] + again["trials_pruned"] == 4
    assert again["best_value"] == summary["best_value"]
    assert again["epochs_spent"] == summary["epochs_spent"]


def test_tune_study_name_changes_with_the_data_and_space(project):
    cfg = project()
    meta = {"manifest_sha256": "a"}
    name = space.study_name(cfg, meta)
    assert name.startswith("reprolab-")
    assert name == space.study_name(project(), meta)
    assert name != space.study_name(cfg, {"manifest_sha256": "b"})
    assert name != space.study_name(project("tune.lr_high=0.2"), meta)


def test_train_evaluate_register_on_one_run(project, monkeypatch):
    cfg = project("tracking.experiment=pipeline-test", "register.model_name=pipeline-test")
    result = train.run(cfg)

    # outputs: no run id, path, time or timing inside; the run is found by the model's hash
    assert sorted(p.name for p in cfg.models_dir.iterdir()) == [
        ".reprolab-output", "config.yaml", "model.pt"]
    assert training_run_id(cfg) == result.run_id
    assert yaml.safe_load((cfg.models_dir / "config.yaml").read_text()) == cfg.as_dict()
    rows = list(csv.DictReader((cfg.report_dir("train") / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert not {"train/epoch_seconds", "train/images_per_second"} & set(rows[0])

    # the MLflow run
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "simple_cnn-adam-lr1.0e-3"
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["train.hparams_source"] == "params"
    assert run.data.tags["params_hash"] == cfg.params_hash
    assert run.data.tags["model.sha256"] == sha256_file(cfg.model_file)
    assert run.data.tags["mlflow.source.name"] == "src/reprolab/train.py"
    assert run.data.tags["torch.cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    (dataset,) = [d for d in run.inputs.dataset_inputs  # the training split's input
                  if {(t.key, t.value) for t in d.tags} >= {("mlflow.data.context", "training")}]
    assert dataset.dataset.source.endswith('"data/processed"}') or \
        dataset.dataset.source == "data/processed", dataset.dataset.source
    split_hashes = read_json(cfg.processed_dir / "meta.json")["split_sha256"]
    assert split_hashes["train"].startswith(dataset.dataset.digest)
    assert len(run.data.tags["data.manifest_sha256"]) == 64
    assert run.data.tags["git.commit"]
    assert run.data.tags["device"] == "cpu"
    assert run.data.tags["torch.version"] == torch.__version__
    assert run.data.params["model.parameters"] == str(
        sum(p.numel() for p in result.model.parameters())
    )
    artifacts = {a.path for a in MlflowClient().list_artifacts(result.run_id)}
    assert {"history.csv", "config.yaml"} <= artifacts
    assert not cfg.checkpoint_file.exists()  # finished: no resume checkpoint left
    history = MlflowClient().get_metric_history(result.run_id, "val/accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    assert history[-1].value == pytest.approx(float(rows[-1]["val/accuracy"]))
    assert dataset.dataset.name == "digits-train"

    # the logged model takes raw pixels and returns the in-memory model's probabilities
    test = load_split(cfg.processed_dir, "test")
    raw = test.x[:16].float()
    with torch.no_grad():
        expected = result.model(raw).softmax(1).numpy()
    loaded = mlflow.pytorch.load_model(result.model_uri)
    with torch.no_grad():
        got = loaded(raw).numpy()
    np.testing.assert_array_equal(got, expected)  # exactly what the in-memory model says
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)

    # evaluate: metrics.json agrees with the predictions it wrote, and lands on the run
    metrics = evaluate.run(cfg)
    out = cfg.report_dir("evaluate")
    assert read_json(out / "metrics.json") == metrics
    preds = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(preds) == len(test)
    hand_accuracy = sum(r["actual"] == r["predicted"] for r in preds) / len(preds)
    assert metrics["accuracy"] == pytest.approx(hand_accuracy)
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"
    # the learning curve is drawn here from history.csv (train imports no matplotlib)
    assert (out / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    evaluation_artifacts = {a.path for a in MlflowClient().list_artifacts(result.run_id,
                                                                          "evaluate")}
    assert {"evaluate/learning_curve.png", "evaluate/confusion_matrix.png"} <= \
        evaluation_artifacts
    per_class = read_json(out / "per_class.json")
    assert set(per_class) == {str(d) for d in range(10)}
    assert sum(c["support"] for c in per_class.values()) == len(test)
    logged = MlflowClient().get_run(result.run_id).data.metrics
    assert logged["test/f1_macro"] == pytest.approx(metrics["f1_macro"])

    # register: version 1 becomes champion; the same run again makes no second version. With
    # no champion to meet, nothing is scored: the test split is not read (nor torch imported)
    with monkeypatch.context() as patch:
        patch.setattr("reprolab.data.load_split",
                      lambda *_: pytest.fail("a first version read the test split"))
        decision = register.run(cfg)
    assert (decision["version"], decision["alias"]) == ("1", "champion")
    assert read_json(cfg.report_dir("register") / "decision.json") == decision
    version = MlflowClient().get_model_version_by_alias("pipeline-test", "champion")
    assert version.tags["training_run_id"] == result.run_id
    assert version.tags["params_hash"] == cfg.params_hash
    assert float(version.tags["test/f1_macro"]) == pytest.approx(metrics["f1_macro"])
    again = register.run(cfg)
    assert again["version"] == "1" and again["alias"] == "champion"
    assert len(MlflowClient().search_model_versions("name = 'pipeline-test'")) == 1

    # a worse model (one epoch, tiny lr) becomes challenger; the champion stays
    worse = project("tracking.experiment=pipeline-test", "register.model_name=pipeline-test",
                    "train.epochs=1", "train.lr=1e-5")
    train.run(worse)
    evaluate.run(worse)
    decision = register.run(worse)
    assert (decision["version"], decision["alias"]) == ("2", "challenger")
    assert "does not beat champion v1" in decision["reason"]
    champion = MlflowClient().get_model_version_by_alias("pipeline-test", "champion")
    assert str(champion.version) == "1"
    # every version's description says why it holds its alias
    first = champion.tags["test/f1_macro"]
    assert champion.description == (
        f"Holds @champion: promoted when registered: test/f1_macro {float(first):.4f}: the "
        "first score, no champion to beat.")
    challenger = MlflowClient().get_model_version("pipeline-test", "2")
    assert challenger.description == ("Holds @challenger (the latest version not promoted): not "
                                      f"promoted when registered: {decision['reason']}.")


def test_evaluate_and_register_refuse_a_run_missing_from_the_store(project):
    from reprolab.errors import DataError

    # a model of its own (no other test trains this one): no other run has its hash
    cfg = project("tracking.experiment=missing-run", "train.epochs=1", "train.lr=0.00123")
    train.run(cfg)
    # evaluate draws the learning curve from train's history.csv: a missing or torn one is
    # refused before anything is written
    history = cfg.history_file.read_text()
    for text, why in ((None, "history.csv: missing; train writes it with the model"),
                      (history[: len(history) // 2] + "x\n", "history.csv: not train's history"),
                      (history.splitlines()[0] + "\n", "history.csv: no epochs in it"),
                      (history.replace("val/loss", "val/los"),
                       "history.csv: not train's history: no column val/loss")):
        cfg.history_file.unlink(missing_ok=True)
        if text is not None:
            cfg.history_file.write_text(text)
        with pytest.raises(DataError, match=why):
            evaluate.run(cfg)
        assert not cfg.report_dir("evaluate").exists()
    cfg.history_file.write_text(history)
    # as if models/ came from elsewhere (a DVC remote): no run in this store wrote this model
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    MlflowClient().delete_tag(training_run_id(cfg), "model.sha256")
    with pytest.raises(DataError, match=r"no finished training run with model.sha256 \w{12} in "
                                        r"the MLflow store .*set MLFLOW_TRACKING_URI"):
        evaluate.run(cfg)
    assert not cfg.report_dir("evaluate").exists()  # nothing written
    (cfg.report_dir("evaluate")).mkdir(parents=True)
    (cfg.report_dir("evaluate") / "metrics.json").write_text('{"f1_macro": 0.5}')
    test = read_json(cfg.processed_dir / "meta.json")["split_sha256"]["test"]
    write_json(cfg.evaluated_file, {"model_sha256": sha256_file(cfg.model_file),
                                    "test_sha256": test})
    with pytest.raises(DataError, match="no finished training run"):
        register.run(cfg)
    assert not cfg.report_dir("register").exists()


def test_register_refuses_metrics_of_another_model(project, capsys):
    """train (good) -> evaluate -> train (chance level, no evaluate) -> register: refused."""
    from reprolab import cli

    name = "stale-test"
    cfg = project("tracking.experiment=stale", f"register.model_name={name}")
    train.run(cfg)
    evaluate.run(cfg)
    metrics = read_json(cfg.report_dir("evaluate") / "metrics.json")
    assert read_json(cfg.evaluated_file) == {
        "model_sha256": sha256_file(cfg.model_file),
        "test_sha256": read_json(cfg.processed_dir / "meta.json")["split_sha256"]["test"]}
    chance = project("tracking.experiment=stale", f"register.model_name={name}",
                     "train.epochs=1", "train.lr=1e-6")
    train.run(chance)
    assert read_json(cfg.report_dir("evaluate") / "metrics.json") == metrics  # stale
    args = cli_argv("register", cfg.base_dir, *TINY, "tracking.experiment=stale",
                    f"register.model_name={name}", "train.epochs=1", "train.lr=1e-6",
                    quiet=False)
    capsys.readouterr()  # what the stages before said (MLflow creating the store, maybe)
    assert cli.main(args) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "metrics.json: measures model" in line and "run `reprolab evaluate`" in line
    assert not MlflowClient().search_model_versions(f"name = '{name}'")
    assert not cfg.report_dir("register").exists()

    # evaluated now: registered (as champion of this fresh model name)
    evaluate.run(chance)
    assert register.run(chance)["version"] == "1"


def test_a_model_registered_twice_at_once_keeps_one_version(project):
    """Two machines register the same model file in the same instant: both create a version;
    the later one deletes its own and reports the first."""
    cfg = project("tracking.experiment=twice", "register.model_name=twice-test", "train.epochs=1")
    train.run(cfg)
    evaluate.run(cfg)
    assert register.run(cfg)["version"] == "1"
    client = MlflowClient()
    first = client.get_model_version("twice-test", "1")
    second = client.create_model_version("twice-test", first.source, run_id=first.run_id,
                                         tags=first.tags, model_id=first.model_id)
    assert register.one_version_per_model("twice-test", str(second.version),
                                          first.tags["model.sha256"]) == "1"
    assert [str(v.version) for v in client.search_model_versions("name = 'twice-test'")] == ["1"]
    assert register.run(cfg)["version"] == "1"


def test_register_refuses_a_gate_other_than_the_models(project):
    from reprolab.errors import ConfigError

    cfg = project("tracking.experiment=gate", "register.model_name=gate-test", "train.epochs=1")
    train.run(cfg)
    evaluate.run(cfg)
    register.run(cfg)
    other = project("tracking.experiment=gate", "register.model_name=gate-test",
                    "train.epochs=1", "register.metric=accuracy")
    with pytest.raises(ConfigError, match=r"registered model 'gate-test' is gated on f1_macro, "
                                          r"min_delta 0, min_value None, require_significance "
                                          r"false \(its tags\); this config says accuracy"):
        register.run(other)
    assert len(MlflowClient().search_model_versions("name = 'gate-test'")) == 1


def test_tuned_values_become_the_config_that_trains(project):
    from reprolab.config import with_tuned
    from reprolab.errors import ConfigError
    from reprolab.recipe import hyper_for

    cfg = project("train.use_tuned=true")
    with pytest.raises(ConfigError, match="run `reprolab tune` first"):
        with_tuned(cfg)
    cfg.best_params_file.parent.mkdir(parents=True)
    cfg.best_params_file.write_text("optimizer: rmsprop\nlr: 0.002\n")
    tuned = with_tuned(cfg)
    assert (tuned.train.optimizer, tuned.train.lr) == ("rmsprop", 0.002)
    assert tuned.params_hash != cfg.params_hash
    assert tuned.train.epochs == cfg.train.epochs and tuned.base_dir == cfg.base_dir
    cfg.best_params_file.write_text("optimizer: sgd\nlr: 0.01\nbatch_size: 32\n")
    assert hyper_for(with_tuned(cfg), 2, torch.device("cpu"), [1, 8, 8]).batch_size == 32
    # the same validator as params.yaml, naming the file and the key
    cfg.best_params_file.write_text("optimizer: lion\nlr: 0.002\n")
    with pytest.raises(ConfigError, match=r"best_params.yaml: train.optimizer = 'lion'"):
        with_tuned(cfg)
    cfg.best_params_file.write_text("lr: -1\n")
    with pytest.raises(ConfigError, match=r"best_params.yaml: train.lr = -1"):
        with_tuned(cfg)

    # models/config.yaml is the resolved config: the tuned values that trained the model
    cfg.best_params_file.write_text("optimizer: adamw\nlr: 0.003\n")
    result = train.run(cfg)
    written = yaml.safe_load((cfg.models_dir / "config.yaml").read_text())
    assert (written["train"]["optimizer"], written["train"]["lr"]) == ("adamw", 0.003)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.params["train.lr"] == "0.003"
    assert run.data.tags["params_hash"] == with_tuned(cfg).params_hash


def test_verify_names_what_it_cannot_rebuild_and_why_models_differ(project, capsys):
    from reprolab import cli, verify

    cfg = project("tracking.experiment=verify-test", "register.model_name=verify-test",
                  "train.epochs=1")
    train.run(cfg)
    evaluate.run(cfg)
    register.run(cfg)
    # this project is no git repository: nothing to rebuild from
    args = ["verify", "-q", "--params", str(cfg.base_dir / "params.yaml"),
            "models:/verify-test@champion"]
    assert cli.main(args) == 2
    out = capsys.readouterr().out.strip()
    assert "cannot verify: code: not built from a git commit" in out, out
    assert cli.main([*args[:-1], "runs:/abc/model"]) == 2
    assert "not a registry URI" in capsys.readouterr().err

    # the reasons compare what the version recorded with this platform and the rebuilt data
    meta = read_json(cfg.processed_dir / "meta.json")
    tags = {"params_hash": cfg.params_hash, "data.manifest_sha256": meta["manifest_sha256"],
            "torch.version": "2.0.0", "torch.cpu_capability": "AVX512", "device": "cpu"}
    reasons = verify.likely_reasons(tags, cfg.as_dict(), meta)
    assert reasons[0].startswith("torch version 2.0.0 (registered) vs ")
    assert any(r.startswith("CPU capability AVX512 (registered)") for r in reasons) == (
        torch.backends.cpu.get_cpu_capability() != "AVX512")
    assert not [r for r in reasons if r.startswith(("params", "data", "device"))]


# ---- the registry knows its data: one champion per dataset and input shape ----


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _cli(cfg, command: str, *args: str) -> int:
    from reprolab import cli

    return cli.main([command, "-q", "--params", str(cfg.base_dir / "params.yaml"), *args])


def test_the_default_name_is_the_datasets_and_versions_say_why(project):
    cfg = project("tracking.experiment=per-dataset", "train.epochs=1")
    assert cfg.register.model_name is None
    train.run(cfg)
    evaluate.run(cfg)
    decision = register.run(cfg)
    assert (decision["model_name"], decision["alias"]) == ("reprolab-digits", "champion")
    client = MlflowClient()
    held = client.get_registered_model("reprolab-digits").tags
    assert (held["reprolab.dataset"], held["reprolab.input_shape"]) == ("digits", "1x8x8")
    version = client.get_model_version("reprolab-digits", decision["version"])
    assert version.tags["model.input_shape"] == "1x8x8"
    assert version.description.startswith("Holds @champion: promoted when registered: ")
    # the logged model lists its version, as MLflow's own registration links them
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [
        {"name": "reprolab-digits", "version": decision["version"]}]
    # the registered model says what it holds and how its aliases move
    text = client.get_registered_model("reprolab-digits").description
    assert text.startswith("Image classifiers of the digits data (1x8x8 uint8 images, classes "
                           "0, 1, 2, 3, 4, 5, 6, 7, 8, 9)")
    assert "becomes @champion when its test/f1_macro beats the champion's by more than " \
        "min_delta" in text


def test_a_model_of_another_shape_is_refused_by_register_evaluate_and_predict(
        make_config, tmp_path, capsys):
    from reprolab.data import fetch, preprocess
    from test_datasets import make_folder

    make_folder(tmp_path / "images", per_class=10)
    folder = ["data.dataset=imagefolder", f"data.image_folder={tmp_path / 'images'}",
              "data.val_fraction=0.2", "data.test_fraction=0.2", "train.epochs=1",
              "register.model_name=folder-shapes", "tracking.experiment=shapes"]
    small = make_config(*folder, "data.image_size=8")
    fetch.run(small)
    preprocess.run(small)
    train.run(small)
    evaluate.run(small)
    decided = register.run(small)
    assert decided["alias"] == "champion"  # RGB images: 3x8x8

    large = make_config(*folder, "data.image_size=12")
    preprocess.run(large)  # the data is 3x12x12 now; models/ still holds the 3x8x8 model
    overrides = [a for item in (*TINY, *folder, "data.image_size=12") for a in ("-S", item)]
    evaluated = read_json(large.metrics_file)
    capsys.readouterr()  # what the stages before said (MLflow creating the store, maybe)
    assert _cli(large, "evaluate", *overrides) == 2
    assert _one_line(capsys).endswith(
        "models/model.pt: takes 3x8x8 (3 channels) images, but the imagefolder-images test split "
        "holds 3x12x12 (3 channels); train on this data first: `reprolab train` (or `dvc repro`)")
    assert read_json(large.metrics_file) == evaluated  # nothing written
    image = tmp_path / "images" / "dog" / "00.png"
    assert _cli(large, "predict", *overrides, str(image)) == 2  # the default: the champion
    line = _one_line(capsys)
    assert "models:/folder-shapes@champion: takes 3x8x8 (3 channels) images, but " in line
    assert "meta.json (imagefolder) holds 3x12x12 (3 channels)" in line, line
    assert _cli(large, "predict", *overrides, "--model", "models:/folder-shapes@champion",
                str(image)) == 0  # taken as given: the image is resized to the model's input

    train.run(large)
    evaluate.run(large)
    assert _cli(large, "register", *overrides) == 2
    assert _one_line(capsys) == (
        "reprolab register: error: register.model_name: registered model 'folder-shapes' holds "
        "imagefolder-images models that take 3x8x8 images (its tags); this one is "
        "imagefolder-images, 3x12x12:"
        " use another register.model_name, or null (reprolab-<dataset>)")
    assert len(MlflowClient().search_model_versions("name = 'folder-shapes'")) == 1
    assert read_json(large.report_dir("register") / "decision.json") == decided  # unchanged


def test_register_enabled_false_skips_the_registry_and_says_so(project, capsys):
    name = "skip-test"
    cfg = project("tracking.experiment=skip", f"register.model_name={name}", "train.epochs=1",
                  "register.enabled=false")
    overrides = [a for item in (*TINY, "tracking.experiment=skip", f"register.model_name={name}",
                                "train.epochs=1", "register.enabled=false") for a in ("-S", item)]
    assert _cli(cfg, "register", *overrides) == 2  # out of order is still out of order
    assert "run `reprolab train` and `reprolab evaluate`" in _one_line(capsys)
    train.run(cfg)
    evaluate.run(cfg)
    assert _cli(cfg, "register", *overrides) == 0
    f1 = read_json(cfg.metrics_file)["f1_macro"]
    assert capsys.readouterr().out.strip() == (
        f"register: skipped (register.enabled is false: not registered); test/f1_macro {f1:.4f}")
    decision = read_json(cfg.report_dir("register") / "decision.json")
    assert decision["skipped"] is True and decision["version"] is None
    assert decision["model_name"] == name and decision["value"] == f1
    assert not MlflowClient().search_registered_models(f"name = '{name}'")


def _copy_project(root, processed_once, *overrides):
    """A project of its own in `root` (its own models/ and reports/), digits data in place."""
    from conftest import digits_project
    from reprolab.config import load_config

    return load_config(digits_project(root, processed_once) / "params.yaml", [*TINY, *overrides])


def _aliases(name: str) -> dict[str, str | None]:
    from mlflow.exceptions import MlflowException

    out = {}
    for alias in ("champion", "challenger"):
        try:
            out[alias] = str(MlflowClient().get_model_version_by_alias(name, alias).version)
        except MlflowException:
            out[alias] = None
    return out


def test_promote_moves_the_champion_by_hand_and_register_keeps_it(
        tmp_path, processed_once, capsys, monkeypatch):
    name = "promote-test"
    common = ("tracking.experiment=promote", f"register.model_name={name}")
    good = _copy_project(tmp_path / "good", processed_once, *common)
    poor = _copy_project(tmp_path / "poor", processed_once, *common, "train.epochs=1",
                         "train.lr=1e-5")
    mid = _copy_project(tmp_path / "mid", processed_once, *common, "train.epochs=1")
    f1 = {}
    for label, cfg in (("good", good), ("poor", poor), ("mid", mid)):
        train.run(cfg)
        f1[label] = evaluate.run(cfg)["f1_macro"]
    assert f1["good"] > f1["mid"] > f1["poor"]
    assert register.run(good)["version"] == "1"
    assert register.run(poor)["alias"] == "challenger"  # v2
    client = MlflowClient()

    # by hand: v2 becomes champion, recorded in its description
    assert _cli(good, "promote", name, "2") == 0
    out = capsys.readouterr().out.strip()
    assert out == (f"promote: {name} v2 -> @champion (was v1): Holds @champion: promoted by "
                   "hand (`reprolab promote`) after v2 was registered, replacing v1.")
    assert _aliases(name) == {"champion": "2", "challenger": None}
    assert client.get_model_version(name, "1").description.startswith(
        "No alias: a former champion, replaced by v2; promoted when registered: test/f1_macro ")
    assert "reprolab.promotions" in client.get_model_version(name, "2").tags

    # the next register replays the promotion where it happened: v1 again changes nothing
    decision = register.run(good)
    assert (decision["version"], decision["champion"]) == ("1", "2")
    assert _aliases(name) == {"champion": "2", "challenger": None}
    # and gates later versions against it: mid beats the promoted v2 (it would not beat v1)
    decision = register.run(mid)
    assert (decision["version"], decision["alias"]) == ("3", "champion")
    assert decision["reason"].startswith("test/f1_macro") and "beats champion v2" in \
        decision["reason"]
    assert client.get_model_version(name, "2").description == (
        "No alias: a former champion, replaced by v3; promoted by hand (`reprolab promote`) "
        "after v2 was registered, replacing v1.")
    assert _aliases(name) == {"champion": "3", "challenger": None}
    assert _cli(good, "promote", name, "3") == 0  # already: nothing recorded
    assert capsys.readouterr().out.strip() == f"promote: {name} v3 is already @champion"
    assert "reprolab.promotions" not in client.get_model_version(name, "3").tags


def test_promote_checks_the_lineage_like_register(tmp_path, processed_once, capsys, monkeypatch):
    name = "promote-lineage"
    cfg = _copy_project(tmp_path / "p", processed_once, "tracking.experiment=promote-lineage",
                        f"register.model_name={name}", "train.epochs=1")
    train.run(cfg)
    evaluate.run(cfg)
    register.run(cfg)
    client = MlflowClient()
    v1 = client.get_model_version(name, "1")

    def refused(version: str, expected: str) -> None:
        assert _cli(cfg, "promote", name, version) == 2
        line = _one_line(capsys)
        assert line.startswith(f"reprolab promote: error: {name} v{version}: "), line
        assert expected in line, line
        assert _aliases(name)["champion"] == "1"

    # a version added by hand, without reprolab's lineage
    bare = client.create_model_version(name, v1.source, run_id=v1.run_id, model_id=v1.model_id)
    refused(str(bare.version), "no model.sha256 tag (not registered by `reprolab register`)")
    # one whose model takes other images than the registered model holds
    other = client.create_model_version(name, v1.source, run_id=v1.run_id, model_id=v1.model_id,
                                        tags={**v1.tags, "model.input_shape": "3x32x32"})
    refused(str(other.version), "model.input_shape 3x32x32, but registered model "
                                f"'{name}' holds 1x8x8")
    # one whose recorded test metric is not what evaluate logged on its training run
    forged = client.create_model_version(name, v1.source, run_id=v1.run_id, model_id=v1.model_id,
                                         tags={**v1.tags, "test/f1_macro": "0.999999"})
    refused(str(forged.version), "test/f1_macro 0.999999 is not what evaluate logged on run")
    assert _cli(cfg, "promote", name, "99") == 2
    assert "reprolab promote: error: models:/promote-lineage/99: " in _one_line(capsys)

    # outside the project: the store MLFLOW_TRACKING_URI names, or one line saying so
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    from reprolab import cli

    valid = client.create_model_version(name, v1.source, run_id=v1.run_id, model_id=v1.model_id,
                                        tags=v1.tags)  # a second version of the very same model
    assert cli.main(["promote", "-q", name, str(valid.version)]) == 0
    assert _aliases(name)["champion"] == str(valid.version)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert cli.main(["promote", "-q", name, "1"]) == 2
    assert "no params.yaml here to find the project's MLflow store" in _one_line(capsys)
    assert not (elsewhere / "mlflow.db").exists() and not list(elsewhere.iterdir())
