"""The team server as docs/team.md writes it: `mlflow server --app-name basic-auth` with a
secret key, an admin password of the team's own and a PostgreSQL backend. A non-admin user
runs the pipeline through it (train, evaluate, register, predict); another user, who may only
read, cannot move @champion; a wrong password is one clear line."""

from __future__ import annotations

import base64
import json
import os
import secrets
import urllib.request

import pytest
from mlflow import MlflowClient

from conftest import TINY, digits_project, one_error, reprolab
from servers import BIN, free_port, postgres_database, serve, stop

pytestmark = pytest.mark.slow

NAME = "team-auth"
OVERRIDES = (*TINY, "tracking.experiment=team-auth", f"register.model_name={NAME}")
USERS = {"alice": secrets.token_hex(8), "bob": secrets.token_hex(8)}


def _admin_post(uri: str, path: str, body: dict, password: str) -> None:
    token = base64.b64encode(f"admin:{password}".encode()).decode()
    request = urllib.request.Request(f"{uri}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Basic {token}"})
    with urllib.request.urlopen(request, timeout=30):
        pass


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """The documented command, with the two settings MLflow requires; users alice and bob."""
    root = tmp_path_factory.mktemp("auth")
    (root / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'users.db'}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n")
    admin = secrets.token_hex(12)
    env = {**os.environ, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
           "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin}
    with postgres_database() as database:
        port = free_port()
        proc = serve([str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
                      "--backend-store-uri", database,
                      "--artifacts-destination", (root / "artifacts").as_uri(),
                      "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                     port, env, "/health")
        uri = f"http://127.0.0.1:{port}"
        try:
            for user, password in USERS.items():
                _admin_post(uri, "/api/2.0/mlflow/users/create",
                            {"username": user, "password": password}, admin)
            yield uri
        finally:
            stop(proc)


@pytest.fixture
def as_user(auth_server, monkeypatch):
    """-> use(user, password): this process talks to the server as that user."""
    def use(user: str, password: str | None = None) -> None:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", auth_server)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password or USERS[user])
    return use


def test_a_user_runs_the_pipeline_and_another_cannot_move_champion(
        as_user, tmp_path, processed_once, capsys):
    from PIL import Image

    root = digits_project(tmp_path / "p", processed_once)
    as_user("alice")
    for overrides in ((), ("train.epochs=1", "train.lr=1e-6")):  # v1 @champion, v2 @challenger
        for stage in ("train", "evaluate", "register"):
            code, _, err = reprolab(capsys, root, stage, *OVERRIDES, *overrides)
            assert code == 0, err
    Image.new("L", (8, 8), 0).save(tmp_path / "digit.png")
    code, out, err = reprolab(capsys, root, "predict", *OVERRIDES,
                              args=("--model", f"models:/{NAME}@champion",
                                    str(tmp_path / "digit.png")))
    assert code == 0 and "digit.png" in out, err

    as_user("bob")  # may read (default_permission READ), not edit alice's model
    code, _, err = reprolab(capsys, root, "promote", *OVERRIDES, args=(NAME, "2"))
    line = one_error(err, "promote")
    assert code == 2 and "bob" in line and "permission" in line.lower(), line
    assert MlflowClient().get_model_version_by_alias(NAME, "champion").version == "1"

    as_user("alice", "not-her-password")
    code, _, err = reprolab(capsys, root, "predict", *OVERRIDES,
                            args=("--model", f"models:/{NAME}@champion",
                                  str(tmp_path / "digit.png")))
    line = one_error(err, "predict")
    assert code == 2 and "alice" in line and "MLFLOW_TRACKING_PASSWORD" in line, line
