"""Commands that must run in processes of their own (killed -9 at a chosen point, signalled,
racing each other) start as forks of one warm process that imported torch, MLflow and the stages
once, instead of each a new interpreter importing them again (3 to 6 CPU-seconds each on 2
cores).

A fork is a process like any other: its own pid, signals, locks, session and exit status; it
begins with its imports done, as a stage does once it has imported them. Its parent is the warm
process, which reaps it and reports how it ended."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

# Each line in, a request; each line out, its answer. ["start", code, argv, cwd, env, log,
# new session] forks `python -c code *argv` -> its pid; ["poll", pid] -> how it ended (an exit
# code, or minus the signal that killed it), or null while it runs.
SERVER = """
import importlib, json, os, sys

for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
ended = {}
for line in sys.stdin:
    request = json.loads(line)
    if request[0] == "start":
        _, code, argv, cwd, env, log, session = request
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            if session:
                os.setsid()
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            for fd, suffix in ((1, ".out"), (2, ".err")):
                os.dup2(os.open(log + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            sys.argv = ["-c", *argv]
            exec(compile(code, "<fork>", "exec"), {"__name__": "__main__"})
            sys.exit(0)
        print(json.dumps(pid), flush=True)
    else:
        pid = request[1]
        if pid not in ended:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                ended[pid] = os.waitstatus_to_exitcode(status)
        print(json.dumps(ended.get(pid)), flush=True)
"""

# What a stage imports before its work, and what it imports on the way: to read a logged model
# or an MLflow database store (1.5 s of CPU), to build an optimizer (torch._dynamo, 0.9 s), for
# MLflow's source tags (git): each fork starts past them, instead of paying them again.
WARM = ["reprolab.cli", "reprolab.train", "reprolab.evaluate", "reprolab.register",
        "reprolab.promote", "reprolab.tune", "mlflow.pytorch", "torch.export.pt2_archive",
        "mlflow.store.tracking.sqlalchemy_store", "torch._dynamo", "git"]

# `python -m reprolab ARGS`, as a fork runs it
CLI = "import sys\nfrom reprolab.cli import main\nsys.exit(main(sys.argv[1:]))\n"


class Fork:
    """A started fork, read as subprocess.Popen is: pid, poll(), wait(), communicate() (its
    output as text, once it has ended), returncode."""

    def __init__(self, server: Forks, pid: int, argv: Sequence[str], log: str):
        self.server, self.pid, self.args, self.log = server, pid, list(argv), log
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.ask(["poll", self.pid])
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        return tuple(Path(self.log + suffix).read_text() for suffix in (".out", ".err"))

    def kill(self) -> None:
        if self.poll() is None:
            os.kill(self.pid, signal.SIGKILL)

    def result(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        """As subprocess.run: killed when it outlives `timeout`."""
        try:
            out, err = self.communicate(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return subprocess.CompletedProcess(self.args, self.returncode, out, err)


class Forks:
    def __init__(self, logs: Path, modules: Sequence[str] = WARM):
        self.logs, self.count, self.lock = logs, 0, threading.Lock()  # one request at a time
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(list(modules))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, request: list) -> object:
        with self.lock:  # a test's threads may ask too
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        assert answer, "the fork server ended"
        return json.loads(answer)

    def start(self, code: str, argv: Sequence[object], cwd: Path, new_session: bool = False,
              env: dict[str, str] | None = None) -> Fork:
        """`python -c code *argv` in cwd, with `env` (this process's environment as it is now)."""
        self.count += 1
        log = str(self.logs / f"fork-{self.count}")
        argv = [str(a) for a in argv]
        env = dict(os.environ) if env is None else env
        pid = self.ask(["start", code, argv, str(cwd), env, log, new_session])
        return Fork(self, pid, ["python", "-c", "...", *argv], log)

    def reprolab(self, argv: Sequence[object], cwd: Path, new_session: bool = False,
                 env: dict[str, str] | None = None) -> Fork:
        """`python -m reprolab ARGV` in cwd."""
        return self.start(CLI, argv, cwd, new_session, env)

    def run(self, *jobs: tuple[str, Sequence[object], Path]) -> list[subprocess.CompletedProcess]:
        """Start every (code, argv, cwd) at once; -> each one's result once all have ended."""
        started = [self.start(*job) for job in jobs]
        return [fork.result() for fork in started]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
