"""Peak private memory of a process and its children: RssAnon (anonymous resident pages, what the
process itself holds; file-backed pages of a mapping are the kernel's cache to reclaim), sampled
from /proc/<pid>/status. Linux only.

A tree is summed by proportional share (Pss_Anon, /proc/<pid>/smaps_rollup): a child that fork()
has just made shares its parent's anonymous pages copy-on-write until it execs (git, fc-list and
a multiprocessing helper in a `reprolab` stage), and RssAnon counts them in both; Pss_Anon splits
them between the sharers, so the sum counts every page once. A process that shares no anonymous
pages has Pss_Anon equal to its RssAnon (spawned tuning workers and torchrun's ranks share none).

    with Peak(pid) as peak:   # sampled by a thread every `interval` seconds
        ...
    peak.bytes                # the highest sum over pid and its descendants seen

    peak, proc = run_peak([...], cwd=..., env=...)   # a command, sampled to its end
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
from pathlib import Path
from typing import Any


def rss_anon(pid: int) -> int:
    """Bytes of RssAnon of `pid`; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def pss_anon(pid: int) -> int:
    """Bytes of Pss_Anon of `pid` (RssAnon where the kernel has no smaps_rollup); 0 when gone."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss_Anon:"):
                return int(line.split()[1]) * 1024
    except FileNotFoundError:
        return rss_anon(pid)
    except (OSError, ValueError):
        pass
    return 0


def descendants(pid: int) -> list[int]:
    """pid and every process below it (tuning workers, torchrun's ranks)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            tasks = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                todo += [int(c) for c in
                         Path(f"/proc/{current}/task/{task}/children").read_text().split()]
    return found


class Peak:
    """The peak of private memory summed over a process tree (each page once: Pss_Anon), sampled
    while the block runs."""

    def __init__(self, pid: int, interval: float = 0.005):
        self.pid, self.interval, self.bytes = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self.bytes = max(self.bytes, sum(pss_anon(p) for p in descendants(self.pid)))
            if stopping:  # the last sample, taken once the block ended: what it holds then
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_peak(cmd: list[str], **popen: Any) -> tuple[int, subprocess.CompletedProcess[str]]:
    """Run `cmd` (stdout and stderr captured as text) -> (its tree's peak private memory in bytes,
    the finished process)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)
    with Peak(proc.pid, interval=0.02) as peak:
        out, err = proc.communicate()
    return peak.bytes, subprocess.CompletedProcess(cmd, proc.returncode, out, err)
