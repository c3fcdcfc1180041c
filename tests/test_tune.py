"""The search: samplers, pruners, optional dimensions and the plots on the parent run.

Many workers, storages and faults: tests/test_study.py."""

from __future__ import annotations

import os

import pytest
import yaml
from mlflow import MlflowClient

from reprolab import space, tune
from reprolab.errors import ConfigError


def _parent(experiment: str):
    exp = MlflowClient().get_experiment_by_name(experiment)
    (parent,) = MlflowClient().search_runs([exp.experiment_id], "tags.`optuna.study` != ''")
    return parent


def _children(experiment: str):
    parent = _parent(experiment)
    exp = MlflowClient().get_experiment_by_name(experiment)
    return MlflowClient().search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")


def _study(cfg):
    import optuna

    from reprolab.data import load_meta
    from reprolab.study import open_storage

    storage = open_storage(cfg.tune.storage, cfg.optuna_journal, cfg.tune.heartbeat_s)
    return optuna.load_study(study_name=space.study_name(cfg, load_meta(cfg.processed_dir)),
                             storage=storage)


def test_random_sampler_with_extra_dimensions_and_plots(project):
    cfg = project("tracking.experiment=tune-extra", "tune.sampler=random", "tune.n_trials=3",
                  "tune.pruner=none", "tune.weight_decay=[1e-5, 1e-2]",
                  "tune.momentum=[0.5, 0.95]", "tune.batch_sizes=[32, 64]")
    summary = tune.run(cfg)
    assert summary["trials_complete"] == 3 and summary["trials_pruned"] == 0
    best = yaml.safe_load(cfg.best_params_file.read_text())
    assert set(best) == {"lr", "optimizer", "weight_decay", "momentum", "batch_size"}
    assert 1e-5 <= best["weight_decay"] <= 1e-2 and 0.5 <= best["momentum"] <= 0.95
    assert best["batch_size"] in (32, 64)
    parent = _parent("tune-extra")
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/param_importances.png",
            "plots/parallel_coordinate.png"} <= artifacts


def test_grid_sampler_walks_the_grid_and_stops(project):
    cfg = project("tracking.experiment=tune-grid", "tune.sampler=grid", "tune.grid_points=2",
                  "tune.optimizers=[sgd]", "tune.n_trials=10", "tune.pruner=none",
                  "tune.epochs=1")
    summary = tune.run(cfg)
    # 2 learning rates x 1 optimizer: the grid is exhausted after two trials
    assert summary["trials_complete"] == 2


def test_a_diverging_trial_fails_and_the_study_goes_on(project):
    from optuna.trial import TrialState

    # sgd at lr 1e-3 learns; at lr 1e4 the loss is no longer finite after a few steps
    cfg = project("tracking.experiment=tune-nan", "tune.sampler=grid", "tune.grid_points=2",
                  "tune.lr_low=1e-3", "tune.lr_high=1e4", "tune.optimizers=[sgd]",
                  "tune.pruner=none", "tune.n_trials=3", "tune.epochs=1")
    summary = tune.run(cfg)
    assert summary["trials_failed"] == 1 and summary["trials_complete"] == 1
    trials = {t.params["lr"]: t for t in _study(cfg).get_trials(deepcopy=False)}
    assert trials[1e4].state == TrialState.FAIL
    assert trials[1e-3].state == TrialState.COMPLETE
    assert yaml.safe_load(cfg.best_params_file.read_text())["lr"] == pytest.approx(1e-3)
    children = {r.data.params["train.lr"]: r.info.status for r in _children("tune-nan")}
    assert children == {"0.001": "FINISHED", "10000.0": "FAILED"}


def test_median_pruner_prunes_and_saves_epochs(project):
    cfg = project("tracking.experiment=tune-median", "tune.pruner=median", "tune.n_trials=8",
                  "tune.epochs=3", "tune.sampler=random")
    summary = tune.run(cfg)
    assert summary["trials_complete"] + summary["trials_pruned"] == 8
    assert summary["trials_pruned"] >= 1
    assert summary["epochs_spent"] < 8 * 3
    states = {r.data.tags["optuna.state"] for r in _children("tune-median")}
    assert states == {"COMPLETE", "PRUNED"}


