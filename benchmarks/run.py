"""`make bench`: every benchmark, each in a fresh process, one after the other; then one report.

    python benchmarks/run.py [--quick] [tracking datapath throughput ...]

Each benchmark prints its table and writes reports/bench/<name>.json; this script then writes
reports/bench/README.md: the machine and all tables. A full run of every benchmark also puts
that text into docs/performance.md between its `bench:start` and `bench:end` markers (the
section). `--quick` runs tiny sizes for one round, to see that the code works while developing
it: its reports go to reports/bench/quick/ and never reach the docs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

if "--quick" in sys.argv[1:]:  # before harness reads it; every benchmark inherits it
    os.environ["BENCH_QUICK"] = "1"

from harness import QUICK, REPO, REPORTS, load, machine, table  # noqa: E402

from reprolab.files import atomic_path  # noqa: E402

HERE = Path(__file__).resolve().parent
ORDER = ("tracking", "datapath", "throughput", "time_to_accuracy", "memory", "pruning", "storage",
         "noop", "startup", "scaling", "gpu")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def summary(seconds: dict[str, float]) -> str:
    from harness import Row

    m = machine()
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"{m['memory_gib']} GiB; Python {m['python']}, torch {m['torch']}; "
        f"CUDA: {m['cuda'] or 'none'}; commit {m['commit']}.",
        "",
        "A is reprolab's way, B the baseline; medians of alternating rounds (5 on digits and "
        "for the MNIST-shaped tracking row, 3 for throughput on the MNIST- and CIFAR-shaped "
        "workloads and for stage start-up; each row's rounds and samples are in "
        "reports/bench/*.json); *A vs A* is a second run of A in the same rounds over the first "
        "(the noise).",
    ]
    for name in ORDER:  # every benchmark with a report, this run's and earlier ones
        data = load(name)
        if data is None:
            continue
        commit = data["machine"]["commit"]
        took = f"{seconds[name]:.0f} s" if name in seconds else f"an earlier run, {commit}"
        lines += ["", f"**{name}** ({took})", ""]
        rows = [Row(**row) for row in data["rows"]]
        lines.append(table(rows) if rows else f"skipped: {data.get('skipped')}")
    return "\n".join(lines) + "\n"


def update_page(text: str, readme: Path = REPO / "docs" / "performance.md") -> bool:
    """Put `text` between the page's bench markers; -> whether it did (markers found)."""
    current = readme.read_text()
    if START not in current or END not in current:
        return False
    head, rest = current.split(START, 1)
    _, tail = rest.split(END, 1)
    with atomic_path(readme) as tmp:
        tmp.write_text(f"{head}{START}\n{text}{END}{tail}")
    return True


def main() -> int:
    names = [a for a in sys.argv[1:] if a != "--quick"] or list(ORDER)
    unknown = set(names) - set(ORDER)
    if unknown:
        print(f"benchmarks/run.py: error: unknown {sorted(unknown)}; allowed: {', '.join(ORDER)}",
              file=sys.stderr)
        return 2
    seconds, failed = {}, []
    started = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / f"bench_{name}.py")], cwd=HERE)
        seconds[name] = time.perf_counter() - t
        if code:
            failed.append(name)
    total = time.perf_counter() - started
    text = summary(seconds)
    if set(names) == set(ORDER):
        text += f"\nAll benchmarks took {total / 60:.0f} min.\n"
    with atomic_path(REPORTS / "README.md") as tmp:
        tmp.write_text(text)
    print("\n# all benchmarks\n\n" + text)
    print(f"total {total:.0f} s; written to {REPORTS / 'README.md'}")
    if set(names) == set(ORDER) and not failed and not QUICK and update_page(text):
        print(f"and to {REPO / 'docs' / 'performance.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
