"""What every benchmark shares: alternating rounds, medians, ratios, the A-versus-A control,
the printed table and the JSON report under reports/bench/.

A benchmark names two sides, A (ours) and B (the baseline), and a callable for each that returns
the measured value of one round (seconds, or any number where lower is better unless the
benchmark says otherwise). Rounds alternate A, B, A', B, A, ... so that a slow spell of a shared
machine hits both sides; A' is a second run of A whose ratio to A shows the noise.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# BENCH_QUICK=1 (run.py --quick): tiny sizes and one round, to check that a benchmark runs
# while developing it; its figures mean nothing, so they go to reports/bench/quick/
QUICK = os.environ.get("BENCH_QUICK") == "1"
# reprolab measured as its command runs it (cli.py): without MLflow's usage telemetry
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# BENCH_REPORTS: another folder for the JSON reports (the tests' smoke runs write there)
REPORTS = Path(os.environ.get("BENCH_REPORTS")
               or REPO / "reports" / "bench" / ("quick" if QUICK else ""))
sys.path.insert(0, str(REPO / "src"))

from reprolab.files import write_json  # noqa: E402


@dataclass
class Row:
    """One line of a benchmark's table."""

    name: str
    a_label: str
    b_label: str
    a: float  # median of side A
    b: float  # median of side B
    unit: str
    ratio: float  # the figure the target is about
    ratio_label: str  # how the ratio is formed, e.g. "B/A" (speed-up of A) or "A/B" (overhead)
    control: float | None  # median(A') / median(A), the A-versus-A noise; None: deterministic
    target: str  # e.g. "<= 1.02"; "" when the row is informative only
    met: bool | None  # None when there is no target
    rounds: int
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""


def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    """A side that is timed from outside: its wall seconds. It starts as a stage's work starts
    under `reprolab` (cli.py, io.startup_over): the garbage of the sides before it collected,
    and what is alive frozen out of the collector's passes. Without that, the collector's full
    passes over torch's and MLflow's objects landed in whichever side ran next: the same
    tracked run took 17.6 to 21.2 s in one round of the MNIST-shaped tracking row."""
    import gc

    def side() -> float:
        gc.collect()
        gc.freeze()
        started = time.perf_counter()
        fn()
        return time.perf_counter() - started

    return side


def alternate(a: Callable[[], float], b: Callable[[], float], rounds: int = 5,
              warmup: int = 1) -> dict[str, list[float]]:
    """-> {"A": [...], "B": [...], "A'": [...]}: `rounds` values of each side, taken A, B, A'
    in every round (B, A, A' in odd rounds, so neither side always goes first), after
    `warmup` untimed rounds of A and B (imports, caches, allocator)."""
    for _ in range(warmup):
        a(), b()
    samples: dict[str, list[float]] = {"A": [], "B": [], "A'": []}
    for i in range(rounds):
        order = (("A", a), ("B", b), ("A'", a)) if i % 2 == 0 else (("B", b), ("A", a), ("A'", a))
        for label, side in order:
            samples[label].append(side())
    return samples


def alternate_many(sides: dict[str, Callable[[], float]], rounds: int = 3,
                   warmup: int = 0) -> dict[str, list[float]]:
    """alternate() for more than two sides: {"A": a, "B": b, "C": c, ...} -> the samples of
    each and of A', the second run of A that ends every round. The order of the other sides
    rotates from round to round, so that no side always runs first or right after A."""
    labels = list(sides)
    for _ in range(warmup):
        for label in labels:
            sides[label]()
    samples: dict[str, list[float]] = {label: [] for label in [*labels, "A'"]}
    for i in range(rounds):
        turn = i % len(labels)
        for label in labels[turn:] + labels[:turn]:
            samples[label].append(sides[label]())
        samples["A'"].append(sides["A"]())
    return samples


def round_ratios(samples: dict[str, list[float]], ratio: str) -> list[float]:
    """The ratio of A and B within each round (`"A/B"` or `"B/A"`), for targets that must
    hold in every round, not only for the medians."""
    pairs = zip(samples["A"], samples["B"], strict=True)
    return [a / b if ratio == "A/B" else b / a for a, b in pairs]


def median(values: list[float]) -> float:
    return statistics.median(values)