def test_the_default_pruner_keeps_only_the_top_trials_at_each_epoch(make_config):
    """tune.pruner percentile (benchmarks/bench_pruning.py chose it): the first trial runs in
    full; after each epoch, a trial goes on only while in the top tune.percentile percent."""
    import optuna

    cfg = make_config()
    assert (cfg.tune.pruner, cfg.tune.percentile) == ("percentile", 10.0)
    study = optuna.create_study(direction="maximize", pruner=space.make_pruner(cfg))
    first = study.ask()
    for epoch, value in ((1, 0.5), (2, 0.8)):
        first.report(value, epoch)
        assert not first.should_prune()
    study.tell(first, 0.8)
    behind, ahead, later = study.ask(), study.ask(), study.ask()
    behind.report(0.4, 1)
    ahead.report(0.6, 1)
    later.report(0.6, 1)
    assert behind.should_prune() and not ahead.should_prune()
    later.report(0.7, 2)  # ahead at its first epoch, behind the best at its second
    assert later.should_prune()


@pytest.mark.parametrize("pruner", ["percentile", "successive_halving", "hyperband"])
def test_other_pruners_prune(project, pruner):
    # Hyperband puts each trial in a bracket by a hash of the study name (which has the config's
    # fingerprint in it): enough trials that a bracket that stops early gets some, whatever it is
    cfg = project(f"tracking.experiment=tune-{pruner}", f"tune.pruner={pruner}",
                  "tune.n_trials=10", "tune.epochs=3", "tune.sampler=random")
    summary = tune.run(cfg)
    assert summary["trials_complete"] + summary["trials_pruned"] == 10
    assert summary["trials_pruned"] >= 1
    assert summary["epochs_spent"] < 10 * 3


def test_timeout_stops_starting_trials_and_a_rerun_continues(project):
    cfg = project("tracking.experiment=tune-timeout", "tune.n_trials=40", "tune.timeout_s=1",
                  "tune.pruner=none")
    first = tune.run(cfg)
    done = first["trials_complete"]
    assert 1 <= done < 40
    second = tune.run(cfg)  # the same study goes on for another second
    assert done < second["trials_complete"] < 40
    assert second["trials_failed"] == 0


