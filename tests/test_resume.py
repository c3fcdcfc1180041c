"""Interrupting `reprolab train`: SIGTERM ends the run KILLED, kill -9 loses nothing, and the
rerun resumes the same MLflow run to weights bitwise identical to an uninterrupted run."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from mlflow import MlflowClient

from conftest import TINY
from reprolab import cli, train

# Small batches make an epoch last long enough to be interrupted in the middle of one.
SLOW = ["train.epochs=4", "train.batch_size=16", "train.schedule=cosine", "data.augment.flip=true"]


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


def test_sigterm_then_kill_9_then_resume_is_bitwise_identical(project, capsys):
    overrides = [*TINY, "tracking.experiment=resume-test", *SLOW]
    cfg = project(*overrides[len(TINY):])
    args = ["train", "-q", "--params", str(cfg.base_dir / "params.yaml")]
    for item in overrides:
        args += ["-S", item]

    # SIGTERM from outside while `reprolab train` runs here, in this process
    previous = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(
        target=_when_checkpoint, args=(cfg, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    )
    killer.start()
    try:
        code = cli.main(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    killer.join()
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "reprolab train: interrupted"
    run_id = torch.load(cfg.checkpoint_file, weights_only=True)["run_id"]
    assert MlflowClient().get_run(run_id).info.status == "KILLED"

    # kill -9 of a resumed run in another process: no chance to clean up
    proc = subprocess.Popen([sys.executable, "-m", "reprolab", *args], cwd=cfg.base_dir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _when_checkpoint(cfg, 2, lambda: os.kill(proc.pid, signal.SIGKILL),
                     alive=lambda: proc.poll() is None)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err
    state = torch.load(cfg.checkpoint_file, weights_only=True)
    assert state["run_id"] == run_id and 2 <= state["epoch"] < 4

    result = train.run(cfg)  # the rerun resumes the same run and finishes it
    assert result.run_id == run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = {m.step for m in MlflowClient().get_metric_history(run_id, "val/accuracy")}
    assert steps == {1, 2, 3, 4}
    assert not cfg.checkpoint_file.exists()

    straight = project("tracking.experiment=resume-test-straight", *SLOW)
    train.run(straight)
    expected, got = _weights(straight), _weights(cfg)
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


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
