"""Data-parallel training under the real torchrun: 2 CPU processes on the gloo backend.

Each run starts real processes (seconds of imports each), so every run is a module fixture that
several tests look at: one `dvc repro` with train.processes: 2 (`reprolab train` starting
torchrun's launcher), the 2-rank run the others are held to; one `reprolab train` in this process
(1 rank); a launcher's run killed and rerun; torchrun itself, restarted after a kill.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from conftest import REPO, cli_argv, digits_project
from reprolab import registry, tags, train
from reprolab.config import load_config
from reprolab.data import load_split
from reprolab.models import with_probabilities
from test_e2e import VENV, sh, shell_env, store, tool

sys.path.insert(0, str(REPO / "benchmarks"))
from harness import git_copy  # noqa: E402

# Every run trains this: the global batch of 8 is 4 + 4 across two ranks; 1167 training images
# end each epoch on an uneven batch of 7 (4 + 3); warm-up, cosine and augmentation draw as one.
TRAIN = {"use_tuned": False, "epochs": 3, "batch_size": 8, "optimizer": "adam", "lr": 0.002,
         "schedule": "cosine", "warmup_epochs": 0.5, "precision": "fp32",
         "checkpoint_every_s": 0}
AUGMENT = {"crop_padding": 1, "flip": True}
OVERRIDES = [*(f"train.{k}={str(v).lower() if isinstance(v, bool) else v}"
               for k, v in TRAIN.items()),
             *(f"data.augment.{k}={str(v).lower()}" for k, v in AUGMENT.items())]
# 2 ranks against 1 process on the same global batch: the same arithmetic summed in another
# order (each rank's share, then gloo's all-reduce). Measured here: about 1e-6 after 3 epochs.
TOLERANCE = 2e-5
METRICS = ("train/loss", "train/accuracy", "val/loss", "val/accuracy", "train/lr")


def project(root: Path, processed: Path, *more: str):
    """A project in `root` with the digits data already processed; -> its config."""
    return load_config(digits_project(root, processed) / "params.yaml", [*OVERRIDES, *more])


def train_args(cfg, *more: str) -> list[str]:
    return cli_argv("train", cfg.base_dir, *OVERRIDES, *more)


def launcher(cfg, *more: str) -> list[str]:
    """`reprolab train` with train.processes: 2, which starts torchrun's launcher itself (the
    arguments of `python -m reprolab`, run as a fork: tests/forks.py)."""
    return train_args(cfg, "train.processes=2", *more)


def weights(models: Path) -> dict[str, torch.Tensor]:
    return torch.load(models / "model.pt", weights_only=True)["state_dict"]


def history(reports: Path) -> list[dict[str, float]]:
    with (reports / "train" / "history.csv").open() as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def each_epoch_once(run_id: str, epochs: int, client: MlflowClient | None = None) -> None:
    client = client or MlflowClient()
    for key in (*METRICS, "train/images_per_second"):
        steps = sorted(p.step for p in client.get_metric_history(run_id, key))
        assert steps == list(range(1, epochs + 1)), key


def experiment_runs(name: str) -> list:
    exp = MlflowClient().get_experiment_by_name(name)
    return MlflowClient().search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def repro_two(tmp_path_factory):
    """`dvc repro` of the whole pipeline with train.processes: 2, in a clone of the project:
    `reprolab train` starts torchrun's launcher itself. The 2-rank run the others are held to."""
    dest = git_copy(tmp_path_factory.mktemp("clone"), {
        "train": {**TRAIN, "processes": 2}, "data": {"augment": AUGMENT},
        "tune": {"n_trials": 1, "epochs": 1},
    })
    if VENV:
        (dest / ".venv").symlink_to(VENV)
    return dest, sh(tool("dvc"), "repro", cwd=dest, env=shell_env())


@pytest.fixture(scope="module")
def two_ranks(repro_two):
    """-> (the project, its train run): the one training run of `dvc repro`'s 2 ranks."""
    dest, _ = repro_two
    client = store(dest)
    exp = client.get_experiment_by_name("reprolab")
    (run,) = client.search_runs([exp.experiment_id], "tags.`dvc.stage` = 'train'")
    return dest, run


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, processed_once):
    cfg = project(tmp_path_factory.mktemp("alone"), processed_once,
                  "tracking.experiment=ddp-alone")
    return cfg, train.run(cfg)


