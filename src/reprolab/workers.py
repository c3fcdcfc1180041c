"""Local tuning workers: `tune.workers` processes started on this machine, each running trials
of the same study until its budget is taken; waited for until ready, joined, and stopped
(SIGTERM, then kill -9) when the stage is interrupted. `study.py` runs the trials; `tune.py`
hands in the function each worker runs.

They start as forks of multiprocessing's forkserver, a fresh interpreter that imports torch,
MLflow, Optuna and the stage once (3 to 5 CPU-seconds), instead of each worker importing them
again; a process that tunes again (a notebook, the tests) reuses it. The server never runs
torch, so a fork starts with no threads and no CUDA context, as a spawned process does."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from reprolab.study import STOP_S

log = logging.getLogger(__name__)


def _await_ready(processes: list[Any], ready: Any, patience_s: float = 300) -> None:
    """Wait until every worker has its data loaded, so that all start trials together
    (one that dies or stays silent for patience_s is not waited for)."""
    import queue

    waiting, deadline = len(processes), time.monotonic() + patience_s
    while waiting and time.monotonic() < deadline:
        try:
            ready.get(timeout=0.5)
            waiting -= 1
        except queue.Empty:
            if any(p.exitcode is not None for p in processes):
                return
    if waiting:
        log.warning("tune: %d worker(s) not ready after %.0f s; starting without", waiting,
                    patience_s)


def _stop(processes: list[Any], patience_s: float = STOP_S / 2) -> None:
    """Workers still running are stopped: SIGTERM (each ends its trial FAIL and its runs KILLED,
    within patience_s: `bounded_stop` in the worker), then kill -9 for any left after that."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + patience_s
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


# What a worker imports by the end of its first trial (torch._dynamo: on building an optimizer;
# git: MLflow's source tags); the forkserver imports it once
PRELOAD = ["reprolab.tune", "reprolab.tracking", "reprolab.engine", "reprolab.data",
           "reprolab.recipe", "reprolab.storage", "optuna", "torch._dynamo", "git",
           "mlflow.store.tracking.sqlalchemy_store"]


def _as_started(target: Callable[..., None], cwd: str, environ: dict[str, str],
                *args: Any) -> None:
    """In the worker: the stage's working directory and environment as they are now (the
    forkserver keeps those it started with), then target(*args)."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environ)
    target(*args)


@contextlib.contextmanager
def local_workers(target: Callable[..., None], args: list[tuple[Any, ...]]) -> Iterator[list[Any]]:
    """Start one process (a fork of the forkserver) per args tuple, running target(*args, ready),
    where `ready` is a queue the worker puts into once it can start trials; yields once all are
    ready. On the way out they are joined (they end once the budget is taken); on an exception
    (Ctrl-C, SIGTERM), also one that comes during that join, they are stopped."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # read when the server starts: its first use
    ready = context.Queue()
    started = (os.getcwd(), dict(os.environ))
    processes = [context.Process(target=_as_started, args=(target, *started, *a, ready))
                 for a in args]
    for process in processes:
        process.start()
    try:
        _await_ready(processes, ready)
        yield processes
        for process in processes:
            process.join()
    finally:
        _stop(processes)


def dead_workers(processes: list[Any]) -> list[Any]:
    return [p for p in processes if p.exitcode]
