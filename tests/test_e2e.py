"""End to end: the real `dvc repro`, `dvc exp run --temp` and `mlflow run` in a copy of the repo.

These start real processes (each pays seconds of imports), so the module does the expensive
pipeline once and checks everything about it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from reprolab.io import sha256_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import git_copy  # noqa: E402  (benchmarks/harness.py: the same copy bench_noop uses)

pytestmark = pytest.mark.e2e

TINY = {"train": {"epochs": 3}, "tune": {"n_trials": 3, "epochs": 2}}


def sh(*cmd: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A git repository holding what a clone of this one holds, with tiny params."""
    dest = git_copy(tmp_path_factory.mktemp("clone"), TINY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return dest, env


@pytest.fixture(scope="module")
def repro(repo):
    dest, env = repo
    first = sh("dvc", "repro", cwd=dest, env=env)
    second = sh("dvc", "repro", cwd=dest, env=env)
    return dest, env, first, second


def test_dvc_repro_runs_every_stage_and_writes_every_output(repro):
    dest, _, first, _ = repro
    for stage in ("fetch", "preprocess", "tune", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    for rel in (
        "data/raw/digits/manifest.json", "data/processed/meta.json", "data/processed/train.pt",
        "reports/tune/best_params.yaml", "reports/tune/summary.json", "models/model.pt",
        "models/config.yaml", "reports/train/history.csv", "reports/evaluate/metrics.json",
        "reports/evaluate/predictions.csv", "reports/evaluate/confusion_matrix.png",
        "reports/register/decision.json", "dvc.lock",
    ):
        assert (dest / rel).is_file(), rel
    # the stores sit at the repository root, outside every DVC output
    assert (dest / "mlflow.db").is_file()
    assert (dest / "optuna.journal").is_file()


def test_two_clean_runs_write_the_same_lock(repro, tmp_path_factory):
    """A second fresh copy, its own stores: every cached output hashes the same, so dvc.lock is
    identical apart from register's decision (which is not cached)."""
    dest, env, _, _ = repro
    other = git_copy(tmp_path_factory.mktemp("clone2"), TINY)
    sh("dvc", "repro", "evaluate", cwd=other, env=env)  # register's decision is not compared
    first, second = (yaml.safe_load((d / "dvc.lock").read_text())["stages"]
                     for d in (dest, other))
    for stage in ("fetch", "preprocess", "tune", "train", "evaluate"):
        assert first[stage] == second[stage], stage


def test_second_repro_runs_nothing(repro):
    _, _, _, second = repro
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date" in second.stdout


def test_mlflow_holds_runs_study_and_registry(repro):
    dest, _, _, _ = repro
    client = MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    exp = client.get_experiment_by_name("reprolab")
    assert exp.artifact_location == (dest / "mlartifacts").as_uri()

    champion = client.get_model_version_by_alias("reprolab-classifier", "champion")
    run_id = champion.run_id
    run = client.get_run(run_id)
    assert run.data.tags["model.sha256"] == sha256_file(dest / "models/model.pt")
    assert run.info.status == "FINISHED"
    assert run.data.params["train.hparams_source"] == "tune"
    assert run.data.tags["dvc.stage"] == "train"
    for key in ("train/loss", "val/loss", "val/accuracy", "test/accuracy", "test/f1_macro"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(run_id, "val/accuracy")) == 3

    parents = client.search_runs([exp.experiment_id], "tags.`optuna.study` != ''")
    assert len(parents) == 1
    children = client.search_runs(
        [exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    assert len(children) == 3

    champion = client.get_model_version_by_alias("reprolab-classifier", "champion")
    assert str(champion.version) == "1"
    assert champion.tags["training_run_id"] == run_id
    # DVC rewrote dvc.lock between the stages: that does not make a pristine clone dirty
    assert champion.tags["git.dirty"] == "false"
    assert run.data.tags["mlflow.source.git.commit"] == champion.tags["git.commit"]
    assert run.data.tags["dvc.lock_sha256"] and "dvc.lock" in {
        a.path for a in client.list_artifacts(run_id)}
    assert champion.tags["git.commit"] == sh("git", "rev-parse", "HEAD", cwd=dest,
                                             env=repro[1]).stdout.strip()


def test_temp_experiment_writes_into_the_same_store(repro):
    dest, env, _, _ = repro
    sh("dvc", "exp", "run", "--temp", "-S", "train.epochs=1", "-S", "train.use_tuned=false",
       cwd=dest, env=env)
    client = MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    exp = client.get_experiment_by_name("reprolab")
    runs = client.search_runs([exp.experiment_id], "params.`train.epochs` = '1'")
    assert len(runs) == 1  # the training run only: tune was restored from the cache, not rerun
    assert runs[0].data.params["train.hparams_source"] == "params"
    assert runs[0].data.tags.get("dvc.exp_name")
    # -S edited params.yaml, which the resolved config records: the tree is not dirty
    assert runs[0].data.tags["git.dirty"] == "false"
    assert "test/f1_macro" in runs[0].data.metrics  # evaluate ran there too
    assert not list((dest / ".dvc" / "tmp").rglob("mlflow.db"))
    # one epoch from untuned params is worse: registered as challenger, champion unchanged
    by_run = {v.run_id: v for v in client.search_model_versions("name = 'reprolab-classifier'")}
    version = by_run[runs[0].info.run_id].version
    assert client.get_model_version("reprolab-classifier", version).aliases == ["challenger"]
    champion = client.get_model_version_by_alias("reprolab-classifier", "champion")
    assert str(champion.version) == "1"


def test_predict_names_the_right_digits(repro, tmp_path):
    from PIL import Image

    from reprolab.data import load_split
    from reprolab.models import load_checkpoint

    dest, env, _, _ = repro
    test = load_split(dest / "data/processed", "test")
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(test.x[i, 0].numpy(), "L").save(paths[-1])
    out = sh("reprolab", "predict", "-q", "--model", "models:/reprolab-classifier@champion",
             *map(str, paths), cwd=dest, env=env).stdout.splitlines()
    labels = [line.split()[1] for line in out[1:]]
    model, _ = load_checkpoint(dest / "models/model.pt")  # the champion, read independently
    expected = [str(int(i)) for i in model(test.x[:10].float()).argmax(1)]
    assert labels == expected
    truth = [str(int(y)) for y in test.y[:10]]
    # a 3-epoch model from the tiny test params; `make run`'s model gets about 99%
    assert sum(a == b for a, b in zip(labels, truth, strict=True)) >= 7, (labels, truth)


def test_mlflow_run_entry_point(repro):
    dest, env, _, _ = repro
    uri = f"sqlite:///{dest / 'mlflow.db'}"
    sh("mlflow", "run", ".", "-e", "train", "--env-manager", "local",
       "--experiment-name", "reprolab", "-P", "overrides=train.epochs=2 train.lr=0.002",
       cwd=dest, env={**env, "MLFLOW_TRACKING_URI": uri})
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("reprolab")
    runs = client.search_runs([exp.experiment_id], "params.`train.epochs` = '2'")
    assert len(runs) == 1
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["mlflow.project.entryPoint"] == "train"


def test_verify_rebuilds_the_champion_identically(repro):
    dest, env, _, _ = repro
    out = sh("reprolab", "verify", "models:/reprolab-classifier@champion", cwd=dest,
             env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}"}).stdout
    assert "identical" in out, out
    # the rebuild left no worktree, no run in the store and no change in the clone behind
    worktrees = sh("git", "worktree", "list", cwd=dest, env=env).stdout.splitlines()
    assert len(worktrees) == 1
    assert not sh("git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                  ":(exclude)dvc.lock", cwd=dest, env=env).stdout


def test_a_dvc_remote_carries_data_and_model_to_another_clone(repro, tmp_path):
    dest, env, _, _ = repro
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "shared", str(remote), cwd=dest, env=env)
    sh("dvc", "push", cwd=dest, env=env)
    sh("git", "add", ".dvc/config", "dvc.lock", cwd=dest, env=env)
    sh("git", "commit", "-q", "-m", "remote", cwd=dest, env=env)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(dest), str(clone), cwd=tmp_path, env=env)
    sh("dvc", "pull", cwd=clone, env=env)
    status = sh("dvc", "status", "--json", cwd=clone, env=env).stdout
    changed = {stage for stage in json.loads(status) if stage != "register"}
    assert not changed, status  # data, tune and the model are exactly what the lock names
    # the pulled model is the one the lock names: the champion `dvc repro` registered
    client = MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")
    champion = client.get_model_version_by_alias("reprolab-classifier", "champion")
    assert sha256_file(clone / "models/model.pt") == champion.tags["model.sha256"]

    # the clone has no MLflow store of its own: register says where the run is and what to set
    proc = subprocess.run(["reprolab", "register"], cwd=clone, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "no finished training run" in line and "set MLFLOW_TRACKING_URI" in line
