"""Real servers for tests: a throwaway PostgreSQL database and an `mlflow server` on a free port."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(args: list[str], port: int, env: dict[str, str], probe: str) -> subprocess.Popen:
    """Start a server process and wait until `probe` answers on 127.0.0.1:port."""
    # the servers start helpers (uvicorn) by name, from this environment
    env = {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
           # MLflow's job runner (GenAI jobs: judges, prompt optimisation) starts seven more
           # processes by default, each importing MLflow; nothing here uses them
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{probe}", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise AssertionError(f"{args[0]} did not answer on port {port}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def scoring_command(model_uri: str, port: int) -> list[str]:
    return [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", "127.0.0.1", "-p", str(port)]


@contextlib.contextmanager
def scoring_server(model_uri: str, env: dict[str, str]) -> Iterator[str]:
    """`mlflow models serve` for `model_uri`; -> its /invocations URL."""
    port = free_port()
    proc = serve(scoring_command(model_uri, port), port, env, "/ping")
    try:
        yield f"http://127.0.0.1:{port}/invocations"
    finally:
        stop(proc)


def served_probabilities(model_uri: str, batch: Any, env: dict[str, str]) -> Any:
    """Start `mlflow models serve` for `model_uri`, post `batch` (N x C x H x W pixels) and
    return its answer as an N x K float32 array."""
    import numpy as np

    with scoring_server(model_uri, env) as url:
        answer = post(url, {"inputs": batch.tolist()})
    return np.array(answer["predictions"], dtype=np.float32)


def post_status(url: str, body: dict) -> tuple[int, dict]:
    """POST `body`; -> (HTTP status, the JSON answer), errors included."""
    import urllib.error

    try:
        return 200, post(url, body)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A new database on the PostgreSQL at 127.0.0.1:5432, dropped afterwards; -> its URL."""
    import psycopg

    name = f"reprolab_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host="127.0.0.1", port=5432, dbname="test", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        user = admin.info.user
    try:
        yield f"postgresql://{user}@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(host="127.0.0.1", port=5432, dbname="test",
                             autocommit=True) as admin:
            admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@contextlib.contextmanager
def mlflow_server(artifacts: Path) -> Iterator[str]:
    """A team's `mlflow server`: PostgreSQL backend, artifacts proxied to a folder; -> its URI."""
    with postgres_database() as database:
        port = free_port()
        proc = serve([str(BIN / "mlflow"), "server", "--backend-store-uri", database,
                      "--artifacts-destination", artifacts.as_uri(), "--host", "127.0.0.1",
                      "--port", str(port), "--workers", "1"],
                     port, dict(os.environ), "/health")
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop(proc)
