"""6. Pipeline no-op: `dvc repro` with nothing changed against `dvc --version` (what DVC costs
to start at all), and `reprolab --help` against `python -c "import torch, mlflow, optuna"`
(what the CLI would cost if it imported its libraries up front). Run in a copy of the
repository whose pipeline has run once with tiny params.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import QUICK, Row, alternate, git_copy, quiet, report, row_from, timed

TINY = {"tune": {"n_trials": 2, "epochs": 1}, "train": {"epochs": 2}}
ROUNDS = 1 if QUICK else 5


def main() -> list[Row]:
    quiet()
    root = git_copy(Path(tempfile.mkdtemp(prefix="bench-noop-")), TINY)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def command(*args: str):
        return timed(lambda: subprocess.run(args, cwd=root, env=env, check=True,
                                            capture_output=True))

    first = command(str(bin_dir / "dvc"), "repro")()  # the whole pipeline, tiny params
    dvc = alternate(command(str(bin_dir / "dvc"), "repro"),
                    command(str(bin_dir / "dvc"), "--version"), rounds=ROUNDS)
    cli = alternate(command(str(bin_dir / "reprolab"), "--help"),
                    command(sys.executable, "-c", "import torch, mlflow, optuna"),
                    rounds=ROUNDS)
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
