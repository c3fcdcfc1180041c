"""5. Stage start-up: the default pipeline (`make run` after set-up: `dvc repro` with the default
params, digits) in a fresh copy of the repository, and once more in another (the A-versus-A
control), every stage's wall time split into the interpreter's start, imports, opening MLflow's
store, the stage's work and the process's exit (benchmarks/stage_timer.py, put on PATH as
`reprolab` for those runs); then `reprolab evaluate` and `reprolab register` against
`python -c "import torch, mlflow"` (what any process that uses both libraries pays). Target:
evaluate and register each <= 1.5x that.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from harness import QUICK, Row, alternate, git_copy, quiet, report, row_from, scratch, timed

HERE = Path(__file__).resolve().parent
STAGES = ("fetch", "preprocess", "tune", "train", "evaluate", "register")
TINY = {"tune": {"n_trials": 2, "epochs": 1}, "train": {"epochs": 2}}
TARGET = "<= 1.5"
ROUNDS = 1 if QUICK else 3


def timer_on_path(bin_dir: Path, log: Path) -> None:
    """A `reprolab` first on PATH that runs the stage through stage_timer.py and appends the
    process's wall time, as the caller sees it, to `log`."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "reprolab"
    shim.write_text(
        "#!/bin/bash\n"
        "started=$(date +%s%N)\n"
        f"STAGE_TIMER_LOG={shlex.quote(str(log))} {shlex.quote(sys.executable)} "
        f"{shlex.quote(str(HERE / 'stage_timer.py'))} \"$@\"\n"
        "code=$?\n"
        f"echo \"{{\\\"wall\\\": $(( $(date +%s%N) - started ))e-9}}\" >> {shlex.quote(str(log))}\n"
        "exit $code\n"
    )
    shim.chmod(0o755)


def stage_splits(log: Path) -> dict[str, dict[str, float]]:
    """stage_timer's line and the shim's wall line, in pairs -> {stage: split}."""
    splits, current = {}, None
    for line in log.read_text().splitlines():
        entry = json.loads(line)
        if "stage" in entry:
            current = entry
        elif current is not None:
            split = {k: current[k] for k in ("imports", "store", "work")}
            split["start"] = current["interpreter"] or 0.0
            split["wall"] = entry["wall"]
            split["exit"] = max(0.0, entry["wall"] - current["total"] - split["start"])
            splits[current["stage"]] = split
            current = None
    return splits


def describe(split: dict[str, float]) -> str:
    return (f"{split['wall']:.1f} s = start {split['start']:.2f} + imports {split['imports']:.2f}"
            f" + store {split['store']:.2f} + work {split['work']:.2f} + exit {split['exit']:.2f}")


def environment(extra_path: Path | None = None) -> dict[str, str]:
    bin_dir = Path(sys.executable).parent
    path = os.pathsep.join(str(p) for p in (extra_path, bin_dir) if p)
    env = {**os.environ, "PATH": f"{path}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy's own mlflow.db, as after a clone
    env.pop("DVC_ROOT", None)
    return env


def pipeline_run(root: Path) -> tuple[float, dict[str, dict[str, float]]]:
    """`dvc repro` of the whole pipeline with every stage timed; -> (wall, splits)."""
    log = root.parent / f"{root.name}-stages.jsonl"
    timer_on_path(root.parent / f"{root.name}-bin", log)
    env = environment(root.parent / f"{root.name}-bin")
    started = time.perf_counter()
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=root, env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode:
        sys.exit(f"bench_startup: dvc repro failed in {root}:\n{proc.stdout[-3000:]}"
                 f"{proc.stderr[-3000:]}")
    return wall, stage_splits(log)


def stage_rows(root: Path, splits: dict[str, dict[str, float]]) -> list[Row]:
    env = environment()

    def command(*args: str):
        return timed(lambda: subprocess.run(args, cwd=root, env=env, check=True,
                                            capture_output=True))

    baseline = command(sys.executable, "-c", "import torch, mlflow")
    rows = []
    for stage in ("evaluate", "register"):
        samples = alternate(command(str(Path(sys.executable).parent / "reprolab"), stage, "-q"),
                            baseline, rounds=ROUNDS, warmup=0 if QUICK else 1)
        row = row_from(samples, name=f"reprolab {stage}, start to exit (digits)",
                       a_label=f"reprolab {stage}", b_label="import torch, mlflow", unit="s",
                       ratio="A/B", target=TARGET)
        rounds = [a / b for a, b in zip(samples["A"], samples["B"], strict=True)]
        row.note = (f"slowest round {max(rounds):.2f}x; in the pipeline run: "
                    f"{describe(splits[stage])}. What limits it: {LIMITS[stage]}")
        rows.append(row)
    return rows


LIMITS = {
    "evaluate": "the imports (torch and mlflow as in the baseline, plus MLflow's SQL store, "
                "scikit-learn for the metrics, matplotlib for the two figures), made without "
                "the garbage collector's passes over them (cli.py; the baseline pays those, "
                "about a quarter of its time); the work is predicting 360 images, the metrics, "
                "two PNGs and logging them to the run",
    "register": "the imports of mlflow and MLflow's SQL store (register needs no torch), made "
                "without the garbage collector's passes; the work is a few registry calls",
}


def main() -> list[Row]:
    quiet()
    params = TINY if QUICK else {}
    root = git_copy(scratch("bench-startup-") / "repo", params)
    wall, splits = pipeline_run(root)
    # the A-versus-A control: the same pipeline again, in a second fresh copy
    again, _ = pipeline_run(git_copy(scratch("bench-startup-") / "repo", params))
    work = sum(s["work"] for s in splits.values())
    overhead = {k: sum(s[k] for s in splits.values()) for k in ("start", "imports", "store",
                                                                "exit")}
    dvc_own = wall - sum(s["wall"] for s in splits.values())
    make_run = Row(
        name=f"make run after set-up (dvc repro, {'tiny' if QUICK else 'default'} params, "
             "digits)", a_label="dvc repro",
        b_label="the stages' work", a=wall, b=work, unit="s", ratio=wall / work,
        ratio_label="A/B", control=again / wall, target="", met=None, rounds=1,
        samples={"A": [wall], "B": [work], "A'": [again]},
        note=("; ".join(f"{stage} {describe(splits[stage])}" for stage in STAGES if stage in
                        splits)
              + f"; DVC itself {dvc_own:.1f} s; all stages: imports {overhead['imports']:.1f} s, "
              f"store {overhead['store']:.1f} s, exit {overhead['exit']:.1f} s. What limits it: "
              "tune's and train's work (training) and each stage's imports; the store's "
              "one-time set-up (tables and migrations of a new mlflow.db) falls on tune"),
    )
    rows = [make_run, *stage_rows(root, splits)]
    report("startup", rows, {"splits": splits, "dvc_repro_s": wall, "dvc_own_s": dvc_own})
    return rows


if __name__ == "__main__":
    main()
