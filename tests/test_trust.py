"""Trust what you load: a registered model's bytes are checked wherever they are read, and
`verify` checks every claim a version makes. The faults a hostile or careless hand makes, on a
real MLflow store: a swapped model file, a flipped byte, a truncated file, doctored tags, an
unknown commit, an alias moved between two reads, a `register` killed at each step."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from mlflow import MlflowClient

from conftest import TINY, cli_argv, digits_project, one_error, reprolab
from reprolab import evaluate, register, registry, tags, train
from reprolab.config import load_config

NAME = "trust-test"
OVERRIDES = (*TINY, "tracking.experiment=trust", f"register.model_name={NAME}")


def _project(root: Path, processed_once: Path, *overrides: str):
    if not (root / "params.yaml").exists():
        digits_project(root, processed_once)
    return load_config(root / "params.yaml", [*OVERRIDES, *overrides])


@pytest.fixture(scope="module")
def versions(tmp_path_factory, processed_once):
    """v1 @champion (trained), v2 @challenger (one epoch at a tiny lr): -> the project root."""
    root = tmp_path_factory.mktemp("trust") / "p"
    for overrides in ((), ("train.epochs=1", "train.lr=1e-6")):
        cfg = _project(root, processed_once, *overrides)
        train.run(cfg)
        evaluate.run(cfg)
        register.run(cfg)
    client = MlflowClient()
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(NAME, "challenger").version) == "2"
    return root


def artifact_folder(version: str) -> Path:
    """Where the store keeps a version's model files (its logged model's artifacts)."""
    source = MlflowClient().get_model_version(NAME, version).source
    model = MlflowClient().get_logged_model(source.removeprefix("models:/"))
    return Path(urlparse(model.artifact_location).path)


@pytest.fixture
def tampered(versions):
    """The v1 model folder, put back as it was after the test."""
    folder = artifact_folder("1")
    kept = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    yield folder / "data" / "model.pt2"
    for path, data in kept.items():
        path.write_bytes(data)


def _digit(root: Path) -> Path:
    from PIL import Image

    path = root / "digit.png"
    if not path.exists():
        Image.new("L", (8, 8), 0).save(path)
    return path


def _readers(capsys, root: Path) -> dict[str, tuple[int, str]]:
    """predict on the champion and promote of v1: each (exit code, its one error line)."""
    out = {}
    for command, args in (("predict", ("--model", f"models:/{NAME}@champion",
                                       str(_digit(root)))),
                          ("promote", (NAME, "1"))):
        code, _, err = reprolab(capsys, root, command, *OVERRIDES, args=args)
        out[command] = (code, one_error(err, command) if code else "")
    return out


def test_a_swapped_model_file_is_refused_by_every_reader(versions, tampered, capsys):
    shutil.copyfile(artifact_folder("2") / "data" / "model.pt2", tampered)
    for command, (code, line) in _readers(capsys, versions).items():
        assert code == 2, command
        assert line.startswith(f"models:/{NAME}/1: data/model.pt2: sha256 "), line
        assert "is not the" in line and "recorded at registration" in line
    assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == "1"


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_model_file_is_diagnosed_as_damaged_never_as_pickled(versions, tampered,
                                                                       capsys, damage):
    data = bytearray(tampered.read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x01
    else:
        data = data[: len(data) // 3]
    tampered.write_bytes(bytes(data))
    code, line = _readers(capsys, versions)["predict"]
    assert code == 2 and "changed or damaged since" in line and "pickle" not in line


def test_a_version_registered_without_file_hashes_is_not_loaded(versions, capsys):
    client = MlflowClient()
    files = client.get_model_version(NAME, "2").tags[tags.MODEL_FILES]
    client.delete_model_version_tag(NAME, "2", tags.MODEL_FILES)
    try:
        code, _, err = reprolab(capsys, versions, "predict", *OVERRIDES,
                                args=("--model", f"models:/{NAME}/2", str(_digit(versions))))
        assert code == 2
        assert "registered without file hashes" in one_error(err, "predict")
        code, out, _ = reprolab(capsys, versions, "verify", *OVERRIDES,
                                args=(f"models:/{NAME}/2",))
        assert code == 2 and "cannot verify" in out and "registered without file hashes" in out
    finally:
        client.set_model_version_tag(NAME, "2", tags.MODEL_FILES, files)


def _verify(capsys, root: Path) -> tuple[int, str]:
    code, out, err = reprolab(capsys, root, "verify", *OVERRIDES, args=(f"models:/{NAME}/1",))
    assert not err, err
    return code, out.strip()


@pytest.mark.parametrize("key", [tags.PARAMS_HASH, tags.DATA_MANIFEST, tags.MODEL_HASH,
                                 tags.GIT_COMMIT, tags.TORCH_VERSION, tags.DATA_PROCESSED])
def test_verify_finds_each_doctored_tag(versions, capsys, key):
    client = MlflowClient()
    real = client.get_model_version(NAME, "1").tags[key]
    client.set_model_version_tag(NAME, "1", key, "0" * 40)
    try:
        code, out = _verify(capsys, versions)
    finally:
        client.set_model_version_tag(NAME, "1", key, real)
    assert code == 3
    assert f"differs: tag {key}: the version says 0000000000000000, its training run " in out


@contextlib.contextmanager
def _forged_on_version_and_run(key: str, value: str):
    """v1 and its training run both claim `value` for tag `key` (they agree: only the claim's
    own check can find it); put back afterwards."""
    client = MlflowClient()
    version = client.get_model_version(NAME, "1")
    real = version.tags[key]
    client.set_model_version_tag(NAME, "1", key, value)
    client.set_tag(version.run_id, key, value)
    try:
        yield
    finally:
        client.set_model_version_tag(NAME, "1", key, real)
        client.set_tag(version.run_id, key, real)


def test_verify_finds_a_config_that_is_not_the_params_hash(versions, capsys):
    """The version and its run agree on a forged params_hash: the run's config.yaml does not
    hash to it."""
    with _forged_on_version_and_run(tags.PARAMS_HASH, "0" * 64):
        code, out = _verify(capsys, versions)
    assert code == 3 and "differs: params: its run's config.yaml hashes to " in out


def test_verify_cannot_verify_an_unknown_commit_and_says_so(versions, capsys):
    with _forged_on_version_and_run(tags.GIT_COMMIT, "1" * 40):
        code, out = _verify(capsys, versions)
    assert code == 2
    assert "cannot verify: code: commit 111111111111 is not in this repository" in out


def test_verify_refuses_swapped_files_as_a_claim_that_differs(versions, tampered, capsys):
    shutil.copyfile(artifact_folder("2") / "data" / "model.pt2", tampered)
    code, out = _verify(capsys, versions)
    assert code == 3 and "differs: models:/trust-test/1: data/model.pt2: sha256 " in out


def test_an_alias_is_resolved_once_per_load(versions, monkeypatch):
    """`promote` moves @champion between resolving it and reading the files: the load reads
    the version it resolved, classes, shape and weights alike."""
    import torch

    from reprolab.promote import promote

    first, _, _ = registry.load_classifier(f"models:/{NAME}/1")
    download = registry._download

    def promote_then_download(uri, dest):
        monkeypatch.setattr(registry, "_download", download)
        promote(NAME, "2")  # the alias moves to v2 now, after the load resolved it to v1
        return download(uri, dest)

    monkeypatch.setattr(registry, "_download", promote_then_download)
    try:
        model, shape, classes = registry.load_classifier(f"models:/{NAME}@champion")
        assert str(MlflowClient().get_model_version_by_alias(NAME, "champion").version) == "2"
    finally:
        promote(NAME, "1")
    x = torch.rand(3, 1, 8, 8) * 255
    assert torch.equal(model(x), first(x)) and shape == (1, 8, 8) and len(classes) == 10


# ---- a killed `register` leaves the old state or a complete version no alias points to ----

# `register` that kills itself (SIGKILL) after its KILL_AT-th registry write.
DYING = """
import os, signal, sys
from mlflow import MlflowClient
from reprolab import cli

