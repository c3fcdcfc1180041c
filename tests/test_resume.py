"""Interrupting `reprolab train`: SIGTERM ends the run KILLED with a checkpoint, kill -9 loses
nothing that a checkpoint holds, and the rerun resumes the same MLflow run to weights bitwise
identical to an uninterrupted run, with every epoch's metrics in the run exactly once."""

from __future__ import annotations

import csv
import logging
import os
import signal
import threading
import time

import pytest
import torch
from mlflow import MlflowClient

from conftest import TINY, cli_argv
from reprolab import cli, train
from reprolab.launch import TrainerBusy

# Small batches make an epoch last long enough to be interrupted in the middle of one.
SLOW = ["train.epochs=4", "train.batch_size=16", "train.schedule=cosine", "data.augment.flip=true"]
EVERY_EPOCH, NEVER = "train.checkpoint_every_s=0", "train.checkpoint_every_s=3600"


def _checkpoint_epoch(cfg) -> int:
    try:
        return torch.load(cfg.checkpoint_file, weights_only=True)["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):  # absent, or replaced while read
        return 0


def _when_checkpoint(cfg, after_epoch: int, action, alive=lambda: True, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if _checkpoint_epoch(cfg) >= after_epoch:
            action()
            return
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint after epoch {after_epoch} appeared")


def _weights(cfg):
    return torch.load(cfg.models_dir / "model.pt", weights_only=True)["state_dict"]


_STRAIGHT: dict[tuple[str, ...], dict] = {}


def _assert_same_as_uninterrupted(project, cfg, overrides) -> None:
    """cfg's trained weights against those of an uninterrupted run of the same training
    overrides (trained once per module, in another experiment of the same project)."""
    got = _weights(cfg)  # read first: the straight run writes the same models/
    key = tuple(sorted(o for o in overrides if not o.startswith("tracking.")))
    if key not in _STRAIGHT:
        straight = project(*key, "tracking.experiment=resume-straight")
        train.run(straight)
        _STRAIGHT[key] = _weights(straight)
    expected = _STRAIGHT[key]
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


class _SigtermOnLog(logging.Handler):
    """Sends this process SIGTERM (from another thread, as from outside) when a log line with
    `text` appears: the epoch's state then waits in memory, its timed checkpoint not due."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.seen, self.done = text, threading.Event(), False
        self.thread = threading.Thread(target=self._kill)
        self.thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()

    def _kill(self) -> None:
        if self.seen.wait(timeout=120) and not self.done:
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(self) -> None:
        self.done = True
        self.seen.set()
        self.thread.join()


def test_sigterm_then_kill_9_then_resume_is_bitwise_identical(project, capsys, forks):
    overrides = [*TINY, "tracking.experiment=resume-test", *SLOW]
    cfg = project(*overrides[len(TINY):])
    args = cli_argv("train", cfg.base_dir, *overrides, quiet=False)

    # SIGTERM from outside while `reprolab train` runs here, in this process, between timed
    # checkpoints: the state of the last finished epoch is written on the way out
    previous = signal.getsignal(signal.SIGTERM)
    killer = _SigtermOnLog("epoch 2/4")
    logging.getLogger("reprolab.engine").addHandler(killer)
    try:
        code = cli.main([*args, "-S", NEVER])
    finally:
        signal.signal(signal.SIGTERM, previous)
        logging.getLogger("reprolab.engine").removeHandler(killer)
        killer.stop()
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "reprolab train: interrupted"
    state = torch.load(cfg.checkpoint_file, weights_only=True)
    run_id, first = state["run_id"], state["epoch"]
    assert 1 <= first < 4  # not the one written at the start (epoch 0): the one on SIGTERM
    assert MlflowClient().get_run(run_id).info.status == "KILLED"
    _assert_each_epoch_once(run_id, state["history"])  # flushed with that checkpoint

    # kill -9 of a resumed run in another process, checkpointing every epoch now (how often is
    # no part of a checkpoint's identity): no chance to clean up
    proc = forks.reprolab([*args, "-q", "-S", EVERY_EPOCH], cfg.base_dir)
    _when_checkpoint(cfg, first + 1, lambda: os.kill(proc.pid, signal.SIGKILL),
                     alive=lambda: proc.poll() is None)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    state = torch.load(cfg.checkpoint_file, weights_only=True)
    assert state["run_id"] == run_id and first < state["epoch"] < 4

    result = train.run(cfg)  # the rerun resumes the same run and finishes it
    assert result.run_id == run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    _assert_each_epoch_once(run_id, result.history)
    assert not cfg.checkpoint_file.exists()
    _assert_same_as_uninterrupted(project, cfg, SLOW)


def test_checkpoint_from_another_config_is_ignored(project, caplog):
    cfg = project("tracking.experiment=resume-test", "train.epochs=2")
    cfg.checkpoint_file.parent.mkdir(parents=True)
    torch.save({"identity": "another config", "epoch": 1, "run_id": "x"}, cfg.checkpoint_file)
    with caplog.at_level(logging.INFO, logger="reprolab.train"):
        result = train.run(cfg)
    assert "it was written by a different config" in caplog.text
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_diverging_run_ends_failed_and_says_where(project, capsys, monkeypatch):
    from reprolab import cli

    cfg = project()
    monkeypatch.chdir(cfg.base_dir)
    code = cli.main(["train", "-q", "-S", "tracking.experiment=diverge-cli",
                     "-S", "train.use_tuned=false", "-S", "train.optimizer=sgd",
                     "-S", "train.lr=1e6"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.startswith("reprolab train: error: non-finite loss at epoch 1, step ")
    assert len(err.splitlines()) == 1
    exp = MlflowClient().get_experiment_by_name("diverge-cli")
    runs = MlflowClient().search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert not cfg.models_dir.exists()  # nothing half-written


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_on_cpu(project, precision):
    cfg = project(f"train.precision={precision}", "train.epochs=2",
                  f"tracking.experiment=precision-{precision}")
    result = train.run(cfg)
    assert result.hyper.precision == precision
    assert result.history[-1]["val/accuracy"] > 0.5
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["precision"] == precision


# ---- one trainer at a time; each epoch in MLflow exactly once ----

# DRIVER WHERE EPOCH <cli args> (a fork: tests/forks.py) runs `reprolab` with a real kill -9 at
# one chosen point: the process dies in MLflow calls of train, or between two checkpoints, where
# no signal from outside could land reliably.
DRIVER = """
import math, os, signal, sys
from reprolab import cli, tracking, train

WHERE, EPOCH = sys.argv[1], int(sys.argv[2])
log_epochs, log_model, save = tracking.log_epochs, tracking.log_model, train.Checkpointer.__call__

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def dying_log_epochs(rows, tags=None):  # the metrics of epochs a checkpoint has written
    epochs = [row["epoch"] for row in rows]
    if WHERE == "before metrics" and EPOCH in epochs:
        die()
    log_epochs(rows, tags)
    if WHERE == "after metrics" and EPOCH in epochs:
        die()

def dying_log_model(*args, **kwargs):
    uri = log_model(*args, **kwargs)
    if WHERE == "after model":
        die()
    return uri

def dying_save(self, state):  # the clock says: write after epoch 1, not after EPOCH
    if WHERE == "between checkpoints" and state["epoch"] == 1:
        self.written = -math.inf
    save(self, state)
    if WHERE == "between checkpoints" and state["epoch"] == EPOCH:
        assert self.waiting is not None  # in memory only
        die()

tracking.log_epochs, tracking.log_model = dying_log_epochs, dying_log_model
train.Checkpointer.__call__ = dying_save
sys.exit(cli.main(sys.argv[3:]))
"""


def _cli_args(cfg, overrides) -> list[str]:
    return cli_argv("train", cfg.base_dir, *TINY, *overrides)


def _die_in_train(forks, cfg, overrides, where: str, epoch: int = 0) -> None:
    (proc,) = forks.run((DRIVER, [where, epoch, *_cli_args(cfg, overrides)], cfg.base_dir))
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _assert_each_epoch_once(run_id: str, history: list[dict[str, float]]) -> None:
    """Every metric of every epoch is in the run once, with the value of the history (and so
    of reports/train/history.csv)."""
    client = MlflowClient()
    for key in history[0]:
        if key == "epoch":
            continue
        points = client.get_metric_history(run_id, key)
        assert sorted(p.step for p in points) == [row["epoch"] for row in history], key
        assert {p.step: p.value for p in points} == {row["epoch"]: row[key] for row in history}


def _logged_models(run_id: str) -> list:
    client = MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    return client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'")


def _running_run(experiment: str, status: str = "RUNNING") -> str:
    """The experiment's one run, in `status` (RUNNING: what kill -9 leaves behind)."""
    exp = MlflowClient().get_experiment_by_name(experiment)
    runs = MlflowClient().search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == [status]
    return runs[0].info.run_id


def test_a_held_lock_refuses_train_with_the_holders_pid(project):
    from reprolab.lifecycle import exclusive_lock

    cfg = project("tracking.experiment=lock-held")
    lock, holder = train.lock_file(cfg), rf"\(pid {os.getpid()}\)"
    with exclusive_lock(lock), pytest.raises(TrainerBusy, match=holder) as refused:
        train.run(cfg)
    assert refused.value.exit_code == 2
    assert MlflowClient().get_experiment_by_name("lock-held") is None  # refused before MLflow
    assert train.run(cfg).history[-1]["epoch"] == 3  # released: the next trainer runs


@pytest.mark.slow
def test_second_trainer_is_refused_while_the_first_finishes(project, forks):
    """The orphan of a killed `dvc repro` still trains when `dvc repro` runs again."""
    overrides = ["tracking.experiment=orphan", *SLOW, EVERY_EPOCH]
    cfg = project(*overrides)
    args = _cli_args(cfg, overrides)
    first = forks.reprolab(args, cfg.base_dir)
    try:
        # Frozen mid-run it keeps its lock, and the second one cannot outrun it.
        _when_checkpoint(cfg, 1, lambda: os.kill(first.pid, signal.SIGSTOP),
                         alive=lambda: first.poll() is None)
        second = forks.reprolab(args, cfg.base_dir).result(timeout=120)
        assert first.poll() is None
        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=120)
    finally:
        first.kill()
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2, second.stderr
    assert len(lines) == 1 and lines[0].startswith("reprolab train: error: "), lines
    assert f"(pid {first.pid})" in lines[0]
    assert first.returncode == 0, err
    run_id = out.split()[2]  # "train: run <id>  val/accuracy ..."
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    history = [{k: float(v) for k, v in row.items()} for row in
               csv.DictReader((cfg.report_dir("train") / "history.csv").open())]
    _assert_each_epoch_once(run_id, history)
    assert len(_logged_models(run_id)) == 1


@pytest.mark.parametrize("where, epoch, every", [
    ("before metrics", 2, EVERY_EPOCH),  # the checkpoint written, its epoch's metrics not
    ("after metrics", 2, EVERY_EPOCH),
    ("before metrics", 3, NEVER),  # the last checkpoint's metrics of all three epochs in flight
    ("between checkpoints", 2, NEVER),  # epoch 1 written, epoch 2 only in memory
    ("after model", 0, EVERY_EPOCH),
], ids=["before-metrics", "after-metrics", "three-epochs-in-flight", "between-checkpoints",
        "after-model"])
def test_kill_9_inside_train_then_rerun_logs_everything_once(project, forks, where, epoch,
                                                             every):
    """kill -9 just before and just after a checkpoint's metrics reach MLflow, between two
    checkpoints, and after the model is logged: the rerun resumes the run from the last
    checkpoint, leaves each metric step and the model once, and ends with the weights of an
    uninterrupted run."""
    overrides = [f"tracking.experiment=die-{where.replace(' ', '-')}-{epoch}", every]
    cfg = project(*overrides)
    _die_in_train(forks, cfg, overrides, where, epoch)
    run_id = _running_run(overrides[0].split("=")[1])
    resumed_at = torch.load(cfg.checkpoint_file, weights_only=True)["epoch"]
    assert resumed_at == (1 if where == "between checkpoints" else epoch or 3)

    result = train.run(cfg)
    assert result.run_id == run_id
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
    _assert_each_epoch_once(run_id, result.history)
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert len(_logged_models(run_id)) == 1
    if where == "between checkpoints":
        _assert_same_as_uninterrupted(project, cfg, [])


def test_a_failure_after_training_ends_the_run_failed_with_every_epoch(project, monkeypatch):
    """The last checkpoint's epochs go to MLflow after the model (with publish's tags): when
    logging the model fails, they still reach the run before it ends FAILED, and the rerun
    resumes from that checkpoint and logs none twice."""
    from reprolab import tracking

    cfg = project("tracking.experiment=publish-fails", NEVER)

    def failing_log_model(*args, **kwargs):
        raise RuntimeError("the artifact store is full")

    with monkeypatch.context() as patched:
        patched.setattr(tracking, "log_model", failing_log_model)
        with pytest.raises(RuntimeError, match="artifact store is full"):
            train.run(cfg)
    run_id = _running_run("publish-fails", "FAILED")
    state = torch.load(cfg.checkpoint_file, weights_only=True)
    assert state["epoch"] == 3
    _assert_each_epoch_once(run_id, state["history"])

    result = train.run(cfg)
    assert result.run_id == run_id and MlflowClient().get_run(run_id).info.status == "FINISHED"
    _assert_each_epoch_once(run_id, result.history)
    assert len(_logged_models(run_id)) == 1


def test_checkpoint_of_a_changed_config_ends_its_run_killed(project, forks):
    overrides = ["tracking.experiment=changed-config", EVERY_EPOCH]
    cfg = project(*overrides)
    _die_in_train(forks, cfg, overrides, "after metrics", 1)
    old_run = _running_run("changed-config")

    result = train.run(project(*overrides, "train.lr=0.002"))
    assert result.run_id != old_run
    assert MlflowClient().get_run(old_run).info.status == "KILLED"
    assert MlflowClient().get_run(result.run_id).info.status == "FINISHED"
    _assert_each_epoch_once(result.run_id, result.history)
