"""tune, train, evaluate and register in-process on digits, against a real MLflow store."""

from __future__ import annotations

import csv
import os

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import TINY, training_run_id
from reprolab import evaluate, register, train, tune
from reprolab.data import load_split
from reprolab.io import read_json, sha256_file, write_json


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
    name = tune.study_name(cfg, meta)
    assert name.startswith("reprolab-")
    assert name == tune.study_name(project(), meta)
    assert name != tune.study_name(cfg, {"manifest_sha256": "b"})
    assert name != tune.study_name(project("tune.lr_high=0.2"), meta)


def test_train_evaluate_register_on_one_run(project):
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
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.source.endswith('"data/processed"}') or \
        dataset.dataset.source == "data/processed", dataset.dataset.source
    assert run.data.tags["data.processed_sha256"].startswith(dataset.dataset.digest)
    assert len(run.data.tags["data.manifest_sha256"]) == 64
    assert run.data.tags["git.commit"]
    assert run.data.tags["device"] == "cpu"
    assert run.data.tags["torch.version"] == torch.__version__
    assert run.data.params["model.parameters"] == str(
        sum(p.numel() for p in result.model.parameters())
    )
    artifacts = {a.path for a in MlflowClient().list_artifacts(result.run_id)}
    assert {"history.csv", "learning_curve.png", "config.yaml"} <= artifacts
    assert not cfg.checkpoint_file.exists()  # finished: no resume checkpoint left
    history = MlflowClient().get_metric_history(result.run_id, "val/accuracy")
    assert [m.step for m in history] == [1, 2, 3]
    assert history[-1].value == pytest.approx(float(rows[-1]["val/accuracy"]))
    assert run.inputs.dataset_inputs[0].dataset.name == "digits"

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
    per_class = read_json(out / "per_class.json")
    assert set(per_class) == {str(d) for d in range(10)}
    assert sum(c["support"] for c in per_class.values()) == len(test)
    logged = MlflowClient().get_run(result.run_id).data.metrics
    assert logged["test/f1_macro"] == pytest.approx(metrics["f1_macro"])

    # register: version 1 becomes champion; the same run again makes no second version
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


def test_evaluate_and_register_refuse_a_run_missing_from_the_store(project):
    from reprolab.errors import DataError

    # a model of its own (no other test trains this one): no other run has its hash
    cfg = project("tracking.experiment=missing-run", "train.epochs=1", "train.lr=0.00123")
    train.run(cfg)
    # as if models/ came from elsewhere (a DVC remote): no run in this store wrote this model
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    MlflowClient().delete_tag(training_run_id(cfg), "model.sha256")
    with pytest.raises(DataError, match=r"no finished training run with model.sha256 \w{12} in "
                                        r"the MLflow store .*set MLFLOW_TRACKING_URI"):
        evaluate.run(cfg)
    assert not cfg.report_dir("evaluate").exists()  # nothing written
    (cfg.report_dir("evaluate")).mkdir(parents=True)
    (cfg.report_dir("evaluate") / "metrics.json").write_text('{"f1_macro": 0.5}')
    write_json(cfg.evaluated_file, {"model_sha256": sha256_file(cfg.model_file)})
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
    assert read_json(cfg.evaluated_file) == {"model_sha256": sha256_file(cfg.model_file)}
    chance = project("tracking.experiment=stale", f"register.model_name={name}",
                     "train.epochs=1", "train.lr=1e-6")
    train.run(chance)
    assert read_json(cfg.report_dir("evaluate") / "metrics.json") == metrics  # stale
    args = ["register", "--params", str(cfg.base_dir / "params.yaml")]
    for item in (*TINY, "tracking.experiment=stale", f"register.model_name={name}",
                 "train.epochs=1", "train.lr=1e-6"):
        args += ["-S", item]
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
    with pytest.raises(ConfigError, match=r"register.metric/min_delta = accuracy/0: registered "
                                          r"model 'gate-test' is gated on f1_macro/0.0"):
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
    assert hyper_for(with_tuned(cfg), 2, torch.device("cpu")).batch_size == 32
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
    assert cli.main(args) == 1
    out = capsys.readouterr().out.strip()
    assert "differs" in out and "not built from a git commit" in out, out
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
