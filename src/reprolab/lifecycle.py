"""Process lifecycle: locks between processes, signals and stops that end in bounded time, pids,
a parent that goes, and the garbage collector's start-up pause."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from reprolab.files import write_text

log = logging.getLogger(__name__)


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


def exit_with_parent(pid: int | None = None) -> None:
    """This process stops (as on SIGTERM) once `pid` is gone, by default the process that
    started it, even after a kill -9 of it: a rank that torchrun started in a session of its
    own, or a local tuning worker (`pid`: its stage; a fork of multiprocessing's forkserver,
    whose server outlives the stage while a worker holds it), would otherwise go on as an
    orphan."""
    import signal
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        if pid is None:
            while os.getppid() == parent:
                time.sleep(1)
        else:
            try:  # readable once the process has ended (a zombie included); no pid reuse
                ended = os.pidfd_open(pid)
            except ProcessLookupError:  # gone already
                ended = None
            except (AttributeError, OSError):  # not Linux, or a kernel before 5.3: poll
                ended = None
                while pid_alive(pid):
                    time.sleep(1)
            if ended is not None:
                import select

                select.select([ended], [], [])
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


def _interrupt(signum: int) -> KeyboardInterrupt:
    exc = KeyboardInterrupt(f"signal {signum}")
    exc.signum = signum  # type: ignore[attr-defined]  (read by _redeliver_swallowed)
    return exc


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise _interrupt(signum)


def _raise_interrupt_once(signum: int, frame: Any) -> None:
    import signal

    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    raise _interrupt(signum)


_STOP_HANDLERS: dict[int, Any] = {}  # what interrupt_on_sigterm installed, by signal
REDELIVER_S = 0.05


def _redeliver_swallowed(unraisable: Any) -> None:
    """sys.unraisablehook: Python runs a signal's handler wherever the main thread is, a
    finalizer included (an object's `__del__` that the garbage collector calls at any allocation,
    such as GitPython's Repo, which MLflow's git context makes), and an exception raised there
    is printed and dropped. A Ctrl-C or SIGTERM would be lost so, with the process going on as
    if none came (and, after a once-only handler, deaf to the next). The signal is sent again
    shortly instead, to land once the finalizer has returned."""
    import signal
    import threading

    if not issubclass(unraisable.exc_type, KeyboardInterrupt):
        _UNRAISABLE[0](unraisable)
        return
    signum = getattr(unraisable.exc_value, "signum", signal.SIGINT)
    handler = _STOP_HANDLERS.get(signum)
    if handler is not None and signal.getsignal(signum) is signal.SIG_IGN:
        with contextlib.suppress(ValueError):  # not the main thread: as it is
            signal.signal(signum, handler)  # a once-only handler took itself down first
    timer = threading.Timer(REDELIVER_S, os.kill, (os.getpid(), signum))
    timer.daemon = True
    timer.start()


_UNRAISABLE: list[Any] = []


def redeliver_swallowed_interrupts() -> None:
    """Install _redeliver_swallowed as sys.unraisablehook (once; other exceptions go on to the
    hook from before)."""
    import sys

    if sys.unraisablehook is not _redeliver_swallowed:
        _UNRAISABLE[:] = [sys.unraisablehook]
        sys.unraisablehook = _redeliver_swallowed


def interrupt_on_sigterm(once: bool = False) -> None:
    """SIGTERM ends this process like Ctrl-C: a tuning trial fails, training writes its last
    checkpoint, MLflow runs end KILLED and worker processes are stopped, instead of all of them
    being cut off mid-write. `once`: the first SIGINT or SIGTERM does, later ones are ignored, so
    that they do not cut the clean-up it began (Ctrl-C reaches a tuning worker, and then its
    stage's SIGTERM); bounded_stop bounds that clean-up."""
    import signal

    _STOP_HANDLERS.clear()
    if once:
        _STOP_HANDLERS[signal.SIGINT] = _raise_interrupt_once
    _STOP_HANDLERS[signal.SIGTERM] = _raise_interrupt_once if once else _raise_interrupt
    for signum, handler in _STOP_HANDLERS.items():
        signal.signal(signum, handler)
    redeliver_swallowed_interrupts()


def drop_interrupted_frames(exc: BaseException) -> None:
    """Ctrl-C or SIGTERM (KeyboardInterrupt) that landed inside a write to a SQLite store (MLflow's
    default) leaves the write's statement alive in the frames it came through, and with it the
    store's lock, for as long as the exception lives: every write of the stop that follows (a
    run's end KILLED, in this process or in a worker) would wait the store's busy timeout behind
    it (MLflow's: 20 s each). Dropping those frames' locals frees it; the traceback still prints."""
    import traceback

    if isinstance(exc, KeyboardInterrupt):
        traceback.clear_frames(exc.__traceback__)


@contextlib.contextmanager
def bounded_stop(seconds: float, what: str, left: str) -> Iterator[None]:
    """A stop (Ctrl-C, SIGTERM) that comes inside the block ends this process within `seconds`:
    whatever its clean-up still waits on then (a store that does not answer: a lock held by a
    stopped process, a silent server), it says so in one line (`what` stopped, and `left`: what
    that leaves), kills the processes it started with multiprocessing and exits with 130. Main
    thread only.

    The signal is seen through the wakeup fd, at once: Python runs its handler only when the main
    thread comes back from the C call it is in, such as SQLite's busy wait on a held lock."""
    import multiprocessing
    import signal
    import socket
    import threading
    import time

    signals, wakeup = socket.socketpair()  # a socket: what Windows takes as a wakeup fd
    wakeup.setblocking(False)
    previous = signal.set_wakeup_fd(wakeup.fileno(), warn_on_full_buffer=False)
    stopping = threading.Event()

    def watch() -> None:
        while (number := signals.recv(1)) and number[0] not in (signal.SIGINT, signal.SIGTERM):
            pass
        if not number:  # the block ended without a stop
            signals.close()
            return
        stopping.set()
        time.sleep(seconds)
        log.warning("%s: stopped %g s after the signal, %s", what, seconds, left)
        for child in multiprocessing.active_children():
            child.kill()
        os._exit(130)

    threading.Thread(target=watch, name="bounded-stop", daemon=True).start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        if not stopping.is_set():
            wakeup.close()  # ends the watch (a stop already under way keeps its deadline)


def startup_over() -> None:
    """The stage's long work begins: the garbage collector, which `reprolab` keeps off while a
    stage starts (cli.py), comes back, with every object alive now (the modules of torch, MLflow
    and the rest, which live as long as the process) frozen out of its passes. A no-op when the
    collector is on (tests, a library caller)."""
    import gc

    if not gc.isenabled():
        gc.freeze()
        gc.enable()
