"""Shared fixtures: one MLflow store per test session, a tiny project per test.

A new MLflow sqlite store costs seconds of migrations, so every in-process test shares one;
stage functions run in-process on the real digits data with few epochs and trials.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from reprolab.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
# As `reprolab` does (cli.py): no MLflow telemetry from this process or the servers it starts
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two test processes on the machine's cores: one thread each (and in every
    # process they start), not two each spinning against the other's
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)

# The files that take longest, longest first (measured: `pytest --durations=0`, summed per
# file). `make test` runs each file whole on one worker and hands out files in collection order
# (--no-loadscope-reorder), so these start first and none is left running alone at the end.
# Only the order of the run depends on this list.
LONGEST_FIRST = ("test_e2e.py", "test_team.py", "test_distributed.py", "test_study.py",
                 "test_e2e_network.py", "test_adapt.py", "test_trust.py", "test_faults.py",
                 "test_memory.py", "test_tune.py", "test_resume.py", "test_serving.py",
                 "test_docs_examples.py", "test_stages.py", "test_team_auth.py",
                 "test_benchmarks.py", "test_gpu_check.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


# Small enough for 2 cores, big enough that the numbers mean something.
TINY = [
    "train.epochs=3",
    "train.use_tuned=false",
    "tune.n_trials=3",
    "tune.epochs=2",
]


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every in-process test logs to one session store, never to the repository's."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("DVC_ROOT", None)
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="session")
def forks(tmp_path_factory: pytest.TempPathFactory):
    """One warm process per test worker whose forks run commands (tests/forks.py)."""
    from forks import Forks

    server = Forks(tmp_path_factory.mktemp("forks"))
    yield server
    server.close()


@pytest.fixture(scope="session")
def processed_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fetch + preprocess of digits, done once; tests copy the result."""
    from reprolab.data import fetch, preprocess

    root = tmp_path_factory.mktemp("digits")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    cfg = load_config(root / "params.yaml")
    fetch.run(cfg)
    preprocess.run(cfg)
    return root


def digits_project(root: Path, processed_once: Path) -> Path:
    """A project of its own in `root` (made if missing): params.yaml, and the digits data that
    processed_once fetched and preprocessed for the session; -> root."""
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    for rel in ("data/raw", "data/processed"):
        shutil.copytree(processed_once / rel, root / rel)
    return root


def training_run_id(cfg: Config) -> str:
    """The run that trained cfg's models/model.pt, found as evaluate and register find it."""
    from reprolab import tracking
    from reprolab.files import sha256_file

    digest = sha256_file(cfg.model_file)
    return tracking.training_run_for(cfg.model_file, digest, cfg.tracking.experiment)["run_id"]


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Config]:
    """-> load(*overrides): a Config for a fresh project in tmp_path (params.yaml copied)."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")

    def load(*overrides: str) -> Config:
        return load_config(tmp_path / "params.yaml", [*TINY, *overrides])

    return load


@pytest.fixture
def project(make_config: Callable[..., Config], processed_once: Path) -> Callable[..., Config]:
    """Like make_config, with the digits raw and processed data already in place."""
    cfg = make_config()
    for rel in (cfg.paths.raw, cfg.paths.processed):
        shutil.copytree(processed_once / rel, cfg.base_dir / rel)
    return make_config


def cli_argv(command: str, root: Path, *overrides: str, quiet: bool = True) -> list[str]:
    """The arguments of `reprolab <command> -q --params <root>/params.yaml -S ...`, as every
    test runs a command: in this process (reprolab() below), in a fork (tests/forks.py) or in a
    process of its own."""
    argv = [command, *(["-q"] if quiet else []), "--params", str(Path(root) / "params.yaml")]
    for override in overrides:
        argv += ["-S", override]
    return argv


def reprolab(capsys: pytest.CaptureFixture[str], root: Path, command: str, *overrides: str,
             args: tuple[str, ...] = ()) -> tuple[int, str, list[str]]:
    """`reprolab <command> -q --params <root>/params.yaml -S ... ARGS` in this process ->
    (exit code, stdout, stderr lines). What was printed before the command is dropped first."""
    from reprolab import cli

    capsys.readouterr()
    code = cli.main([*cli_argv(command, root, *overrides), *args])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def one_error(lines: list[str], command: str) -> str:
    """The single stderr line of a refused command, without its `reprolab <command>: error: `
    prefix: one line, no traceback."""
    assert len(lines) == 1, lines
    prefix = f"reprolab {command}: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0].removeprefix(prefix)
