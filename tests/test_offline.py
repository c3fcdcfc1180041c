"""No network at run time: a stage that loads MLflow reaches no host but its stores.

MLflow 3 sends usage telemetry unless told not to (a thread fetches a config from the internet,
and it writes an installation id into the home folder); it stays quiet on its own under pytest
and in CI, so the stage here runs without those markers, as on a user's machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# MLflow skips telemetry by itself when one of these is set (mlflow/telemetry/utils.py)
CI_MARKERS = ("PYTEST_CURRENT_TEST", "GITHUB_ACTIONS", "CI", "CIRCLECI", "GITLAB_CI",
              "JENKINS_URL", "TRAVIS", "TF_BUILD", "BITBUCKET_BUILD_NUMBER", "CODEBUILD_BUILD_ARN",
              "BUILDKITE", "TEAMCITY_VERSION", "CLOUD_RUN_EXECUTION", "RUNBOT_HOST_URL",
              "RUNBOT_BUILD_NAME", "RUNBOT_WORKER_ID", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")

# Every name lookup and connection the stage makes, unix sockets and files aside, then the stage.
STAGE = """
import json, socket, sys, threading
reached = []
real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
def getaddrinfo(host, *args, **kwargs):
    reached.append(f"lookup {host}")
    raise OSError("no network in this test")
def connect(self, address):
    if self.family != socket.AF_UNIX:
        reached.append(f"connect {address}")
        raise OSError("no network in this test")
    return real_connect(self, address)
socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
from reprolab.cli import main
code = main(sys.argv[1:])
for thread in threading.enumerate():  # MLflow's telemetry thread, if one started
    if thread is not threading.current_thread() and thread.daemon:
        thread.join(timeout=5)
from mlflow.telemetry.client import get_telemetry_client
print(json.dumps({"code": code, "reached": reached,
                  "telemetry": get_telemetry_client() is not None}))
"""


def test_a_stage_that_loads_mlflow_reaches_no_host_and_writes_nothing_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in CI_MARKERS}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    # promote opens the store and the registry, then refuses a model that is not there
    proc = subprocess.run([sys.executable, "-c", STAGE, "promote", "-q", "no-such-model", "1"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 2, proc.stderr
    assert "no-such-model" in proc.stderr
    assert result["reached"] == []
    assert result["telemetry"] is False
    assert list(home.rglob("*")) == []  # no installation id, no config
