"""Data bigger than memory. Three measurements:

1. Peak private memory (anonymous resident pages of the stage's process and its children, each
   page counted once, sampled every 20 ms from /proc: benchmarks/memory.py) of `reprolab
   preprocess`, `tune`, `train` and `evaluate` on 1, 2 and 4 GB of processed splits
   (benchmarks/synthetic.py: 64x64 RGB images, made on the fly and removed after), with the
   memory budget below the data (`train.memory_budget_mb: 64`), so that every split is read
   from its mapped files. Target: flat, the largest size's peak within
   1.25x of the smallest's, for every stage.
2. Training throughput of the mapped path against the in-memory path on the same data (the
   MNIST-shaped workload, params.yaml's model, one epoch per round, loading the splits included,
   in alternating rounds). Target: >= 0.9x.
3. `dvc repro` of the whole pipeline in a memory cgroup whose limit is half the processed splits
   (these machines run as root; skipped where no cgroup can be made), with the automatic budget.
   Target: it runs to the end (exit 0) with the tree's peak private memory under the limit.

    python benchmarks/bench_memory.py
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from harness import (
    QUICK,
    REPO,
    Row,
    alternate,
    check,
    git_copy,
    pipeline_project,
    quiet,
    report,
    row_from,
    scratch,
)
from memory import run_peak

HERE = Path(__file__).resolve().parent
SIZE = 64  # pixels: 12,288 bytes an image
IMAGE_BYTES = 3 * SIZE * SIZE
SIZES_GB = (0.02, 0.04, 0.08) if QUICK else (1, 2, 4)
LIMIT_MB = 700 if QUICK else 1536  # the cgroup's memory limit; the splits are twice this
STAGES = ("preprocess", "tune", "train", "evaluate")
FLAT, THROUGHPUT, UNDER = "<= 1.25", ">= 0.9", "< 1"
MiB = 2**20
# every stage small beside the data: one trial, one epoch, a tiny network on 16x16 inputs
PARAMS = {
    "model": {"name": "fast_cnn", "kwargs": {"width": 8}, "input_size": 16},
    "train": {"use_tuned": False, "epochs": 1, "batch_size": 256, "device": "cpu"},
    "tune": {"n_trials": 1, "epochs": 1, "pruner": "none"},
}


def synthetic_project(root: Path, gigabytes: float, more: dict[str, dict[str, Any]]) -> int:
    """params.yaml of a project whose data is the synthetic source at `gigabytes` of splits;
    -> the number of images."""
    images = int(gigabytes * 2**30 / IMAGE_BYTES)
    (root / "sources").mkdir(parents=True, exist_ok=True)
    (root / "sources" / "__init__.py").touch()
    shutil.copy(HERE / "synthetic.py", root / "sources" / "synthetic.py")
    path = root / "params.yaml"
    if not path.exists():
        shutil.copy(REPO / "params.yaml", path)
    values = yaml.safe_load(path.read_text())
    values["data"].update(dataset="sources.synthetic:Synthetic",
                          kwargs={"images": images, "size": SIZE})
    for section in {**PARAMS, **more}:
        values[section].update({**PARAMS.get(section, {}), **more.get(section, {})})
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return images


def stage_peaks(gigabytes: float) -> dict[str, int]:
    """Each stage's peak RssAnon (bytes), the stages run one after the other as DVC runs them."""
    root = scratch(f"bench-memory-{gigabytes}g-")
    synthetic_project(root, gigabytes, {"train": {"memory_budget_mb": 64}})
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    peaks = {}
    for stage in ("fetch", *STAGES):
        peak, proc = run_peak([sys.executable, "-m", "reprolab", stage, "-q"], cwd=root, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{stage} at {gigabytes} GB failed:\n{proc.stderr[-3000:]}")
        peaks[stage] = peak
    shutil.rmtree(root, ignore_errors=True)
    return peaks


def flat_rows() -> list[Row]:
    peaks = {gb: stage_peaks(gb) for gb in SIZES_GB}
    small, large = SIZES_GB[0], SIZES_GB[-1]
    rows = []
    for stage in STAGES:
        each = ", ".join(f"{gb} GB: {peaks[gb][stage] / MiB:.0f} MiB" for gb in SIZES_GB)
        a, b = peaks[large][stage] / MiB, peaks[small][stage] / MiB
        rows.append(Row(
            name=f"peak private memory (anonymous, its process tree) of `reprolab {stage}`, "
                 f"{large} GB of splits vs {small} GB",
            a_label=f"{large} GB", b_label=f"{small} GB", a=a, b=b,
            unit="MiB", ratio=a / b, ratio_label="A/B", control=None, target=FLAT,
            met=check(a / b, FLAT), rounds=1,
            note=f"{each} (64x64 RGB images; budget 64 MiB: every split mapped)"))
    return rows


def throughput_row() -> Row:
    import workloads

    from reprolab import recipe
    from reprolab.data import load_training_data
    from reprolab.device import seed_everything, select_device
    from reprolab.engine import fit
    from reprolab.models import build

    shape = workloads.SHAPES["mnist"].scaled(0.05 if QUICK else 1.0)
    config = pipeline_project(scratch("bench-memory-throughput-"), "train.use_tuned=false",
                              "train.device=cpu", "train.epochs=1", workload=shape)
    cfg = config()
    meta, *_ = load_training_data(cfg.processed_dir, "cpu", 0)
    spec = recipe.model_recipe(cfg, meta).spec
    hyper = recipe.hyper_for(cfg, 1, select_device("cpu"), meta["shape"], build(spec))

    def side(budget_mb: float):
        def run() -> float:
            started = time.perf_counter()
            _, train, val = load_training_data(cfg.processed_dir, "cpu", budget_mb)
            seed_everything(cfg.seed)
            fit(build(spec), train, val, hyper)
            return len(train) / (time.perf_counter() - started)
        return run

    samples = alternate(side(0), side(None), rounds=1 if QUICK else 3, warmup=0 if QUICK else 1)
    row = row_from(samples, name=f"training throughput, mapped splits vs held whole in memory "
                   f"(MNIST-shaped, {cfg.model.name}, one epoch with the loading)",
                   a_label="mapped", b_label="in memory", unit="img/s", ratio="A/B",
                   target=THROUGHPUT)
    row.note = ("the same bits either way; mapped batches are gathered from the page cache "
                "(warm after the first epoch of a process: the files were just written or read)")
    return row


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[tuple[Path, str] | None]:
    """A fresh memory cgroup limited to `limit` bytes -> (its folder, the limit file), or None
    where none can be made (not root, no memory controller). Removed afterwards."""
    v1 = Path("/sys/fs/cgroup/memory")
    base, limit_file = (v1, "memory.limit_in_bytes") if v1.is_dir() else \
        (Path("/sys/fs/cgroup"), "memory.max")
    folder = base / f"reprolab-bench-{os.getpid()}"
    try:
        folder.mkdir()
        (folder / limit_file).write_text(str(limit))
    except OSError:
        yield None
        return
    try:
        yield folder, limit_file
    finally:
        with contextlib.suppress(OSError):
            folder.rmdir()


def cgroup_row() -> Row:
    limit = LIMIT_MB * MiB
    splits_gb = 2 * limit / 2**30
    name = (f"`dvc repro` in a memory cgroup of {LIMIT_MB} MiB, splits of "
            f"{2 * LIMIT_MB} MiB (twice the limit)")
    with memory_cgroup(limit) as group:
        if group is None:
            return Row(name=name, a_label="peak private", b_label="limit", a=0, b=LIMIT_MB,
                       unit="MiB", ratio=0, ratio_label="A/B", control=None, target=UNDER,
                       met=None, rounds=0, note="skipped: no memory cgroup can be made here")
        folder, _ = group
        root = git_copy(scratch("bench-memory-cgroup-"), {})
        synthetic_project(root, splits_gb, {"train": {"memory_budget_mb": None}})
        for cmd in (["add", "-A"], ["-c", "user.name=b", "-c", "user.email=b@localhost",
                                    "commit", "-q", "-m", "synthetic"]):
            subprocess.run(["git", *cmd], cwd=root, check=True, capture_output=True)
        bin_dir = Path(sys.executable).parent  # dvc.yaml's commands: reprolab on the PATH
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
               "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
        dvc = str(bin_dir / "dvc")
        script = f'echo $$ > {folder / "cgroup.procs"} && exec "$@"'
        started = time.perf_counter()
        peak, proc = run_peak(["sh", "-c", script, "sh", dvc, "repro", "-q"], cwd=root, env=env)
        seconds = time.perf_counter() - started
        oom = _oom_kills(folder)
    a = peak / MiB
    met = proc.returncode == 0 and a / LIMIT_MB < 1
    tail = "" if proc.returncode == 0 else f"; it failed: {proc.stderr.strip()[-300:]}"
    return Row(name=name, a_label="peak private", b_label="limit", a=a, b=LIMIT_MB, unit="MiB",
               ratio=a / LIMIT_MB, ratio_label="A/B", control=None, target=UNDER, met=met,
               rounds=1, note=f"exit {proc.returncode} after {seconds:.0f} s, {oom} OOM kills; "
                              "automatic memory budget (the cgroup's room)" + tail)


def _oom_kills(folder: Path) -> int:
    with contextlib.suppress(OSError, StopIteration, ValueError):
        for name in ("memory.oom_control", "memory.events"):
            path = folder / name
            if path.exists():
                return int(next(line.split()[1] for line in path.read_text().splitlines()
                                if line.startswith("oom_kill ")))
    return 0


def main() -> None:
    quiet()
    rows = [throughput_row(), *flat_rows(), cgroup_row()]
    report("memory", rows)


if __name__ == "__main__":
    main()
