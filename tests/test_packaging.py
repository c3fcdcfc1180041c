"""The repository's declarations agree with each other: pins, stages, entry points."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml

from reprolab.cli import STAGES
from reprolab.config import Config

REPO = Path(__file__).resolve().parents[1]


def test_conda_pins_match_pyproject():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = set(pyproject["project"]["dependencies"])
    assert all("==" in pin for pin in pins)
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert {p for p in pip_section if not p.startswith("-e")} == pins
    assert "python=3.11" in conda["dependencies"]


def test_stage_names_agree_across_dvc_cli_mlproject_and_params():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    assert list(dvc["stages"]) == list(STAGES)
    for stage, spec in dvc["stages"].items():
        assert spec["cmd"] == f"reprolab {stage}"
        # its params section; fetch and preprocess share `data`
        assert {"fetch": "data", "preprocess": "data"}.get(stage, stage) in Config.model_fields
    mlproject = yaml.safe_load((REPO / "MLproject").read_text())
    assert set(mlproject["entry_points"]) == {*STAGES, "main"}
    for stage in STAGES:
        assert mlproject["entry_points"][stage]["command"].startswith(f"reprolab {stage} ")
