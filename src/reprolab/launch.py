"""torchrun's ranks for `reprolab train`: starting them on this machine, joining them from a
rank, and the lock that keeps one trainer per project.

With train.processes > 1, `reprolab train` itself starts the ranks with torchrun's own launcher
(what `torchrun --standalone --nproc-per-node N -m reprolab train` runs) and holds the train lock
while they run; each rank joins the process group for the run (`ranks`) and stops when its
launcher is gone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from reprolab.ddp import start_distributed
from reprolab.errors import ReprolabError
from reprolab.lifecycle import LockHeld, exclusive_lock, exit_with_parent

log = logging.getLogger(__name__)

# The `reprolab train` that launched torchrun's ranks (its pid) holds the train lock for them.
LAUNCHER_ENV = "REPROLAB_TRAIN_LAUNCHER"


class TrainerBusy(ReprolabError):
    """Another `reprolab train` is training the same project. Exit code 2."""

    exit_code = 2


@contextlib.contextmanager
def one_trainer(path: Path) -> Iterator[None]:
    """Refuse a second trainer of the same project while one runs. After a kill -9 of
    `dvc repro` its `reprolab train` child goes on as an orphan; a second trainer would resume
    the same checkpoint into the same MLflow run and both would log every epoch.

    The ranks that a `reprolab train` launched train under its lock: it holds the lock and
    names itself in LAUNCHER_ENV."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(path))
        except LockHeld as held:
            if held.pid is not None and str(held.pid) == os.environ.get(LAUNCHER_ENV):
                yield  # held for this rank by the `reprolab train` that launched it
                return
            pid = held.pid or "unknown"
            raise TrainerBusy(
                f"another `reprolab train` (pid {pid}) is training this project (lock {path}); "
                f"wait for it to finish, or stop it (kill {pid}) and run train again"
            ) from None
        yield


@contextlib.contextmanager
def ranks(device: torch.device) -> Iterator[torch.device]:
    """Under torchrun (its environment names WORLD_SIZE): this process joins the other ranks for
    the run, and stops when its launcher is gone. -> the device to train on (`device`, or
    this rank's GPU)."""
    if "WORLD_SIZE" not in os.environ:
        yield device
        return
    exit_with_parent()
    device = start_distributed(device)
    try:
        yield device
    except BaseException as exc:
        if getattr(exc, "all_ranks", False):
            # every rank raised it at the same point (a diverged loss, rank 0's error): rank 0
            # ends its run and writes its checkpoint before the others exit and the launcher
            # stops whoever is left
            with contextlib.suppress(Exception):
                dist.barrier()
            raise
        # a rank that died leaves the others in a collective, which gloo ends with a plain
        # RuntimeError ("Connection reset by peer"), NCCL with a DistBackendError
        if isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and
                                               "gloo" in str(exc)):
            raise ReprolabError(
                "another rank stopped answering (it failed or was killed; its own error says "
                f"why): {str(exc).strip().splitlines()[0][:300]}"
            ) from None
        raise
    finally:
        dist.destroy_process_group()


def launch(processes: int, argv: list[str], lock: Path) -> int:
    """Start `processes` ranks on this machine, each `python -m reprolab` with `argv`, holding
    the train `lock` while they run; they stop if this process goes (kill -9 included). Rank 0
    prints here; the others write to files beside the lock, kept when a rank fails.
    -> the exit code."""
    with one_trainer(lock):
        logs = Path(tempfile.mkdtemp(prefix=".ranks-", dir=lock.parent))
        code = _elastic_launch(processes, argv, logs)
    if code == 0:
        shutil.rmtree(logs, ignore_errors=True)
    return code


def worker_args(args: Any) -> list[str]:
    """This command's arguments for its ranks, the params file made absolute."""
    out = ["train", "--params", str(Path(args.params).resolve())]
    for item in args.overrides:
        out += ["-S", item]
    if args.override_list:
        out += ["--overrides", args.override_list]
    return out + (["-q"] if args.quiet else [])


def _elastic_launch(processes: int, argv: list[str], logs: Path) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # a rendezvous on a free local port, as torchrun --standalone; no restarts: a rerun resumes
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"reprolab-{os.getpid()}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
        logs_specs=DefaultLogsSpecs(str(logs), {r: Std.ALL for r in range(1, processes)}),
    )
    # the launcher's own lines (rendezvous, worker start and stop) are not the stage's
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:
        elastic_launch(config, sys.executable)("-m", "reprolab", *argv)
    except ChildFailedError as failed:
        return _failure(failed, logs)
    except SignalException:  # Ctrl-C or SIGTERM: the ranks got it too, and stopped
        raise KeyboardInterrupt from None
    finally:
        os.environ.pop(LAUNCHER_ENV, None)
    return 0


def _failure(failed: Any, logs: Path) -> int:
    """The first rank that failed: rank 0 printed its own error line here; for another rank,
    one line with the last line of its log. -> the exit code for the stage."""
    def cause(item: tuple[int, Any]) -> tuple[int, int]:
        # killed from outside first, then a rank's own error; last a rank that the launcher
        # stopped (SIGTERM) because another had failed
        code = item[1].exitcode
        return (0 if code < 0 and code != -signal.SIGTERM else 1 if code > 0 else 2), item[0]

    rank, failure = min(failed.failures.items(), key=cause)
    code = failure.exitcode
    if rank != 0 or code < 0:
        log_file = next(logs.glob(f"*/attempt_*/{rank}/stderr.log"), None)
        lines = log_file.read_text().strip().splitlines() if log_file else []
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = f": {lines[-1]}" if lines and code >= 0 else ""
        where = f" (log: {log_file})" if log_file else ""
        print(f"reprolab train: error: rank {rank} failed, {why}{last}{where}; run "
              "`reprolab train` again to resume", file=sys.stderr)
    return code if code in (1, 2, 130) else 1
