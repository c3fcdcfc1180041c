"""A study's Optuna storage: the journal file (its torn tail repaired) or a database with
heartbeats (PostgreSQL or MySQL for workers on many machines)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

def database_url(url: str) -> str:
    """SQLAlchemy's plain `mysql://` and `mariadb://` mean the mysqlclient driver, which needs
    C headers to build; the PyMySQL driver installed with reprolab serves them instead."""
    for scheme in ("mysql", "mariadb"):
        if url.startswith(f"{scheme}://"):
            return f"{scheme}+pymysql://" + url.removeprefix(f"{scheme}://")
    return url


def open_storage(url: str | None, journal: Path, heartbeat_s: int, on_stale: Any) -> Any:
    """The journal file when `url` is None (its torn tail repaired first); else a database with
    heartbeats, so that a killed worker's trial is failed instead of staying RUNNING forever:
    `on_stale(study, trial)` is Optuna's callback for such a trial (it retries it once)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    # heartbeats, fail_stale_trials, the retry callback and the matplotlib plots are marked
    # experimental; Optuna's own log lines follow this command's level (-q: warnings only)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(max(logging.getLogger().getEffectiveLevel(), logging.INFO))
    if url:
        return optuna.storages.RDBStorage(
            database_url(url),
            heartbeat_interval=heartbeat_s,
            grace_period=3 * heartbeat_s,
            heartbeat_stale_trial_callback=on_stale,
        )
    journal.parent.mkdir(parents=True, exist_ok=True)
    repair_journal(journal)
    return JournalStorage(JournalFileBackend(str(journal)))


def repair_journal(path: Path) -> Path | None:
    """Cut a torn last record (a partial line, as after a crash or a full disk) off the journal.

    Optuna reads past a torn tail, but the next append glues its record onto it, and from then on
    every load raises JSONDecodeError. The original file stays beside it as `<name>.torn-<n>`.
    -> that backup, or None when the tail is whole. Holds the journal's own lock, so that a
    record another process is appending right now is not taken for a torn one.
    """
    if not path.exists() or path.stat().st_size == 0:
        return None
    from optuna.storages.journal import JournalFileSymlinkLock

    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        size, keep = path.stat().st_size, _end_of_whole_records(path)
        if keep == size:
            return None
        backup = _free_name(path, "torn")
        shutil.copyfile(path, backup)
        os.truncate(path, keep)
    finally:
        lock.release()
    log.warning("tune: %s ended in a torn record (%d bytes); cut off, the original is kept as %s",
                path, size - keep, backup.name)
    return backup


def _end_of_whole_records(path: Path, chunk: int = 1 << 16) -> int:
    """Offset just after the last line that is a whole record (newline-terminated JSON)."""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail, start = b"", size
        while start > 0:  # read backwards until the line before the last one ends in the block
            step = min(chunk, start)
            start -= step
            f.seek(start)
            tail = f.read(step) + tail
            cut = tail.rfind(b"\n", 0, len(tail) - 1)
            if cut >= 0:
                tail, start = tail[cut + 1:], start + cut + 1
                break
    if tail.endswith(b"\n"):
        with contextlib.suppress(ValueError):  # JSONDecodeError, UnicodeDecodeError
            json.loads(tail)
            return size
    return start


def _free_name(path: Path, tag: str) -> Path:
    n = 1
    while path.with_name(f"{path.name}.{tag}-{n}").exists():
        n += 1
    return path.with_name(f"{path.name}.{tag}-{n}")
