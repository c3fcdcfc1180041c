"""End to end: the real `dvc repro`, `dvc exp run`, `dvc queue` and `mlflow run` in copies of the
repo, called the way README.md writes them: `.venv/bin/dvc ...` from a shell where the venv is not
activated (its bin folder is not on PATH), with no PATH help from the tests.

These start real processes (each pays seconds of imports), so the module does the expensive
pipeline once and checks everything about it. Tests run in file order; those at the end change
the copy's git history or workspace.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from reprolab.config import load_config
from reprolab.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# The virtual environment these tests run in; a clone's `make setup` makes one as `.venv`.
VENV = Path(sys.prefix) if sys.prefix != sys.base_prefix else None
sys.path.insert(0, str(REPO / "benchmarks"))

from harness import git_copy  # noqa: E402  (benchmarks/harness.py: the same copy bench_noop uses)

pytestmark = pytest.mark.e2e

TINY = {"train": {"epochs": 3}, "tune": {"n_trials": 3, "epochs": 2}}
# An origin with credentials in it: MLflow's repoURL tag must not carry them.
ORIGIN = "https://ci:s3cret@git.example.com/team/reprolab.git"


def shell_env() -> dict[str, str]:
    """A shell in which the venv is not activated: PATH without its bin folder, and none of
    MLflow's or DVC's variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "DVC_")) and k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not p or Path(p).resolve() != BIN.resolve())
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return env


def project_copy(root: Path) -> Path:
    """A clone of this repository after `make setup`: its files, tiny params, and `.venv`."""
    dest = git_copy(root, TINY)
    if VENV:
        (dest / ".venv").symlink_to(VENV)
    return dest


def tool(name: str) -> str:
    """`.venv/bin/<name>`, as the README writes it (relative to the copy it runs in)."""
    return f".venv/bin/{name}" if VENV else name


