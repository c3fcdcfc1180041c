"""Atomic writes and content hashes: a stage never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

# Inside every folder atomic_dir writes: atomic_dir replaces only folders that carry it, so a
# misdirected output can never delete a folder reprolab did not write.
MARKER = ".reprolab-output"


@contextlib.contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """OSErrors name `path` (a failed write often names no file); torch's writer reports a full
    disk as a RuntimeError, which becomes the OSError it is."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except RuntimeError as exc:
        if "inline_container" not in str(exc) and "PytorchStreamWriter" not in str(exc):
            raise
        full = shutil.disk_usage(path.parent if path.parent.exists() else ".").free < 1 << 24
        code = errno.ENOSPC if full else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from exc


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename."""
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def replaceable(path: Path, names: Iterable[str] = ()) -> bool:
    """Whether atomic_dir may replace `path`: absent, written by reprolab (MARKER), or a folder
    holding nothing but the entries `names` (what the stage writes there, for folders written
    before the marker existed)."""
    if not path.exists():
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    return (path / MARKER).is_file() or {p.name for p in path.iterdir()} <= set(names)


def check_replaceable(path: Path, names: Iterable[str] = ()) -> None:
    """Refuse, with one line, an output folder that atomic_dir would not replace (a stage
    calls it before its work too, so that nothing is spent on outputs it cannot write)."""
    from reprolab.errors import ConfigError

    if not replaceable(path, names):
        raise ConfigError(
            f"{path}: exists and was not written by reprolab (no {MARKER} inside); refusing to "
            "replace it: move it away, or point this output's paths.* knob elsewhere"
        )


@contextlib.contextmanager
def atomic_dir(path: Path, names: Iterable[str] = ()) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it takes the place of `path`.

    An existing `path` is replaced only when reprolab wrote it (see `replaceable`): anything
    else there is refused with one line and left as it is.
    """
    check_replaceable(path, names)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            yield tmp
            (tmp / MARKER).write_text("written by reprolab; replaced whole on the next run\n")
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class LockHeld(Exception):
    """Another process holds an exclusive_lock; `pid` is the pid it wrote, None if unknown."""

    def __init__(self, path: Path, pid: int | None):
        super().__init__(f"{path}: held by pid {pid if pid else 'unknown'}")
        self.path, self.pid = path, pid


def pid_note(lock: Path) -> Path:
    """Beside a lock file: the pid of the process that holds it."""
    return lock.with_name(lock.name + ".pid")


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this machine that never waits: raise LockHeld,
    naming the holder's pid, when another process holds it (or another open of the same file in
    this process).

    The lock is the filelock package's (flock where there is one, Windows' own lock elsewhere):
    the OS drops it when the holder dies, even by kill -9. filelock does not say who holds a lock,
    so the holder writes its pid into a note beside the lock file (`pid_note`) and removes it on
    release; one left by a killed holder names a dead pid, which is never reported, and the next
    holder overwrites it.
    """
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path, blocking=False)
    try:
        lock.acquire()
    except Timeout:
        raise LockHeld(path, _holder_pid(pid_note(path))) from None
    try:
        write_text(pid_note(path), f"{os.getpid()}\n")
        yield
    finally:
        # a pid left behind would name a process that no longer holds the lock
        pid_note(path).unlink(missing_ok=True)
        lock.release()


def _holder_pid(note: Path, wait_s: float = 1.0) -> int | None:
    """The live pid in a held lock's note. The holder writes it just after locking, and a holder
    killed with -9 leaves its pid behind, so wait briefly for a live one."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        text = note.read_text().strip() if note.exists() else ""
        if text.isdigit() and pid_alive(int(text)):
            return int(text)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` on this machine still runs (a zombie, killed but not yet reaped by
    its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no /proc (macOS), or it just went
        return True
    return stat.rpartition(")")[2].split()[0] != "Z"


def exit_with_parent() -> None:
    """This process stops (as on SIGTERM) once the process that started it is gone, even after
    a kill -9 of it: a spawned tuning worker, or a rank that torchrun started in a session of
    its own, would otherwise go on as an orphan."""
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def signals_held(reraise: bool = True) -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done: what must not be cut half-way (a run's
    end in the store) finishes. A signal that came meanwhile is then delivered again, to the
    handlers from before the block, if `reraise` (the process is not already on its way out with
    an error). Main thread only; elsewhere the block runs as it is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.getsignal(signum) for signum in held}
    for signum in held:
        signal.signal(signum, lambda number, frame: came.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back
                signal.signal(signum, handler)
    if came and reraise:
        signal.raise_signal(came[0])


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_sigterm() -> None:
    """SIGTERM ends this process like Ctrl-C: a tuning trial fails, training writes its last
    checkpoint, MLflow runs end KILLED and worker processes are stopped, instead of all of them
    being cut off mid-write."""
    import signal

    signal.signal(signal.SIGTERM, _raise_interrupt)


def startup_over() -> None:
    """The stage's long work begins: the garbage collector, which `reprolab` keeps off while a
    stage starts (cli.py), comes back, with every object alive now (the modules of torch, MLflow
    and the rest, which live as long as the process) frozen out of its passes. A no-op when the
    collector is on (tests, a library caller)."""
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()
