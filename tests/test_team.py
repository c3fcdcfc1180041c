"""Working as a team: a real `mlflow server` (PostgreSQL backend, proxied artifacts), several
project copies standing for several machines, and registrations racing with injected delays.

The aliases must not depend on timing: whatever the interleaving, they end where registering the
versions one by one in version order puts them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import REPO, TINY, cli_argv, digits_project, one_error, reprolab, training_run_id
from reprolab import cli, evaluate, predict, register, registry, train, tune
from reprolab.config import load_config
from reprolab.data import fetch, load_split, preprocess
from reprolab.files import sha256_file
from reprolab.gate import Gate, replay
from servers import BIN, mlflow_server, postgres_database, served_probabilities

sys.path.insert(0, str(REPO / "benchmarks"))
from harness import git_copy  # noqa: E402  (the git copy the end-to-end tests use)

pytestmark = pytest.mark.slow


def _project(root: Path, processed_once: Path, *overrides: str):
    """One machine's copy of the project, with the digits data in place."""
    return load_config(digits_project(root, processed_once) / "params.yaml",
                       [*TINY, "tracking.experiment=team", *overrides])


ARTIFACTS: dict[str, Path] = {}  # the server's artifact store (a folder here)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ARTIFACTS["root"] = tmp_path_factory.mktemp("artifacts")
    with mlflow_server(ARTIFACTS["root"]) as uri:
        old = os.environ["MLFLOW_TRACKING_URI"]
        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            yield uri
        finally:
            os.environ["MLFLOW_TRACKING_URI"] = old


# Four machines: two train the very same model (it is registered once), one a better model,
# one a chance-level model.
MACHINES = {
    "good": [],
    "twin": [],
    "better": ["train.epochs=6"],
    "poor": ["train.epochs=1", "train.lr=1e-5"],
}


@pytest.fixture(scope="module")
def machines(server, tmp_path_factory, processed_once):
    root = tmp_path_factory.mktemp("machines")
    out = {}
    for name, overrides in MACHINES.items():
        cfg = _project(root / name, processed_once, *overrides)
        train.run(cfg)
        evaluate.run(cfg)
        out[name] = cfg
    return out


def _run_id(cfg) -> str:
    return training_run_id(cfg)


def _f1(cfg) -> float:
    metrics = json.loads((cfg.report_dir("evaluate") / "metrics.json").read_text())
    return float(f"{metrics['f1_macro']:.6f}")  # as the version tag holds it


def _aliases(name: str) -> dict[str, str | None]:
    """alias -> the sha256 of the model it points at."""
    client = MlflowClient()
    out = {}
    for alias in ("champion", "challenger"):
        try:
            out[alias] = client.get_model_version_by_alias(name, alias).tags["model.sha256"]
        except Exception:  # noqa: BLE001 (MlflowException: the alias is not set)
            out[alias] = None
    return out


def _expected_in_order(models_in_version_order: list[str], f1: dict[str, float]):
    """Registering one by one, by hand: a version is promoted when it beats the running best."""
    champion = challenger = None
    for model in models_in_version_order:
        if champion is None or f1[model] > f1[champion]:
            champion = model
        else:
            challenger = model
    return {"champion": champion, "challenger": challenger}