def sh(*cmd: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=env or shell_env(), capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def store(dest: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{dest / 'mlflow.db'}")


def model_name(dest: Path) -> str:
    return load_config(dest / "params.yaml").registered_model_name


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = project_copy(tmp_path_factory.mktemp("clone"))
    sh("git", "remote", "add", "origin", ORIGIN, cwd=dest)
    return dest


@pytest.fixture(scope="module")
def repro(repo):
    first = sh(tool("dvc"), "repro", cwd=repo)
    second = sh(tool("dvc"), "repro", cwd=repo)
    return repo, first, second


def test_dvc_repro_runs_every_stage_and_writes_every_output(repro):
    dest, first, _ = repro
    for stage in ("fetch", "preprocess", "tune", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in first.stdout
    # no terminal here: tune logs one line per finished trial instead of a progress bar
    trials = re.findall(r"tune: trial (\d) (COMPLETE|PRUNED)  val/accuracy .* optimizer=",
                        first.stdout + first.stderr)
    assert sorted(number for number, _ in trials) == ["0", "1", "2"], first.stderr[-3000:]
    for rel in (
        "data/raw/digits/manifest.json", "data/processed/meta.json", "data/processed/train.x.npy",
        "reports/tune/best_params.yaml", "reports/tune/summary.json", "reports/tune/study.json",
        "models/model.pt", "models/config.yaml", "reports/train/history.csv",
        "reports/evaluate/metrics.json", "reports/evaluate/predictions.csv",
        "reports/evaluate/confusion_matrix.png", "reports/register/decision.json", "dvc.lock",
    ):
        assert (dest / rel).is_file(), rel
    # the stores sit at the repository root, outside every DVC output
    assert (dest / "mlflow.db").is_file()
    assert (dest / "optuna.journal").is_file()


def test_mlflow_run_in_a_clean_copy_writes_what_dvc_repro_wrote(repro, tmp_path_factory):
    """`mlflow run . -e main --env-manager local` (MLproject) in a second clean copy with stores
    of its own: each stage starts runs of its own under the project's run, and every output is
    what the first copy's `dvc repro` wrote: DVC, given the first copy's dvc.lock, finds nothing
    changed (two clean runs, two launchers, the same bytes; register's decision is not
    cached)."""
    dest, _, _ = repro
    other = project_copy(tmp_path_factory.mktemp("mlflow"))
    sh(tool("mlflow"), "run", ".", "-e", "main", "--env-manager", "local", cwd=other)
    # the first copy's lock and cache: an output that differs from the lock is "modified"
    shutil.copy(dest / "dvc.lock", other / "dvc.lock")
    sh(tool("dvc"), "cache", "dir", "--local", str(dest / ".dvc" / "cache"), cwd=other)
    status = json.loads(sh(tool("dvc"), "status", "--json", cwd=other).stdout or "{}")
    status.pop("register", None)  # its decision is not cached
    assert status == {"fetch": ["always changed"]}, status  # a source DVC cannot see

    client = store(other)  # MLflow's default store, sqlite:///mlflow.db in the project
    (project,) = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    "tags.`mlflow.project.entryPoint` = 'main'")
    experiment = client.get_experiment(project.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    def children(run_id: str) -> list:
        return client.search_runs([experiment.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")

    stages = children(project.info.run_id)
    (tune_run,) = [r for r in stages if "optuna.study" in r.data.tags]
    (train_run,) = [r for r in stages if "model.sha256" in r.data.tags]
    assert len(stages) == 2
    trials = children(tune_run.info.run_id)
    assert len(trials) == TINY["tune"]["n_trials"]
    # train took the tuned lr into a run of its own (no clash with the params of another stage)
    best = yaml.safe_load((other / "reports/tune/best_params.yaml").read_text())
    assert float(train_run.data.params["train.lr"]) == pytest.approx(best["lr"])
    assert train_run.data.params["train.hparams_source"] == "tune"
    assert "test/accuracy" in train_run.data.metrics  # evaluate logged onto train's run
    champion = client.get_model_version_by_alias(model_name(other), "champion")
    assert champion.run_id == train_run.info.run_id
    head = sh("git", "rev-parse", "HEAD", cwd=other).stdout.strip()
    for run in [project, *stages, *trials]:
        assert run.info.status == "FINISHED", run.info.run_name
        assert run.data.tags["mlflow.source.git.commit"] == head, run.info.run_name


def test_second_repro_snapshots_the_data_and_runs_nothing_else(repro):
    """fetch is always changed (its source may change where DVC cannot see it); the same
    snapshot hashes the same, so no stage after it runs."""
    _, _, second = repro
    ran = re.findall(r"Running stage '(\w+)'", second.stdout)
    assert ran == ["fetch"], second.stdout
    for stage in ("preprocess", "tune", "train", "evaluate", "register"):
        assert f"Stage '{stage}' didn't change, skipping" in second.stdout


def test_mlflow_holds_runs_study_and_registry(repro):
    dest, _, _ = repro
    client = store(dest)
    exp = client.get_experiment_by_name("reprolab")
    assert exp.artifact_location == (dest / "mlartifacts").as_uri()
    # the UI opens the experiment on its (training) runs, not on GenAI traces
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    name = model_name(dest)
    champion = client.get_model_version_by_alias(name, "champion")
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

    assert str(champion.version) == "1"
    assert champion.tags["training_run_id"] == run_id
    # DVC rewrote dvc.lock between the stages: that does not make a pristine clone dirty
    assert champion.tags["git.dirty"] == "false"
    head = sh("git", "rev-parse", "HEAD", cwd=dest).stdout.strip()
    assert champion.tags["git.commit"] == head
    assert run.data.tags["dvc.lock_sha256"] and "dvc.lock" in {
        a.path for a in client.list_artifacts(run_id)}
    # MLflow's own source tags on every run DVC started: tune's, its trials', train's
    for each in [run, parents[0], *children]:
        tags = each.data.tags
        assert tags["mlflow.source.git.commit"] == head, each.info.run_name
        assert tags["mlflow.source.git.branch"] == "master", each.info.run_name
        assert tags["mlflow.source.git.repoURL"] == "https://git.example.com/team/reprolab.git"


def test_the_runs_table_compares_trials_tune_and_train_under_one_key_per_knob(repro):
    """What the MLflow UI's runs table reads: the searched knobs under the train run's keys in
    every run (a trial's train.epochs is what it ran), the tune parent's values the best
    trial's, and a note on each run saying what it did and how to run it again."""
    dest, _, _ = repro
    client = store(dest)
    exp = client.get_experiment_by_name("reprolab")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`optuna.study` != ''")
    trials = client.search_runs([exp.experiment_id],
                                f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    train_run = client.get_run(client.get_model_version_by_alias(model_name(dest),
                                                                 "champion").run_id)
    tune_epochs = yaml.safe_load((dest / "params.yaml").read_text())["tune"]["epochs"]
    knobs = ("train.lr", "train.optimizer")
    for run in (parent, *trials, train_run):
        params = run.data.params
        assert set(knobs) <= params.keys() and not {"lr", "optimizer", "epochs"} & params.keys()
        assert not any(k.startswith("best.") for k in params), run.info.run_name
        assert run.data.tags["mlflow.note.content"].startswith("**"), run.info.run_name
    best = json.loads((dest / "reports/tune/study.json").read_text())["best_trial"]
    (winner,) = [t for t in trials if t.data.tags["optuna.trial"] == str(best)]
    for key in (*knobs, "train.epochs"):
        assert parent.data.params[key] == winner.data.params[key], key
    assert {t.data.params["train.epochs"] for t in trials} == {str(tune_epochs)}
    # train.use_tuned: the train run trained at the chosen point
    assert train_run.data.params["train.optimizer"] == winner.data.params["train.optimizer"]
    assert float(train_run.data.params["train.lr"]) == float(winner.data.params["train.lr"])
    assert f"Result: trial {best} is best" in parent.data.tags["mlflow.note.content"]
    note = train_run.data.tags["mlflow.note.content"]
    assert "Result: val/accuracy" in note and "dvc repro train" in note
    assert "model.kept_epoch" in note and "model.kept_epoch" in train_run.data.tags
    assert "-S train.lr=" in winner.data.tags["mlflow.note.content"]


def test_datasets_and_test_metrics_are_linked_to_the_logged_model(repro):
    dest, _, _ = repro
    client = store(dest)
    meta = json.loads((dest / "data/processed/meta.json").read_text())
    champion = client.get_model_version_by_alias(model_name(dest), "champion")
    run = client.get_run(champion.run_id)
    inputs = {(d.dataset.name, d.dataset.digest): {t.key: t.value for t in d.tags}
              for d in run.inputs.dataset_inputs}
    assert inputs == {
        (f"digits-{split}", meta["split_sha256"][split][:16]): {"mlflow.data.context": context}
        for split, context in (("train", "training"), ("val", "validation"),
                               ("test", "evaluation"))
    }
    # the model's page lists the test metrics, measured on the test dataset
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    metrics = {m.key: m for m in model.metrics}
    expected = json.loads((dest / "reports/evaluate/metrics.json").read_text())
    for key, value in expected.items():
        assert metrics[f"test/{key}"].value == pytest.approx(value)
        assert metrics[f"test/{key}"].dataset_name == "digits-test"


def test_metrics_and_plots_as_dvc_shows_them(repro):
    dest, _, _ = repro
    (shown,) = json.loads(sh(tool("dvc"), "metrics", "show", "--json", cwd=dest).stdout).values()
    files = shown["data"]
    assert set(files) == {"reports/tune/summary.json", "reports/evaluate/metrics.json"}
    for path, content in files.items():
        values = content["data"]
        assert values and all(isinstance(v, int | float) for v in values.values()), (path, values)

    plots = json.loads(sh(tool("dvc"), "plots", "show", "--json", cwd=dest).stdout)["data"]
    assert set(plots) == {
        "Loss", "Accuracy", "Confusion matrix (test split)", "reports/evaluate/learning_curve.png",
        "reports/evaluate/confusion_matrix.png", "reports/evaluate/misclassified.png",
    }
    # train and val on one plot each: several y columns of history.csv
    for title, fields in (("Loss", ["train/loss", "val/loss"]),
                          ("Accuracy", ["train/accuracy", "val/accuracy"])):
        (plot,) = plots[title]
        assert plot["type"] == "vega"
        assert plot["content"]["encoding"]["strokeDash"]["scale"]["domain"] == fields
        assert len(plot["content"]["data"]["values"]) == 3 * len(fields)  # 3 epochs each
    (confusion,) = plots["Confusion matrix (test split)"]
    assert len(confusion["content"]["data"]["values"]) == \
        len((dest / "reports/evaluate/predictions.csv").read_text().splitlines()) - 1
    for png in ("learning_curve", "confusion_matrix", "misclassified"):
        (image,) = [p for key, v in plots.items() if key.endswith(f"{png}.png") for p in v]
        assert image["type"] == "image" and Path(image["url"]).is_file()
        # `dvc plots show` writes into dvc_plots/, which git ignores
        rel = Path(image["url"]).relative_to(dest)
        assert rel.parts[0] == "dvc_plots"
        sh("git", "check-ignore", "-q", str(rel), cwd=dest)


def test_queued_experiment_as_the_readme_writes_it(repro, tmp_path):
    """`dvc exp run --queue`, then `dvc queue start` with .venv/bin put on PATH for that one
    command: DVC starts its queue worker as `dvc` from PATH. A queued experiment runs in a copy
    under .dvc/tmp/, as `--temp` does (DVC's temp-dir executor for both), and writes into the
    project's MLflow store."""
    dest, _, _ = repro
    # one epoch at a tenth of the default lr: clearly worse than the champion
    sh(tool("dvc"), "exp", "run", "--queue", "-S", "train.epochs=1", "-S", "train.use_tuned=false",
       "-S", "train.lr=0.0001", cwd=dest)
    with open(tmp_path / "queue-start.log", "w") as log:  # the worker outlives the command
        subprocess.run(["bash", "-c", 'PATH="$PWD/.venv/bin:$PATH" dvc queue start'], cwd=dest,
                       env=shell_env(), stdout=log, stderr=subprocess.STDOUT, check=True)
    # DVC keeps each finished experiment as a git ref, refs/exps/<..>/<commit>/<name> (its queue
    # keeps refs of its own, under celery/ and stash): `git for-each-ref` costs milliseconds,
    # `dvc queue status` a second of CPU, so the queue is asked once an experiment has finished,
    # or every tenth look
    def finished() -> set[str]:
        names = sh("git", "for-each-ref", "--format=%(refname)", "refs/exps/", cwd=dest).stdout
        return {ref for ref in names.split() if len(ref.split("/")) == 5
                and not ref.startswith("refs/exps/celery/")}

    before, status = finished(), ""
    deadline = time.monotonic() + 240
    for look in itertools.count():
        if finished() != before or look % 10 == 9:
            status = sh(tool("dvc"), "queue", "status", cwd=dest).stdout
            if not any(word in status for word in ("Queued", "Running")):
                break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert "Success" in status, status + (tmp_path / "queue-start.log").read_text()

    client = store(dest)
    exp = client.get_experiment_by_name("reprolab")
    runs = client.search_runs([exp.experiment_id], "params.`train.lr` = '0.0001'")
    assert len(runs) == 1  # the training run only: tune was restored from the cache, not rerun
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags["dvc.exp_name"]
    assert run.data.params["train.hparams_source"] == "params"
    # -S edited params.yaml, which the resolved config records: the tree is not dirty
    assert run.data.tags["git.dirty"] == "false"
    assert "test/f1_macro" in run.data.metrics  # evaluate ran there too
    assert not list((dest / ".dvc" / "tmp").rglob("mlflow.db"))
    shown = sh(tool("dvc"), "exp", "show", "--json", cwd=dest).stdout
    assert run.data.tags["dvc.exp_name"] in shown
    # registered as challenger, champion unchanged
    name = model_name(dest)
    by_run = {v.run_id: v for v in client.search_model_versions(f"name = '{name}'")}
    version = by_run[run.info.run_id].version
    assert client.get_model_version(name, version).aliases == ["challenger"]
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"


def test_predict_names_the_right_digits(repro, tmp_path):
    from PIL import Image

    from reprolab.data import load_split
    from reprolab.models import load_checkpoint

    dest, _, _ = repro
    test = load_split(dest / "data/processed", "test")
    paths = []
    for i in range(10):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(test.x[i, 0].numpy(), "L").save(paths[-1])
    out = sh(tool("reprolab"), "predict", "-q", "--model",
             f"models:/{model_name(dest)}@champion", *map(str, paths),
             cwd=dest).stdout.splitlines()
    labels = [line.split()[1] for line in out[1:]]
    model, _ = load_checkpoint(dest / "models/model.pt")  # the champion, read independently
    expected = [str(int(i)) for i in model(test.x[:10].float()).argmax(1)]
    assert labels == expected
    truth = [str(int(y)) for y in test.y[:10]]
    # a 3-epoch model from the tiny test params; `make run`'s model gets about 99%
    assert sum(a == b for a, b in zip(labels, truth, strict=True)) >= 7, (labels, truth)


def test_verify_rebuilds_the_champion_identically(repro):
    dest, _, _ = repro
    env = {**shell_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}"}
    status = ("git", "status", "--porcelain", "--untracked-files=no")
    # the pipeline run on tiny params changed the committed metrics: compare against that
    before = sh(*status, cwd=dest).stdout
    out = sh(tool("reprolab"), "verify", f"models:/{model_name(dest)}@champion", cwd=dest,
             env=env).stdout
    assert "identical" in out, out
    # the rebuild left no worktree, no run in the store and no change in the clone behind
    worktrees = sh("git", "worktree", "list", cwd=dest).stdout.splitlines()
    assert len(worktrees) == 1
    assert sh(*status, cwd=dest).stdout == before


# ---- these change the copy's git history or workspace: last ----


def test_a_fresh_clone_has_a_baseline_and_a_remote_brings_the_rest(repro, tmp_path):
    """Commit what `dvc repro` changed (dvc.lock and the `cache: false` metrics and plot data,
    as DVC's get-started example does): a fresh clone shows metrics and experiments against it
    before any `dvc pull`; `dvc pull` then brings data and model from the remote."""
    dest, _, _ = repro
    remote = tmp_path / "remote"
    sh(tool("dvc"), "remote", "add", "-d", "shared", str(remote), cwd=dest)
    sh(tool("dvc"), "push", cwd=dest)
    committed = {"reports/tune/summary.json", "reports/evaluate/metrics.json",
                 "reports/train/history.csv", "reports/evaluate/predictions.csv"}
    sh("git", "add", ".dvc/config", "dvc.lock", *committed, cwd=dest)
    sh("git", "commit", "-q", "-m", "results", cwd=dest)
    # git ignores every other output: nothing else is left to commit
    assert not sh("git", "status", "--porcelain", cwd=dest).stdout.strip()
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(dest), str(clone), cwd=tmp_path)
    if VENV:
        (clone / ".venv").symlink_to(VENV)

    baseline = json.loads((dest / "reports/evaluate/metrics.json").read_text())
    diff = json.loads(sh(tool("dvc"), "metrics", "diff", "--all", "--json", cwd=clone).stdout)
    assert diff["reports/evaluate/metrics.json"]["accuracy"]["old"] == baseline["accuracy"]
    shown = json.loads(sh(tool("dvc"), "exp", "show", "--json", cwd=clone).stdout)
    (head,) = [row for row in shown if row["rev"] != "workspace"]
    assert head["data"]["metrics"]["reports/evaluate/metrics.json"]["data"] == baseline

    sh(tool("dvc"), "pull", cwd=clone)
    status = sh(tool("dvc"), "status", "--json", cwd=clone).stdout
    # data, tune and the model are exactly what the lock names (fetch is always changed: it
    # snapshots a source that DVC cannot see, and nothing after it runs when it is the same)
    changed = {stage for stage in json.loads(status) if stage not in ("fetch", "register")}
    assert not changed, status
    # the pulled model is the one the lock names: the champion `dvc repro` registered
    name = model_name(dest)
    champion = store(dest).get_model_version_by_alias(name, "champion")
    assert sha256_file(clone / "models/model.pt") == champion.tags["model.sha256"]

    # the clone has no MLflow store of its own: register says where the run is and what to set
    proc = subprocess.run([tool("reprolab"), "register"], cwd=clone, env=shell_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert "no finished training run" in line and "set MLFLOW_TRACKING_URI" in line
