"""One source for each fact: the places that must agree are held together here."""

from __future__ import annotations

import ast

import yaml

from conftest import REPO
from reprolab import tags
from reprolab.config.sections import Train
from reprolab.files import read_json


def test_dvc_yaml_tune_depends_on_exactly_the_train_knobs_that_change_a_trial():
    params = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["tune"]["params"]
    declared = {p.removeprefix("train.") for p in params if str(p).startswith("train.")}
    assert declared == set(Train.trial_knobs())
    # and every knob is said once: no knob in two of the three groups, none in none
    groups = [set(Train.NO_RESULT), set(Train.NOT_IN_TRIALS), set(Train.trial_knobs())]
    assert sum(len(g) for g in groups) == len(Train.model_fields)
    assert set().union(*groups) == set(Train.model_fields)


def test_knobs_that_change_no_result_extend_the_study_others_start_a_new_one(project):
    from reprolab import space

    meta = read_json(project().processed_dir / "meta.json")
    name = space.study_name(project(), meta)
    assert space.study_name(project("train.processes=2"), meta) == name
    assert space.study_name(project("train.checkpoint_every_s=0"), meta) == name
    assert space.study_name(project("train.epochs=7", "train.lr=0.5"), meta) == name
    assert space.study_name(project("train.weight_decay=0.01"), meta) != name


def _tag_values() -> set[str]:
    values = {v for k, v in vars(tags).items() if k.isupper() and isinstance(v, str)}
    return {v for v in values if any(c in v for c in "._/")}  # not a plain word like "device"


def test_no_module_spells_a_tag_name_but_tags_py():
    from reprolab.config import _flatten

    knobs = set(_flatten(yaml.safe_load((REPO / "params.yaml").read_text())))
    names = _tag_values() - knobs  # data.dataset: a knob's name too
    found = []
    for path in (REPO / "src" / "reprolab").rglob("*.py"):
        if path.name == "tags.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not found, "use reprolab.tags: " + "; ".join(found)


def test_the_search_space_is_one_table(project):
    """suggest, the grid and the study's attributes name the same dimensions, in one order."""
    import optuna

    from reprolab import space

    cfg = project("tune.weight_decay=[1e-5, 1e-2]", "tune.momentum=[0.5, 0.9]",
                  "tune.batch_sizes=[32, 64]", "tune.sampler=grid", "tune.grid_points=2")
    keys = [d.key for d in space.search_space(cfg.tune)]
    assert keys == ["lr", "optimizer", "weight_decay", "momentum", "batch_size"]
    trial = optuna.create_study().ask()
    assert list(space.suggest(trial, cfg)) == keys
    assert list(space.study_attributes(cfg, {"dataset": "d", "manifest_sha256": "m",
                                             "split_sha256": {}})["search_space"]) == keys
    assert list(space.make_sampler(cfg, 0)._search_space) == sorted(keys)


def test_the_module_map_names_every_module():
    text = (REPO / "docs" / "code.md").read_text()
    modules = {p.stem for p in (REPO / "src" / "reprolab").rglob("*.py")
               if p.stem not in ("__init__", "__main__")}
    assert not sorted(m for m in modules if f"{m}.py" not in text and m not in text)


def test_mlflow_is_imported_by_the_tracking_layer_only():
    """tracking.py, lineage.py (MLflow's git helpers), registry.py and serving.py (the MLflow
    flavour of reprolab's models)."""
    importers = set()
    for path in (REPO / "src" / "reprolab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "mlflow" or n.startswith("mlflow.") for n in names):
                importers.add(path.name)
    assert importers == {"tracking.py", "lineage.py", "registry.py", "serving.py"}


def test_the_longest_first_order_names_test_files_that_exist():
    from conftest import LONGEST_FIRST

    missing = [name for name in LONGEST_FIRST if not (REPO / "tests" / name).is_file()]
    assert not missing and len(set(LONGEST_FIRST)) == len(LONGEST_FIRST), missing


def test_the_accuracy_the_docs_quote_is_the_committed_one():
    """README.md and the getting-started page quote `make run`'s test accuracy: the committed
    reports/evaluate/metrics.json's, which `make lock` rewrites with dvc.lock."""
    import re

    accuracy = read_json(REPO / "reports" / "evaluate" / "metrics.json")["accuracy"]
    for page in ("README.md", "docs/getting-started.md"):
        text = " ".join((REPO / page).read_text().split())
        (quoted,) = re.findall(r"test accuracy of (?:about )?(0\.\d+)", text)
        assert abs(float(quoted) - accuracy) < 0.0051, (page, quoted, accuracy)
