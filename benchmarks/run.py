"""`make bench`: every benchmark, each in a fresh process, one after the other; then one report.

    python benchmarks/run.py [tracking datapath throughput pruning storage noop gpu]

Each benchmark prints its table and writes reports/bench/<name>.json; this script then writes
reports/bench/README.md: the machine and all tables, as the README's Performance section
shows them.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from harness import REPORTS, load, machine, table

from reprolab.io import atomic_path

HERE = Path(__file__).resolve().parent
ORDER = ("tracking", "datapath", "throughput", "pruning", "storage", "noop", "gpu")


def summary(seconds: dict[str, float]) -> str:
    from harness import Row

    m = machine()
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
        f"{m['memory_gib']} GiB; Python {m['python']}, torch {m['torch']}; "
        f"CUDA: {m['cuda'] or 'none'}; commit {m['commit']}.",
        "",
        "A is reprolab's way, B the baseline; medians of 5 (tracking: 7) alternating rounds; "
        "*A vs A* is a second run of A in the same rounds over the first (the noise).",
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


def main() -> int:
    names = sys.argv[1:] or list(ORDER)
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
    text = summary(seconds)
    with atomic_path(REPORTS / "README.md") as tmp:
        tmp.write_text(text)
    print("\n# all benchmarks\n\n" + text)
    print(f"total {time.perf_counter() - started:.0f} s; written to {REPORTS / 'README.md'}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