def test_pipeline_registers_predicts_and_serves_through_a_server(server, machines, capsys):
    cfg = machines["good"]
    name = "team-served"
    cfg = load_config(cfg.base_dir / "params.yaml",
                      [*TINY, "tracking.experiment=team", f"register.model_name={name}"])
    decision = register.run(cfg)
    assert decision["alias"] == "champion" and decision["champion"] == decision["version"]
    version = MlflowClient().get_model_version_by_alias(name, "champion")
    assert version.run_id == _run_id(cfg)
    # the artifacts went through the server's proxy, not to a local path of this machine
    assert version.source.startswith("models:/m-")

    test = load_split(cfg.processed_dir, "test")
    images = cfg.base_dir / "images"
    images.mkdir()
    from PIL import Image

    files = []
    for i in range(4):
        files.append(images / f"{i}.png")
        Image.fromarray(test.x[i, 0].numpy(), "L").save(files[-1])
    code = cli.main(["predict", "-q", "--json", "--params", str(cfg.base_dir / "params.yaml"),
                     "--model", f"models:/{name}@champion", *map(str, files)])
    assert code == 0
    local = predict.run(f"models:/{name}@champion", [str(f) for f in files], cfg)

    batch = np.stack([predict.load_image(f, (1, 8, 8)) for f in files])
    served = served_probabilities(f"models:/{name}@champion", batch,
                                  {**os.environ, "MLFLOW_TRACKING_URI": server})
    np.testing.assert_allclose(served, [p.probabilities for p in local], atol=1e-6)

    # a byte flipped in the server's artifact store: refused by the reader, through the server
    model_id = version.source.removeprefix("models:/")
    (pt2,) = [p for p in ARTIFACTS["root"].rglob("model.pt2") if model_id in str(p)]
    kept = pt2.read_bytes()
    pt2.write_bytes(kept[:100] + bytes([kept[100] ^ 1]) + kept[101:])
    try:
        code, _, err = reprolab(capsys, cfg.base_dir, "predict", *TINY, "tracking.experiment=team",
                                f"register.model_name={name}",
                                args=("--model", f"models:/{name}@champion", str(files[0])))
    finally:
        pt2.write_bytes(kept)
    assert code == 2 and "data/model.pt2: sha256 " in one_error(err, "predict")


# Patches the registry calls of one `reprolab register` process with seeded random pauses before
# each step: reading the versions, creating its version, setting an alias.
RACER = textwrap.dedent("""
    import random, sys, time
    from reprolab import cli, registry
    rng = random.Random(int(sys.argv[1]))
    def delayed(fn):
        def call(*args, **kwargs):
            time.sleep(rng.uniform(0, 0.8))
            return fn(*args, **kwargs)
        return call
    for step in ("model_versions", "register_version", "set_alias"):
        setattr(registry, step, delayed(getattr(registry, step)))
    sys.exit(cli.main(sys.argv[2:]))
""")


def _race(forks, machines, name: str, seed: int, *more) -> list[subprocess.CompletedProcess]:
    """One `reprolab register` per machine, all at once with the `more` jobs (forks:
    tests/forks.py); -> the results, `more`'s first."""
    jobs = list(more)
    for i, cfg in enumerate(machines.values()):
        args = [str(seed * 100 + i), *cli_argv("register", cfg.base_dir, *TINY,
                                                "tracking.experiment=team",
                                                f"register.model_name={name}")]
        jobs.append((RACER, args, cfg.base_dir))
    return forks.run(*jobs)


@pytest.mark.parametrize("seed", [1, 2])
def test_racing_registrations_end_as_registering_in_version_order(server, machines, seed, forks):
    name = f"team-race-{seed}"
    procs = _race(forks, machines, name, seed)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient()
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(
        v.version))
    order = [v.tags["model.sha256"] for v in versions]
    by_model = {sha256_file(cfg.model_file): cfg for cfg in machines.values()}
    # good and twin trained the very same model: one version, also when both created theirs
    assert sorted(order) == sorted(by_model)
    f1 = {model: _f1(cfg) for model, cfg in by_model.items()}
    expected = _expected_in_order(order, f1)
    assert _aliases(name) == expected
    assert f1[expected["champion"]] == max(f1.values())
    # every process reports the registry's final state, not its own guess
    champion = versions[order.index(expected["champion"])].version
    for cfg in machines.values():
        decision = json.loads((cfg.report_dir("register") / "decision.json").read_text())
        assert decision["champion"] == str(champion)

    # the same models registered one by one, in the version order, into another model name
    sequential = f"team-sequential-{seed}"
    for model in order:
        cfg = by_model[model]
        register.run(load_config(cfg.base_dir / "params.yaml", [
            *TINY, "tracking.experiment=team", f"register.model_name={sequential}"]))
    assert _aliases(sequential) == expected


