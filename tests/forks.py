"""Commands that must run in processes of their own (killed -9 at a chosen point, or racing each
other) start as forks of one warm process that imported torch, MLflow and the stages once,
instead of each a new interpreter importing them again (3 to 6 CPU-seconds each on 2 cores).

A fork is a process like any other: its own pid, signals, locks and exit status; it begins with
its imports done, as a stage does once it has imported them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

# Each line in: the jobs to start at once, [code, argv, cwd, env, log prefix] each; each line
# out: how each ended (an exit code, or minus the signal that killed it), once all have.
SERVER = """
import importlib, json, os, sys

for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
for line in sys.stdin:
    pids = []
    for code, argv, cwd, env, log in json.loads(line):
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            for fd, suffix in ((1, ".out"), (2, ".err")):
                os.dup2(os.open(log + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            os.chdir(cwd)
            os.environ.clear()
            os.environ.update(env)
            sys.argv = ["-c", *argv]
            exec(compile(code, "<fork>", "exec"), {"__name__": "__main__"})
            sys.exit(0)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    print(json.dumps(codes), flush=True)
"""

# What a stage imports before its work, and what it imports to read a logged model or an MLflow
# database store (1.5 s of CPU, paid again by every fork that reads one): each fork starts past
# them.
WARM = ["reprolab.cli", "reprolab.train", "reprolab.evaluate", "reprolab.register",
        "reprolab.promote", "mlflow.pytorch", "torch.export.pt2_archive",
        "mlflow.store.tracking.sqlalchemy_store"]


class Forks:
    def __init__(self, logs: Path, modules: Sequence[str] = WARM):
        self.logs, self.count = logs, 0
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(list(modules))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, *jobs: tuple[str, Sequence[str], Path]) -> list[subprocess.CompletedProcess]:
        """Start every (code, argv, cwd) at once, each `python -c code *argv` in cwd with this
        process's environment as it is now; -> each one's result once all have ended."""
        sent = []
        for code, argv, cwd in jobs:
            self.count += 1
            log = str(self.logs / f"fork-{self.count}")
            sent.append([code, [str(a) for a in argv], str(cwd), dict(os.environ), log])
        self.proc.stdin.write(json.dumps(sent) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the fork server ended"
        results = []
        for (_, argv, _, _, log), exit_code in zip(sent, json.loads(answer), strict=True):
            out, err = (Path(log + suffix).read_text() for suffix in (".out", ".err"))
            results.append(subprocess.CompletedProcess(["python", "-c", "...", *argv],
                                                       exit_code, out, err))
        return results

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
