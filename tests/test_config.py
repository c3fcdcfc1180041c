"""Config validation: every bad value is one line naming the key, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reprolab import cli
from reprolab.config import load_config
from reprolab.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

BAD = [
    # (override, text the message must contain)
    ("train.lr=0", "train.lr = 0"),
    ("train.lr=-1", "train.lr = -1"),
    ("train.lr=abc", "train.lr = 'abc'"),
    ("train.lr=true", "train.lr = True"),
    ("train.epochs=0", "train.epochs = 0"),
    ("train.epochs=2.5", "train.epochs = 2.5"),
    ("train.optimizer=lion", "'sgd', 'adam', 'adamw' or 'rmsprop'"),
    ("train.device=gpu", "train.device = 'gpu'"),
    ("train.use_tuned=maybe", "train.use_tuned = 'maybe'"),
    ("data.dataset=imagenet", "data.dataset = 'imagenet'"),
    ("data.val_fraction=0", "data.val_fraction = 0"),
    ("data.val_fraction=1", "data.val_fraction = 1"),
    ("data.val_fraction=0.85", "data.val_fraction + data.test_fraction"),
    ("model.name=vit", "model.name = 'vit'"),
    ("tune.optimizers=[]", "tune.optimizers = []"),
    ("tune.optimizers=[adam,lion]", "tune.optimizers.1 = 'lion'"),
    ("tune.lr_low=0.5", "tune.lr_low = 0.5 is not below tune.lr_high"),
    ("tune.n_trials=0", "tune.n_trials = 0"),
    ("register.metric=loss", "register.metric = 'loss'"),
    ("register.enabled=maybe", "register.enabled = 'maybe'"),
    ("register.model_name=team/a", "register.model_name = 'team/a': not usable in models:/"),
    ("register.model_name=a@b", "allowed: a name without '/', '@' or ':'"),
    ("register.model_name=''", "register.model_name = ''"),
    ("train.lr_max=1", "unknown key train.lr_max; allowed keys here: optimizer, lr,"),
    ("trian.lr=1", "unknown key trian; did you mean train?"),
    ("seed.value=1", "seed is a value, not a section"),
    ("train.lr", "expected key.path=value"),
]


@pytest.mark.parametrize(("override", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_override_is_refused_naming_the_key(override, expected, tmp_path, capsys, monkeypatch):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))

    code = cli.main(["train", "-S", override])

    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_numeric_strings_are_accepted_for_float_fields(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    text = (REPO / "params.yaml").read_text().replace("lr: 1.0e-3", "lr: 1e-3")
    assert yaml.safe_load(text)["train"]["lr"] == "1e-3"  # YAML 1.1 reads it as a string
    (tmp_path / "params.yaml").write_text(text)
    cfg = load_config(tmp_path / "params.yaml")
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.tune.lr_high == pytest.approx(params["tune"]["lr_high"])
    assert load_config(tmp_path / "params.yaml", ["train.lr=3e-4"]).train.lr == pytest.approx(3e-4)


def test_int_fields_refuse_numeric_strings():
    with pytest.raises(ConfigError, match=r"train.epochs = '5'"):
        load_config(REPO / "params.yaml", ["train.epochs='5'"])


def test_the_repository_params_load_and_are_frozen():
    cfg = load_config(REPO / "params.yaml")
    assert cfg.data.dataset == "digits"
    assert cfg.model.name == "simple_cnn"
    assert set(cfg.tune.optimizers) == {"sgd", "adam", "adamw", "rmsprop"}
    with pytest.raises(Exception, match="frozen"):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_missing_key_in_the_file_is_named(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params["train"]["momentum"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"train.momentum: missing"):
        load_config(tmp_path / "params.yaml")


@pytest.mark.parametrize("section", ["seed", "paths", "data", "model", "train", "tune",
                                     "evaluate", "register", "tracking"])
def test_every_section_is_required(tmp_path, section):
    """`register` too, whose name pydantic would otherwise default to ABCMeta.register."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    del params[section]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=rf"params.yaml: {section}: missing"):
        load_config(tmp_path / "params.yaml")


