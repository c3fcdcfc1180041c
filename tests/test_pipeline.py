"""dvc.yaml cannot drift from the code: each stage declares exactly the modules its command
imports, no stage module imports another, and the committed dvc.lock matches the commit."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from reprolab.cli import READS, STAGES

SRC = REPO / "src"


def module_file(name: str) -> Path | None:
    base = SRC / name.replace(".", "/")
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported(path: Path) -> set[str]:
    """reprolab modules that `path` imports anywhere (module level or inside functions), except
    under `if TYPE_CHECKING:` (annotations only: never run)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # drop the TYPE_CHECKING blocks first
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and \
                node.test.id == "TYPE_CHECKING":
            node.body = []
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "reprolab"}
        elif isinstance(node, ast.ImportFrom) and node.module and \
                node.module.split(".")[0] == "reprolab" and node.level == 0:
            out.add(node.module)
            for alias in node.names:  # `from reprolab import tracking` imports a module
                if module_file(f"{node.module}.{alias.name}"):
                    out.add(f"{node.module}.{alias.name}")
    return out


def closure(*roots: str) -> set[str]:
    """Every reprolab module that importing `roots` runs, packages' __init__ included."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # a package's __init__ runs before its modules
            module = ".".join(parts[:i])
            if module not in seen and module_file(module):
                seen.add(module)
                todo.extend(imported(module_file(module)))
    return seen


def declared_code(stage: str) -> set[str]:
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    return {d for d in deps if d.startswith("src/")}


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_yaml_declares_exactly_the_code_each_stage_runs(stage):
    # `reprolab <stage>` runs the console script's module, then the stage's module
    runs = closure("reprolab.cli", STAGES[stage][0])
    derived = {str(module_file(m).relative_to(REPO)) for m in runs}
    declared = declared_code(stage)
    assert not derived - declared, f"dvc.yaml {stage}: deps missing {sorted(derived - declared)}"
    assert not declared - derived, f"dvc.yaml {stage}: deps not run {sorted(declared - derived)}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_dvc_yaml_declares_the_folders_of_your_code_each_stage_reads(stage):
    """Your network, source and metric are imported by import path (no import statement shows
    them) and the weights are read by path: cli.READS names them, dvc.yaml must declare them."""
    deps = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["deps"]
    yours = {d for d in deps if not d.startswith(("src/", "${paths.raw}", "${paths.processed}",
                                                  "${paths.models}", "${paths.reports}"))}
    assert yours == set(READS[stage])
    for folder in READS[stage]:  # each exists in a fresh clone (DVC refuses a missing dep)
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        path = folder.replace("${paths.weights}", params["paths"]["weights"])
        assert (REPO / path).is_dir() and any((REPO / path).iterdir()), path


@pytest.mark.parametrize("stage", list(STAGES))
def test_no_stage_module_imports_another(stage):
    module = STAGES[stage][0]
    others = {m for s, (m, _) in STAGES.items() if s != stage}
    assert not closure(module) & others, f"{module} imports {sorted(closure(module) & others)}"


def tracked_outputs(lock: dict) -> dict[str, str]:
    """-> {path: md5 in dvc.lock} of the outputs that git keeps: `cache: false` and not ignored
    (the metrics and plot data; register's decision names versions of one store, git ignores
    it)."""
    out = {}
    for spec in lock["stages"].values():
        for entry in spec.get("outs", []):
            path = entry["path"]
            if entry["md5"].endswith(".dir"):  # folders (data, models) are DVC's, never git's
                continue
            ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0
            if not ignored:
                out[path] = entry["md5"]
    return out


@pytest.mark.e2e
def test_committed_lock_matches_the_committed_code_params_and_metrics(tmp_path):
    """In a git copy, `dvc status` may find outputs missing, never a changed dep or param; the
    metrics and plot data that git keeps (a fresh clone's baseline) are the lock's."""
    import hashlib

    sys.path.insert(0, str(REPO / "benchmarks"))
    from harness import git_copy

    dest = git_copy(tmp_path, {})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    proc = subprocess.run([str(Path(sys.executable).parent / "dvc"), "status", "--json"],
                          cwd=dest, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    stale = []
    for stage, changes in json.loads(proc.stdout or "{}").items():
        for change in changes:
            if not isinstance(change, dict):  # "always changed" and the like
                continue
            for path, state in change.get("changed deps", {}).items():
                # a missing data dep is fine in a fresh copy; code or params that differ are not
                if isinstance(state, dict) or state == "modified" or path.startswith("src/"):
                    stale.append(f"{stage}: {path}: {state}")
    lock = yaml.safe_load((dest / "dvc.lock").read_text())
    for path, md5 in tracked_outputs(lock).items():
        have = dest / path
        if not have.is_file() or hashlib.md5(have.read_bytes()).hexdigest() != md5:
            stale.append(f"{path}: not committed, or not the one dvc.lock names")
    assert not stale, ("dvc.lock is stale; run `make lock` and commit it with the metrics and "
                       "plot data (`git add dvc.lock reports/`): " + "; ".join(stale))
