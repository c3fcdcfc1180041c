"""The repository's declarations agree with each other: pins, stages, entry points."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from reprolab.cli import STAGES
from reprolab.config import Config

REPO = Path(__file__).resolve().parents[1]
# `.venv/bin/dvc` and `.venv/bin/mlflow` do not put .venv/bin on PATH: the commands fall back to it
DVC_CMD = 'PATH="$PATH:$DVC_ROOT/.venv/bin" reprolab {stage}'
MLPROJECT_CMD = "reprolab {stage} --params {{params}} --overrides {{overrides}}"


def _pins() -> set[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = set(pyproject["project"]["dependencies"])
    assert all("==" in pin for pin in pins)
    return pins


def test_conda_pins_match_pyproject():
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert {p for p in pip_section if not p.startswith("-e")} == _pins()
    assert "python=3.11" in conda["dependencies"]


def test_python_env_for_mlflow_run_matches_pyproject():
    mlproject = yaml.safe_load((REPO / "MLproject").read_text())
    assert mlproject["python_env"] == "python_env.yaml"  # `mlflow run` needs no conda
    env = yaml.safe_load((REPO / "python_env.yaml").read_text())
    assert env["python"] == "3.11"
    assert set(env["dependencies"]) == {*_pins(), "-e ."}


def test_stage_names_agree_across_dvc_cli_mlproject_and_params():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == list(STAGES)
    for stage, spec in dvc["stages"].items():
        assert spec["cmd"] == DVC_CMD.format(stage=stage)
        # its params section; fetch and preprocess share `data`
        assert {"fetch": "data", "preprocess": "data"}.get(stage, stage) in Config.model_fields
    mlproject = yaml.safe_load((REPO / "MLproject").read_text())
    entry_points = mlproject["entry_points"]
    assert set(entry_points) == {*STAGES, "main"}
    for stage in STAGES:
        assert entry_points[stage]["command"] == \
            'PATH="$PATH:$PWD/.venv/bin" ' + MLPROJECT_CMD.format(stage=stage)
    # main: every stage, in the pipeline's order
    steps = entry_points["main"]["command"].split(" && ")
    assert steps == ['export PATH="$PATH:$PWD/.venv/bin"',
                     *(MLPROJECT_CMD.format(stage=stage) for stage in STAGES)]
