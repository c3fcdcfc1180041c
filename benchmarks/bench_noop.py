"""6. Pipeline no-op: `dvc repro` with nothing changed against `dvc --version` (what DVC costs
to start at all), and `reprolab --help` against `python -c "import torch, mlflow, optuna"`
(what the CLI would cost if it imported its libraries up front). Run in a copy of the
repository whose pipeline has run once with tiny params.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from harness import REPO, Row, alternate, quiet, report, row_from

TINY = {"tune": {"n_trials": 2, "epochs": 1}, "train": {"epochs": 2}}


def copy_of_repository(root: Path) -> Path:
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, root / rel)
    params = yaml.safe_load((root / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit",
                 "-qm", "bench"]):
        subprocess.run(cmd, cwd=root, check=True)
    return root


def main() -> list[Row]:
    quiet()
    root = copy_of_repository(Path(tempfile.mkdtemp(prefix="bench-noop-")))
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def command(*args: str):
        def side() -> float:
            started = time.perf_counter()
            subprocess.run(args, cwd=root, env=env, check=True, capture_output=True)
            return time.perf_counter() - started
        return side

    first = command(str(bin_dir / "dvc"), "repro")()  # the whole pipeline, tiny params
    dvc = alternate(command(str(bin_dir / "dvc"), "repro"),
                    command(str(bin_dir / "dvc"), "--version"), rounds=5)
    cli = alternate(command(str(bin_dir / "reprolab"), "--help"),
                    command(sys.executable, "-c", "import torch, mlflow, optuna"), rounds=5)
    rows = [
        row_from(dvc, name="dvc repro with nothing changed", a_label="dvc repro",
                 b_label="dvc --version", unit="s", ratio="A/B",
                 note=f"the first dvc repro (all six stages, tiny params) took {first:.0f} s"),
        row_from(cli, name="reprolab --help", a_label="reprolab --help",
                 b_label="import torch, mlflow, optuna", unit="s", ratio="B/A"),
    ]
    report("noop", rows, {"first_repro_s": first})
    return rows


if __name__ == "__main__":
    main()