def test_train_imports_mlflow_only_where_rank_0_logs():
    """`reprolab train`'s launcher and the ranks other than 0 log nothing: importing the stage
    imports no MLflow (1.2 CPU-s and a second of start-up in each such process); rank 0 imports
    it when it looks for a run to resume."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom reprolab import cli, launch, train\n"
         "print('mlflow' in sys.modules, 'reprolab.tracking' in sys.modules)"],
        capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["False", "False"]


@pytest.mark.e2e
def test_dvc_repro_with_two_processes_runs_the_whole_pipeline(repro_two):
    dest, first = repro_two
    for stage in ("fetch", "preprocess", "tune", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    for rel in ("models/model.pt", "reports/evaluate/metrics.json",
                "reports/register/decision.json"):
        assert (dest / rel).is_file(), rel
    client = store(dest)
    exp = client.get_experiment_by_name("reprolab")
    runs = client.search_runs([exp.experiment_id], "params.`distributed.world_size` = '2'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "test/accuracy" in runs[0].data.metrics  # evaluate found the run by its model


@pytest.mark.e2e
def test_two_ranks_end_where_one_process_ends(two_ranks, one_process):
    (dest, _), (cfg1, result) = two_ranks, one_process
    got, expected = weights(dest / "models"), weights(cfg1.models_dir)
    assert got.keys() == expected.keys()  # the plain module's: no DDP wrapper in the names
    worst = max((got[k].double() - expected[k].double()).abs().max().item() for k in got)
    assert worst <= TOLERANCE, worst
    two, one = history(dest / "reports"), result.history
    assert [row["val/accuracy"] for row in two] == [row["val/accuracy"] for row in one]
    for a, b in zip(two, one, strict=True):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/lr"] == pytest.approx(b["train/lr"], abs=1e-12)


@pytest.mark.e2e
def test_rank_0_alone_records_one_run_and_one_plain_model(two_ranks, one_process):
    dest, run = two_ranks  # the only train run: rank 1 started none
    assert run.info.status == "FINISHED"
    for data in (run.data.params, run.data.tags):
        assert data["distributed.world_size"] == "2"
        assert data["distributed.backend"] == "gloo"
    client = store(dest)
    each_epoch_once(run.info.run_id, TRAIN["epochs"], client)
    models = [m for m in client.search_logged_models([run.info.experiment_id])
              if m.source_run_id == run.info.run_id]
    assert len(models) == 1
    # the logged model is the trained plain module: the same answers as models/model.pt
    from reprolab.models import load_checkpoint

    session_store = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{dest / 'mlflow.db'}")
    try:
        logged = registry.load_classifier(run.data.tags[tags.MODEL_URI])
    finally:
        mlflow.set_tracking_uri(session_store)
    model, _ = load_checkpoint(dest / "models" / "model.pt")
    x = load_split(dest / "data" / "processed", "val").x[:16].float()
    with torch.no_grad():
        assert torch.allclose(logged[0](x), with_probabilities(model.eval())(x), atol=1e-6)
    # one process and two log the same kind of model: the same signature, the same flavor
    alone = registry.load_classifier(one_process[1].model_uri)
    assert alone[1:] == logged[1:]


def _rank_pid(launcher_pid: int, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's children."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rpartition(")")[2].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher_pid and f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


def _checkpoint_epoch(cfg) -> int:
    try:
        return torch.load(cfg.checkpoint_file, weights_only=True)["epoch"]
    except (FileNotFoundError, RuntimeError, EOFError):  # absent, or replaced while read
        return 0


@pytest.fixture(scope="module")
def killed_then_rerun(tmp_path_factory, processed_once, forks):
    """`reprolab train` (2 ranks) whose rank 1 is killed -9 in epoch 2, a second trainer started
    while the ranks are frozen, then a rerun. -> (cfg, first, its stderr, second, the
    checkpoint the kill left with the run's status then, the rerun)."""
    cfg = project(tmp_path_factory.mktemp("kill"), processed_once,
                  "tracking.experiment=ddp-kill")
    first = forks.reprolab(launcher(cfg, "tracking.experiment=ddp-kill"), cfg.base_dir)
    try:
        deadline = time.monotonic() + 180
        while _checkpoint_epoch(cfg) < 1 and first.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after epoch 1"
            time.sleep(0.02)
        ranks = [_rank_pid(first.pid, rank) for rank in (0, 1)]
        for pid in ranks:  # frozen in epoch 2: a second trainer meets the launcher's lock
            os.kill(pid, signal.SIGSTOP)
        second = forks.reprolab(train_args(cfg, "tracking.experiment=ddp-kill"),
                                cfg.base_dir).result(timeout=120)
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
        os.kill(ranks[1], signal.SIGKILL)  # rank 1, in the middle of epoch 2
        _, err = first.communicate(timeout=120)
    finally:
        first.kill()
    state = torch.load(cfg.checkpoint_file, weights_only=True) if first.returncode == 1 else {}
    if state:  # how the kill left the run, before the rerun resumes it
        state["status"] = MlflowClient().get_run(state["run_id"]).info.status
    again = forks.reprolab(launcher(cfg, "tracking.experiment=ddp-kill"),
                           cfg.base_dir).result(timeout=300)
    return cfg, first, err, second, state, again


def test_kill_of_rank_1_mid_epoch_then_rerun_resumes_and_finishes(killed_then_rerun):
    cfg, first, err, second, state, again = killed_then_rerun
    assert second.returncode == 2, second.stderr
    (refused,) = second.stderr.strip().splitlines()
    assert refused.startswith("reprolab train: error: another `reprolab train` (pid "
                              f"{first.pid}) is training this project"), refused
    assert first.returncode == 1, err[-3000:]
    assert "error: rank 1 failed, killed by SIGKILL" in err.strip().splitlines()[-1]
    assert 1 <= state["epoch"] < TRAIN["epochs"]
    assert state["status"] in ("FAILED", "KILLED")

    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.split()[2] == state["run_id"]  # the same run, resumed
    assert [r.info.status for r in experiment_runs("ddp-kill")] == ["FINISHED"]
    each_epoch_once(state["run_id"], TRAIN["epochs"])
    assert not cfg.checkpoint_file.exists()


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, processed_once, forks):
    """torchrun itself with --max-restarts=1, rank 1 killed -9 in epoch 2. -> (cfg, torchrun,
    its stdout, its stderr)."""
    cfg = project(tmp_path_factory.mktemp("restart"), processed_once,
                  "tracking.experiment=ddp-restart")
    proc = forks.start(  # `python -m torch.distributed.run ...`
        "from torch.distributed.run import main\nmain()\n",
        ["--standalone", "--nproc-per-node=2", "--max-restarts=1", "-m", "reprolab",
         *train_args(cfg, "tracking.experiment=ddp-restart")], cfg.base_dir)
    try:
        deadline = time.monotonic() + 180
        while _checkpoint_epoch(cfg) < 1 and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint after epoch 1"
            time.sleep(0.02)
        os.kill(_rank_pid(proc.pid, 1), signal.SIGKILL)
        out, err = proc.communicate(timeout=240)
    finally:
        proc.kill()
    return cfg, proc, out, err