def test_an_alias_given_for_the_first_time_by_two_processes_at_once(monkeypatch, tmp_path):
    """MLflow sets an alias by a read, then an insert: two registers giving a model its first
    champion at once both insert, and PostgreSQL refuses the second (seen in the race above).
    Injected for certain: the other process's row lands between this one's read and insert."""
    from mlflow.store.model_registry.dbmodels.models import SqlRegisteredModelAlias
    from sqlalchemy import create_engine, event, text

    with postgres_database() as uri:
        # the store reprolab's registry calls open: a stage run earlier in this process may have
        # set MLflow's URIs, which come before the environment
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
        monkeypatch.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", uri)
        client = MlflowClient(uri, registry_uri=uri)
        client.create_registered_model("first-alias")
        for _ in range(2):
            client.create_model_version("first-alias", str(tmp_path), run_id=None)
        other = create_engine(uri)
        inserted = []

        def the_other_process_first(mapper, connection, target):
            if not inserted:
                with other.begin() as conn:
                    conn.execute(text("INSERT INTO registered_model_aliases (name, alias, version) "
                                      "VALUES ('first-alias', 'champion', 1)"))
                inserted.append(True)

        event.listen(SqlRegisteredModelAlias, "before_insert", the_other_process_first)
        try:
            assert registry.set_alias("first-alias", "champion", "2")
        finally:
            event.remove(SqlRegisteredModelAlias, "before_insert", the_other_process_first)
            other.dispose()
        assert inserted
        assert client.get_model_version_by_alias("first-alias", "champion").version == 2


def _with_promotion(order: list[str], f1: dict[str, float], promoted: str, after: int):
    """By hand: registering in version order, with `promoted` made champion after version
    number `after` (gated against from then on)."""
    champion = challenger = None
    for number, model in enumerate(order, start=1):
        if champion is None or f1[model] > f1[champion]:
            champion = model
        else:
            challenger = model
        if number == after:
            champion, challenger = promoted, None if challenger == promoted else challenger
    return {"champion": champion, "challenger": challenger}


def test_a_promotion_by_hand_races_registrations_and_the_next_register_keeps_it(
        server, machines, forks):
    name = "team-promote"
    poor, good = machines["poor"], machines["good"]
    for cfg in (poor, good):  # v1 poor, v2 good (champion)
        register.run(load_config(cfg.base_dir / "params.yaml", [
            *TINY, "tracking.experiment=team", f"register.model_name={name}"]))
    assert _aliases(name)["champion"] == sha256_file(good.model_file)

    # every machine registers while someone promotes v1 (poor) by hand, in any interleaving
    promoter = (RACER, ["7", "promote", "-q", "--params", str(poor.base_dir / "params.yaml"),
                        name, "1"], poor.base_dir)
    for proc in _race(forks, machines, name, 3, promoter):
        assert proc.returncode == 0, proc.stderr[-3000:]

    client = MlflowClient()
    versions = sorted(client.search_model_versions(f"name = '{name}'"),
                      key=lambda v: int(v.version))
    order = [v.tags["model.sha256"] for v in versions]
    by_model = {sha256_file(cfg.model_file): cfg for cfg in machines.values()}
    assert sorted(order) == sorted(set(by_model))  # twin's model is good's: one version
    f1 = {model: _f1(cfg) for model, cfg in by_model.items()}
    (entry,) = versions[0].tags["reprolab.promotions"].split()
    after = int(entry.partition("@")[0])
    assert after in range(2, len(order) + 1)  # whenever it came, it came after v2
    expected = _with_promotion(order, f1, order[0], after)
    assert _aliases(name) == expected
    champion = versions[order.index(expected["champion"])]
    assert champion.description.startswith("Holds @champion: ")
    for version in versions:
        if version.version != champion.version and order[int(version.version) - 1] != \
                expected["challenger"]:
            assert version.description.startswith("No alias: "), version.description

    # the next register (of a model registered already) replays the promotion: it stays
    register.run(load_config(good.base_dir / "params.yaml", [
        *TINY, "tracking.experiment=team", f"register.model_name={name}"]))
    assert _aliases(name) == expected