@pytest.mark.parametrize(("override", "message"), [
    ("tune.weight_decay=[0.1, 0.01]", "tune.weight_decay = [0.1, 0.01]: not a range"),
    ("tune.momentum=[0.5, 1.5]", "tune.momentum = [0.5, 1.5]: not a range"),
    ("tune.batch_sizes=[]", "tune.batch_sizes"),
    ("tune.optimizers=[adam, adam]", "names repeat"),
    ("tune.sampler=cmaes", "tune.sampler = 'cmaes'"),
    ("tune.pruner=patient", "tune.pruner = 'patient'"),
    ("tune.percentile=100", "tune.percentile = 100"),
    ("tune.max_failed=0", "tune.max_failed = 0"),
])
def test_invalid_space_is_refused_before_any_storage(make_config, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_config(override)


def test_sqlite_storage_refuses_several_workers(make_config, tmp_path):
    with pytest.raises(ConfigError, match=r"tune.workers = 2 .*SQLite cannot serve several "
                                          r"writers; use tune.storage: null"):
        make_config("tune.workers=2", f"tune.storage=sqlite:///{tmp_path}/o.db")
    assert not (tmp_path / "o.db").exists()


def test_invalid_space_from_the_command_line_touches_no_storage(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copy(root / "params.yaml", tmp_path / "params.yaml")
    proc = subprocess.run(
        [sys.executable, "-m", "reprolab", "tune", "-S", "tune.optimizers=[adam, lion]"],
        cwd=tmp_path, capture_output=True, text=True,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "tune.optimizers" in line and "lion" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


# ---- what Optuna's and MLflow's own tools show of a study ----


def test_the_study_names_its_objective_and_says_where_its_trials_come_from(project, caplog):
    from reprolab.data import load_meta
    from reprolab.files import read_json
    from reprolab.study import RUN

    cfg = project("tracking.experiment=tune-conventions", "tune.n_trials=6", "tune.epochs=2",
                  "tune.sampler=random", "tune.pruner=median")
    summary = tune.run(cfg)
    study = _study(cfg)
    # optuna-dashboard shows "val/accuracy", not "Objective 0"
    assert study.metric_names == ["val/accuracy"]
    meta = load_meta(cfg.processed_dir)
    attrs = study.user_attrs
    assert attrs["dataset"] == "digits"
    assert attrs["params_hash"] == space.study_fingerprint(cfg, meta)
    assert study.study_name.endswith(attrs["params_hash"][:10])
    assert attrs["model"]["name"] == cfg.model.name
    assert attrs["search_space"]["lr"] == {"low": cfg.tune.lr_low, "high": cfg.tune.lr_high,
                                           "log": True}
    assert attrs["search_space"]["optimizer"] == list(cfg.tune.optimizers)

    # each trial's MLflow run id, under the key Optuna's MLflow integration uses
    runs = {r.info.run_id: r for r in _children("tune-conventions")}
    trials = study.get_trials(deepcopy=False)
    assert {t.user_attrs[RUN] for t in trials} == set(runs)
    for trial in trials:
        run = runs[trial.user_attrs[RUN]]
        assert run.data.tags["optuna.trial"] == str(trial.number)
        assert run.data.tags["optuna.state"] == trial.state.name
        # the runs table tells a pruned trial from a complete one by its name
        assert run.info.run_name.endswith("-pruned") == (trial.state.name == "PRUNED")

    # one line per finished trial: number, state, value, params
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tune: trial ")]
    assert len(lines) == len(trials) == 6
    for trial, line in zip(trials, lines, strict=True):
        assert line.startswith(f"tune: trial {trial.number} {trial.state.name}  val/accuracy ")
        assert f"optimizer={trial.params['optimizer']}" in line
        assert f"lr={trial.params['lr']:.4g}" in line
        if trial.state.name == "COMPLETE":
            assert f"val/accuracy {trial.value:.4f}" in line
        else:  # pruned: the last value it reported
            step = max(trial.intermediate_values)
            assert f"val/accuracy at epoch {step} {trial.intermediate_values[step]:.4f}" in line

    # the DVC metrics file holds numbers only; the study's name beside it
    assert all(isinstance(v, int | float) for v in summary.values())
    assert read_json(cfg.report_dir("tune") / "summary.json") == summary
    assert read_json(cfg.report_dir("tune") / tune.STUDY_FILE) == {
        "study": study.study_name, "objective": "val/accuracy", "direction": "maximize",
        "best_trial": study.best_trial.number}


def test_under_mlflow_run_the_stage_nests_its_runs_in_the_project_run(project, monkeypatch,
                                                                      tmp_path):
    """`mlflow run` hands its project run to the command in MLFLOW_RUN_ID: tune's parent run
    nests under it, in its experiment (also the trials of a spawned worker), and no stage
    writes into the project run itself."""
    from reprolab import tracking

    client = MlflowClient()
    experiment = client.create_experiment("project-run-experiment",
                                          artifact_location=(tmp_path / "artifacts").as_uri())
    project_run = client.create_run(experiment, tags={"mlflow.project.entryPoint": "main"})
    monkeypatch.setattr(tracking, "_project_run", None)  # restored after the test
    monkeypatch.setenv("MLFLOW_RUN_ID", project_run.info.run_id)
    cfg = project("tracking.experiment=tune-not-this-one", "tune.n_trials=3", "tune.epochs=1",
                  "tune.workers=2", "tune.pruner=none", "train.batch_size=16")
    tune.run(cfg)
    assert "MLFLOW_RUN_ID" not in os.environ  # spawned workers do not inherit it

    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs
                 if r.data.tags.get("mlflow.parentRunId") == project_run.info.run_id]
    assert "optuna.study" in parent.data.tags
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 3
    assert len({r.data.tags["optuna.worker"] for r in trials}) == 2  # one in a spawned worker
    assert client.get_run(project_run.info.run_id).data.params == {}
    assert client.get_experiment_by_name("tune-not-this-one") is None