def test_invalid_yaml_and_missing_file_are_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line 2\)"):
        load_config(tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")


def test_overrides_reach_nested_values_and_flatten():
    cfg = load_config(REPO / "params.yaml", ["train.lr=0.05", "tune.optimizers=[sgd]"])
    flat = cfg.flat()
    assert flat["train.lr"] == 0.05
    assert flat["tune.optimizers"] == "sgd"
    assert cfg.params_hash != load_config(REPO / "params.yaml").params_hash


def test_stores_resolve_from_dvc_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    cfg = load_config(REPO / "params.yaml")
    assert cfg.mlflow_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert cfg.mlflow_artifact_root == tmp_path / "mlartifacts"
    assert cfg.optuna_journal == tmp_path / "optuna.journal"
    assert cfg.processed_dir == REPO / "data" / "processed"  # outputs stay in the workspace
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.mlflow_uri == "http://127.0.0.1:5000"
    assert cfg.mlflow_artifact_root is None


def test_cli_exit_code_and_help_import_nothing_heavy(tmp_path):
    bad = subprocess.run(
        [sys.executable, "-m", "reprolab", "train", "--params", str(REPO / "params.yaml"),
         "-S", "train.lr=-1"],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f"reprolab train: error: {REPO / 'params.yaml'} with -S overrides: "
        "train.lr = -1: input should be greater than 0"
    )
    probe = subprocess.run(
        [sys.executable, "-c",
         "import sys, contextlib, io\n"
         "from reprolab import cli\n"
         "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
         "    cli.main(['--help'])\n"
         "print(sorted(m for m in ('torch', 'mlflow', 'optuna', 'sklearn', 'pydantic')"
         " if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )
    assert probe.stdout.strip() == "[]"


def test_the_registered_model_name_is_one_per_dataset_unless_named():
    def name(*overrides: str) -> str:
        return load_config(REPO / "params.yaml", list(overrides)).registered_model_name

    assert load_config(REPO / "params.yaml").register.model_name is None
    assert name() == "reprolab-digits"
    assert name("data.dataset=mnist") == "reprolab-mnist"
    assert name("data.dataset=cifar10") == "reprolab-cifar10"
    folder = ["data.dataset=imagefolder"]
    assert name(*folder, "data.image_folder=/data/My Pets/") == "reprolab-imagefolder-My-Pets"
    assert name(*folder, "data.image_folder=~/x/cats.v2") == "reprolab-imagefolder-cats.v2"
    assert name("register.model_name=mine") == "mine"
    assert name("register.model_name=mine", "data.dataset=mnist") == "mine"


def test_version_is_the_packages(capsys):
    import tomllib

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"reprolab {version}"
    from importlib.metadata import version as installed

    assert installed("reprolab") == version


def test_a_stage_starts_without_the_garbage_collector_and_turns_it_on_for_its_work(
        tmp_path, monkeypatch):
    """cli.py keeps the collector off while a stage imports its libraries, io.startup_over turns
    it on (with what is alive frozen) when long work begins, and an in-process caller gets the
    collector back as it was."""
    import gc
    import types

    from reprolab.lifecycle import startup_over

    seen = []

    def probe(cfg, args):
        seen.append(gc.isenabled())
        startup_over()
        seen.append((gc.isenabled(), gc.get_freeze_count() > 0))

    module = types.ModuleType("reprolab_probe_stage")
    module.main = probe
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "probe", (module.__name__, "a probe"))
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert gc.isenabled()
    try:
        assert cli.main(["probe", "-q"]) == 0
        assert seen == [False, (True, True)]
        assert gc.isenabled()
        seen.clear()
        gc.disable()  # a caller that runs with the collector off keeps it off
        assert cli.main(["probe", "-q"]) == 0
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