KILL_AT, calls = int(sys.argv[1]), []

def dying(method):
    original = getattr(MlflowClient, method)
    def call(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        calls.append(method)
        if len(calls) == KILL_AT:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(MlflowClient, method, call)

for method in ("create_model_version", "update_model_version", "set_model_version_tag",
               "set_registered_model_alias", "delete_registered_model_alias"):
    dying(method)
sys.exit(cli.main(sys.argv[2:]))
"""


def _state(name: str) -> dict:
    client = MlflowClient()
    model = client.get_registered_model(name)
    out = {"aliases": {k: str(v) for k, v in model.aliases.items()}, "versions": {}}
    for v in client.search_model_versions(f"name = '{name}'"):
        out["versions"][str(v.version)] = {"tags": dict(v.tags), "description": v.description}
    return out


@pytest.mark.slow
def test_register_killed_at_each_step_leaves_old_state_or_an_unaliased_complete_version(
        tmp_path, processed_once, forks):
    """v1 (a poor model) is champion; v2 (a better one) is registered by a `register` that is
    killed after its 1st, 2nd, ... registry write. After each kill every alias points to a
    version whose tags and description are complete; the next `register` ends exactly as an
    uninterrupted one."""
    poor = _project(tmp_path / "p", processed_once, "train.epochs=1", "train.lr=1e-5")
    train.run(poor)
    evaluate.run(poor)
    poor_metrics = poor.metrics_file.read_bytes(), poor.evaluated_file.read_bytes()
    poor_model = poor.model_file.read_bytes()
    good = _project(tmp_path / "p", processed_once)
    train.run(good)
    evaluate.run(good)
    good_files = {p: p.read_bytes() for p in (good.model_file, good.metrics_file,
                                              good.evaluated_file)}
    kills = 0
    for kill_at in range(1, 10):
        name = f"kill-test-{kill_at}"
        # v1: the poor model, champion of a fresh registered model
        good.model_file.write_bytes(poor_model)
        good.metrics_file.write_bytes(poor_metrics[0])
        good.evaluated_file.write_bytes(poor_metrics[1])
        register.run(_project(tmp_path / "p", processed_once, f"register.model_name={name}"))
        before = _state(name)
        for path, data in good_files.items():
            path.write_bytes(data)
        args = cli_argv("register", good.base_dir, *OVERRIDES, f"register.model_name={name}")
        (proc,) = forks.run((DYING, [kill_at, *args], tmp_path))
        if proc.returncode != -signal.SIGKILL:  # fewer writes than that: it finished
            assert proc.returncode == 0, proc.stderr
            break
        kills += 1
        state = _state(name)
        for alias, number in state["aliases"].items():
            version = state["versions"][number]
            assert version["description"] and tags.MODEL_FILES in version["tags"], (kill_at,
                                                                                 alias)
        assert state["aliases"] in (before["aliases"], {"champion": "2"}), kill_at
        decision = register.run(_project(tmp_path / "p", processed_once,
                                         f"register.model_name={name}"))
        settled = _state(name)  # the next run adopted what the kill left
        assert settled["aliases"] == {"champion": "2"} and decision["version"] == "2"
        assert settled["versions"]["1"]["description"].startswith("No alias: ")
        assert settled["versions"]["2"]["description"].startswith("Holds @champion: ")
    assert kills >= 3  # the version, its description, the alias, the former champion's


def test_the_scoring_server_refuses_to_start_on_swapped_files(versions, tampered):
    """`mlflow models serve` loads reprolab's own loader (the model's flavour): it checks the
    files against the logged model's record before it answers anything."""
    import os

    from servers import free_port, scoring_command

    shutil.copyfile(artifact_folder("2") / "data" / "model.pt2", tampered)
    port = free_port()
    proc = subprocess.run(scoring_command(f"models:/{NAME}/1", port),
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                                     f"{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "reprolab: the served model m-" in proc.stderr
    assert "data/model.pt2: sha256 " in proc.stderr