def test_torchrun_max_restarts_resumes_after_a_killed_rank(restarted):
    """torchrun restarts all ranks after rank 1's kill -9; they resume from the checkpoint into
    the same run (each restart gets its own part of torchrun's store: see start_distributed)."""
    _, proc, out, err = restarted
    assert proc.returncode == 0, err[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in err  # torchrun's own line: it restarted
    (run,) = experiment_runs("ddp-restart")
    assert run.info.status == "FINISHED" and out.split()[2] == run.info.run_id
    # rank 0 alone printed the run and started it: one run, however many restarts
    assert out.count("train: run ") == 1
    each_epoch_once(run.info.run_id, TRAIN["epochs"])


def test_diverging_lr_fails_every_rank_within_seconds(tmp_path_factory, processed_once,
                                                      forks):
    more = ("tracking.experiment=ddp-diverge", "train.optimizer=sgd", "train.lr=1e6")
    cfg = project(tmp_path_factory.mktemp("diverge"), processed_once, *more)
    started = time.monotonic()
    proc = forks.reprolab(launcher(cfg, *more), cfg.base_dir).result(timeout=300)
    seconds = time.monotonic() - started
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    # one line: rank 0's own, or the launcher's naming the rank that stopped first (a race)
    assert lines[-1].startswith("reprolab train: error: "), lines
    assert "non-finite loss at epoch 1, step " in lines[-1], lines
    # rank 1 wrote to its own log (kept, since it failed): it stopped at the same step
    (rank1,) = cfg.checkpoint_file.parent.glob(".ranks-*/*/attempt_0/1/stderr.log")
    rank1_line = rank1.read_text().strip().splitlines()[-1]
    assert rank1_line.startswith("reprolab train: error: non-finite loss at epoch 1, step ")
    same_step = rank1_line.split(": ")[2]  # "non-finite loss at epoch 1, step N"
    assert same_step in lines[-1], (rank1_line, lines[-1])
    assert [r.info.status for r in experiment_runs("ddp-diverge")] == ["FAILED"]
    assert not cfg.models_dir.exists()
    assert seconds < 120, seconds  # process start-up included; a hung rank would wait 30 min


@pytest.mark.e2e
def test_every_2_rank_run_ends_bitwise_identical(two_ranks, killed_then_rerun, restarted):
    """`dvc repro`'s ranks (`reprolab train` launching torchrun's launcher), the rerun after a
    kill, and torchrun itself restarted after a kill: the same ranks, the same order of every
    sum, the same weights and history to the bit."""
    dest = two_ranks[0]
    expected, rows = weights(dest / "models"), history(dest / "reports")
    for cfg in (killed_then_rerun[0], restarted[0]):
        got = weights(cfg.models_dir)
        for key in expected:
            assert torch.equal(expected[key], got[key]), (cfg.base_dir.name, key)
        assert history(cfg.report_dir("train").parent) == rows, cfg.base_dir.name
