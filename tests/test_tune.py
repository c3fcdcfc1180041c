"""The search: samplers, pruners, optional dimensions and the plots on the parent run."""

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
    cfg = project(f"tracking.experiment=tune-{pruner}", f"tune.pruner={pruner}",
                  "tune.n_trials=6", "tune.epochs=3", "tune.sampler=random")
    summary = tune.run(cfg)
    assert summary["trials_complete"] + summary["trials_pruned"] == 6
    assert summary["trials_pruned"] >= 1
    assert summary["epochs_spent"] < 6 * 3


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
])
def test_invalid_space_is_refused_before_any_storage(make_config, override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_config(override)


# ---- many workers, one budget, real storages ----

# Trials of a second or so: long enough to be killed inside one.
SLOW_TRIALS = ["tune.epochs=2", "train.batch_size=16", "tune.pruner=none", "tune.sampler=random"]


def _study(cfg):
    import optuna

    from reprolab.data import load_meta

    return optuna.load_study(study_name=tune.study_name(cfg, load_meta(cfg.processed_dir)),
                             storage=tune.open_storage(cfg))


def _check_exact_budget(cfg, n):
    from optuna.trial import TrialState

    trials = _study(cfg).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    points = [(t.params["optimizer"], t.params["lr"]) for t in finished]
    assert len(set(points)) == len(points)  # workers do not repeat each other
    return trials


def _kill_a_worker_mid_trial(cfg, overrides):
    """Start `reprolab tune --worker` in another process and kill -9 it inside a trial."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from optuna.trial import TrialState

    args = [sys.executable, "-m", "reprolab", "tune", "--worker", "-q",
            "--params", str(cfg.base_dir / "params.yaml")]
    for item in overrides:
        args += ["-S", item]
    proc = subprocess.Popen(args, cwd=cfg.base_dir, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        running = [t for t in _study(cfg).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                   if t.user_attrs.get("worker", "").endswith(f":{proc.pid}")]
        if running:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return running[0].number
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("the worker never started a trial")


def _workers_test(project, storage_overrides, settle=0.0):
    import time

    from conftest import TINY

    overrides = ["tune.workers=2", "tune.n_trials=5", *SLOW_TRIALS, *storage_overrides]
    cfg = project(*overrides)
    summary = tune.run(cfg)
    assert summary["trials_complete"] == 5
    trials = _check_exact_budget(cfg, 5)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials
    assert tune.run(cfg)["trials_complete"] == 5  # a rerun adds none

    # a worker killed inside a trial leaves nothing RUNNING once the study goes on
    more = project(*overrides, "tune.n_trials=6", "tune.workers=1")
    killed = _kill_a_worker_mid_trial(more, [*TINY, *overrides, "tune.n_trials=6",
                                             "tune.workers=1"])
    time.sleep(settle)  # database storages: let the heartbeat go stale
    tune.run(more)
    trials = _check_exact_budget(more, 6)
    assert trials[killed].state.name == "FAIL"


def test_two_workers_on_the_journal(project):
    _workers_test(project, [])


@pytest.fixture
def postgres_url():
    import uuid

    import psycopg

    name = f"reprolab_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host="127.0.0.1", port=5432, dbname="test", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        user = admin.info.user
    yield f"postgresql://{user}@127.0.0.1:5432/{name}"
    with psycopg.connect(host="127.0.0.1", port=5432, dbname="test", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_two_workers_on_postgresql(project, postgres_url):
    _workers_test(project, [f"tune.storage={postgres_url}", "tune.heartbeat_s=1"], settle=3.5)


@pytest.fixture
def mariadb_url():
    import uuid

    import pymysql

    name = f"reprolab_test_{uuid.uuid4().hex[:8]}"
    admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    yield f"mysql://root@127.0.0.1:3306/{name}"
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE {name}")
    admin.close()


def test_a_mysql_url_works_with_the_installed_driver(project, mariadb_url):
    cfg = project(f"tune.storage={mariadb_url}", "tune.n_trials=2", "tune.epochs=1")
    summary = tune.run(cfg)
    assert summary["trials_complete"] + summary["trials_pruned"] == 2
    assert len(_study(cfg).trials) == 2
    assert not cfg.optuna_journal.exists()


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


def test_outputs_wait_for_trials_running_elsewhere(make_config, tmp_path):
    """The owner of a study writes its outputs only once no trial is running: a trial of a live
    worker is waited for, one of a dead worker on this machine is failed."""
    import subprocess
    import threading

    import optuna

    cfg = make_config()
    storage = tune.open_storage(cfg)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone, live = study.ask(), study.ask()
    gone.set_user_attr("worker", f"{tune.socket.gethostname()}:{dead.pid}")
    live.set_user_attr("worker", tune._worker_id())
    threading.Timer(1.0, study.tell, (live, 0.5)).start()

    tune.await_running_trials(cfg, study, storage, poll_s=0.1)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states == ["FAIL", "COMPLETE"]
