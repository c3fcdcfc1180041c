"""The search: samplers, pruners, optional dimensions and the plots on the parent run.

Many workers, storages and faults: tests/test_study.py."""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient

from reprolab import tune
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
    return optuna.load_study(study_name=tune.study_name(cfg, load_meta(cfg.processed_dir)),
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
    children = {r.data.params["lr"]: r.info.status for r in _children("tune-nan")}
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


@pytest.mark.parametrize("pruner", ["successive_halving", "hyperband"])
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
