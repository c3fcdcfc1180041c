"""`reprolab <stage> ...` with a stopwatch: the same console-script entry point, the same work,
and one JSON line (appended to $STAGE_TIMER_LOG, else on stderr) splitting the process's time into

- imports: every module import, at module level or lazily inside the stage (the outermost
  imports only, so nothing counts twice), timed at importlib's `_find_and_load`;
- store: constructing MLflow's SQL stores (engine, table check, schema version check; tracking
  and registry each have one), less the imports they trigger;
- work: everything else the stage does after the interpreter is up.

    python benchmarks/stage_timer.py <stage> [reprolab arguments]

and the interpreter's own start, from the process's start time in /proc. bench_startup.py
runs every stage of the default pipeline through it.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import importlib._bootstrap as bootstrap  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

spent = {"imports": 0.0, "store": 0.0}
_depth = 0
_find_and_load = bootstrap._find_and_load
# MLflow's SQL stores, patched as soon as their modules are imported
_STORES = ("mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store")
_patched: set[str] = set()


def _timed_find_and_load(name, import_):
    global _depth
    if _depth:
        return _find_and_load(name, import_)
    _depth += 1
    started = time.perf_counter()
    try:
        return _find_and_load(name, import_)
    finally:
        spent["imports"] += time.perf_counter() - started
        _depth -= 1
        _patch_stores()


def _patch_stores() -> None:
    for module_name in _STORES:
        module = sys.modules.get(module_name)
        if module is None or module_name in _patched:
            continue
        _patched.add(module_name)
        cls = module.SqlAlchemyStore
        original = cls.__init__

        def init(self, *args, _original=original, **kwargs):
            imports_before, started = spent["imports"], time.perf_counter()
            try:
                _original(self, *args, **kwargs)
            finally:
                imported = spent["imports"] - imports_before
                spent["store"] += time.perf_counter() - started - imported

        cls.__init__ = init


def interpreter_start() -> float | None:
    """Seconds from the process's start (/proc, 10 ms ticks) to this module's first line: the
    interpreter, site-packages' .pth files, the console script. None off Linux."""
    import os
    from pathlib import Path

    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    alive = uptime - ticks / os.sysconf("SC_CLK_TCK")
    return max(0.0, alive - (time.perf_counter() - STARTED))


def report(stage: str, code: object) -> None:
    """One JSON line appended to $STAGE_TIMER_LOG (or printed on stderr)."""
    import os

    total = time.perf_counter() - STARTED
    work = total - spent["imports"] - spent["store"]
    line = json.dumps({"stage": stage, "exit": code, **spent, "work": work, "total": total,
                       "interpreter": interpreter_start()})
    path = os.environ.get("STAGE_TIMER_LOG")
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")
    else:
        print("STAGE_TIMER " + line, file=sys.stderr)


def main() -> int:
    bootstrap._find_and_load = _timed_find_and_load
    sys.argv = ["reprolab", *sys.argv[1:]]
    from reprolab.cli import main as cli_main

    code = None
    try:
        code = cli_main()
        return code
    finally:
        report(sys.argv[1] if len(sys.argv) > 1 else "", code)


if __name__ == "__main__":
    sys.exit(main())