def check(value: float, target: str) -> bool | None:
    if not target:
        return None
    op, bound = target.split()
    return {"<=": value <= float(bound), ">=": value >= float(bound)}[op]


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                        capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def fmt(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "ms":
        return f"{value:.1f} ms"
    if abs(value) >= 1000:
        return f"{value:,.0f} {unit}".strip()
    return f"{value:.4g} {unit}".strip()


def table(rows: list[Row]) -> str:
    """A Markdown table: readable in a terminal and pasted as is into the README."""
    lines = ["| benchmark | A | B | ratio | A vs A | target | |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        verdict = {True: "met", False: "**missed**", None: ""}[r.met]
        control = f"{r.control:.3f}" if r.control is not None else "–"
        b = f"{r.b_label}: {fmt(r.b, r.unit)}" if r.b_label else ""
        lines.append(
            f"| {r.name} | {r.a_label}: {fmt(r.a, r.unit)} | {b} "
            f"| {r.ratio:.3g} ({r.ratio_label}) | {control} | {r.target} | {verdict} |"
        )
    notes = [f"- {r.name}: {r.note}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def report(benchmark: str, rows: list[Row], extra: dict[str, Any] | None = None) -> Path:
    """Print the table and write reports/bench/<benchmark>.json (atomically)."""
    quick = " (quick: tiny sizes, one round; no figure means anything)" if QUICK else ""
    print(f"\n## {benchmark}{quick}\n")
    print(table(rows) if rows else f"skipped: {(extra or {}).get('skipped', 'nothing measured')}")
    path = REPORTS / f"{benchmark}.json"
    write_json(path, {"benchmark": benchmark, "machine": machine(), "quick": QUICK,
                      "rows": [asdict(r) for r in rows], **(extra or {})})
    return path


def row_from(samples: dict[str, list[float]], *, name: str, a_label: str, b_label: str,
             unit: str, ratio: str, target: str = "", note: str = "") -> Row:
    """Medians, the ratio (`"A/B"`: overhead of A; `"B/A"`: speed-up of A) and the control."""
    a, b, again = median(samples["A"]), median(samples["B"]), median(samples["A'"])
    value = a / b if ratio == "A/B" else b / a
    return Row(name=name, a_label=a_label, b_label=b_label, a=a, b=b, unit=unit, ratio=value,
               ratio_label=ratio, control=again / a, target=target, met=check(value, target),
               rounds=len(samples["A"]), samples=samples, note=note)


def load(benchmark: str) -> dict[str, Any] | None:
    path = REPORTS / f"{benchmark}.json"
    return json.loads(path.read_text()) if path.exists() else None


def scratch(prefix: str) -> Path:
    """A temporary folder, removed when the benchmark's process ends (the MNIST- and
    CIFAR-shaped workloads take hundreds of MB each)."""
    import atexit
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def git_copy(dest: Path, params: dict[str, dict[str, Any]]) -> Path:
    """A git repository in `dest` holding what a clone of this one would hold (tracked files and
    untracked ones git does not ignore), with `params` ({section: {key: value}}) merged into
    params.yaml and committed. The end-to-end tests and bench_noop.py both start from it."""
    import shutil

    import yaml

    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    values = yaml.safe_load((dest / "params.yaml").read_text())
    for section, update in params.items():
        values[section].update(update)
    (dest / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    identity = ["-c", "user.name=reprolab", "-c", "user.email=reprolab@localhost"]
    for cmd in (["init", "-q"], ["add", "-A"], [*identity, "commit", "-q", "-m", "copy"]):
        subprocess.run(["git", *cmd], cwd=dest, check=True, capture_output=True)
    return dest


def pipeline_project(root: Path, *overrides: str,
                     workload: Any = None) -> Callable[..., Any]:
    """A project in `root` with params.yaml (digits unless the overrides say otherwise), its data
    fetched and preprocessed, and MLflow pointed at a store inside it. `workload` (a
    workloads.Shape) places synthetic raw files of that shape and sets data.dataset to match.
    -> config(*more_overrides)."""
    import shutil

    from reprolab.config import load_config
    from reprolab.data import fetch, preprocess

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    if workload is not None:
        overrides = (f"data.dataset={workload.dataset}", *overrides)

    def config(*more: str) -> Any:
        return load_config(root / "params.yaml", [*overrides, *more])

    cfg = config()
    if workload is not None:
        import workloads

        workloads.write(cfg.raw_dir, workload)
    fetch.run(cfg)
    preprocess.run(cfg)
    return config


def quiet() -> None:
    """Benchmarks print tables, not training logs."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