def test_replay_is_the_gate_applied_in_version_order():
    def version(v, f1, data="d"):
        return {"version": str(v), "tags": {"test/f1_macro": str(f1),
                                            "data.manifest_sha256": data}}

    # out of order on input; v3 ties v2 (not better), v4 is on other data (versions registered
    # before reprolab recorded test split hashes are known by their data's manifest): v2 is not
    # scored on it yet, so v2 stays and the replay says what it needs; v5 has no tags
    versions = [version(3, 0.9), version(1, 0.5), version(2, 0.9), version(4, 0.99, "other"),
                {"version": "5", "tags": {}}]
    result = replay(versions, Gate("f1_macro"))
    assert (result.champion, result.challenger) == ("2", "4")
    assert [result.verdicts[str(v)][0] for v in range(1, 6)] == [True, True, False, False, False]
    assert "has no score on this version's test split" in result.verdicts["4"][1]
    assert [(n.champion, n.version) for n in result.needs] == [("2", "4")]
    assert "no test/f1_macro tag" in result.verdicts["5"][1]
    # min_delta: 0.4 more is needed, so v2 stays challenger and v1 champion
    result = replay(versions[:3], Gate("f1_macro", 0.4))
    assert (result.champion, result.challenger) == ("1", "3")
    assert replay([], Gate("f1_macro")).champion is None


@pytest.mark.e2e
def _photos(folder: Path, first: int, count: int) -> None:
    """`count` digits per class (0, 1, 2) from the `first` of each, as 8x8 PNGs in class folders:
    a folder of photos, as a user keeps one."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    for label, name in enumerate(("zero", "one", "two")):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in np.flatnonzero(bunch.target == label)[first:first + count]:
            Image.fromarray(pixels[i], "L").save(folder / name / f"{i:04d}.png")


def test_data_that_grows_through_dvc_repro_against_the_server(server, tmp_path):
    """docs/growth.md as written: v1 on a folder of photos; images added; `dvc repro` trains v2,
    and register re-scores v1 on v2's test split (recorded on v1) and promotes v2 only when it
    beats that score; a second `register`, and a replay from another machine through the
    server, give the same aliases. Everything goes to the team's server. v1's pipeline runs
    in this process, stage by stage as `dvc repro` runs them (test_e2e.py runs `dvc repro` from
    nothing): six processes fewer, about 20 CPU-seconds of imports."""
    name = "team-growth"
    dest = git_copy(tmp_path, {"train": {"epochs": 3}, "tune": {"n_trials": 1, "epochs": 1},
                               "register": {"model_name": name},
                               "data": {"dataset": "imagefolder", "image_folder": "photos",
                                        "val_fraction": 0.25, "test_fraction": 0.25}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", MLFLOW_TRACKING_URI=server)

    def repro() -> subprocess.CompletedProcess:
        proc = subprocess.run([str(BIN / "dvc"), "repro"], cwd=dest, env=env,
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    _photos(dest / "photos", 0, 24)
    cfg = load_config(dest / "params.yaml")
    for stage in (fetch, preprocess, tune, train, evaluate, register):
        stage.run(cfg)
    client = MlflowClient()
    v1 = client.get_model_version_by_alias(name, "champion")
    assert str(v1.version) == "1" and v1.source.startswith("models:/m-")
    assert v1.tags["model.sha256"] == sha256_file(dest / "models/model.pt")

    _photos(dest / "photos", 24, 24)  # the data grew: 24 more images of each class
    second = repro()
    for stage in ("fetch", "preprocess", "tune", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in second.stdout
    assert not (dest / "mlflow.db").exists()  # everything went to the server
    decision = json.loads((dest / "reports/register/decision.json").read_text())
    assert decision["version"] == "2"
    test = json.loads((dest / "data/processed/meta.json").read_text())["split_sha256"]["test"]
    v1_tags = client.get_model_version(name, "1").tags
    rescored = float(v1_tags[f"rescored/{test[:16]}/f1_macro"])  # recorded on v1
    assert "re-scored on this version's test split" in decision["reason"]
    assert decision["promoted"] == (decision["value"] > rescored)
    assert decision["paired"]["against"] == "1" and decision["paired"]["interval_95"]
    expected = "2" if decision["promoted"] else "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == expected

    again = register.run(load_config(dest / "params.yaml"))  # a second `register`, in-process
    assert again == decision
    assert json.loads((dest / "reports/register/decision.json").read_text()) == decision
    # another machine, through the server: the replay of the registry gives the same aliases
    result = replay(registry.model_versions(name), Gate("f1_macro"))
    aliases = client.get_registered_model(name).aliases
    assert {k: str(v) for k, v in aliases.items()} == {
        k: v for k, v in (("champion", result.champion), ("challenger", result.challenger)) if v}
