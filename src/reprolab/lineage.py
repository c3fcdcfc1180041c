"""Lineage: the tags that say what a run or a registered version came from (code, params,
data, platform) and where MLflow's UI finds its source. Part of the tracking layer: it reads
git through MLflow's own helpers, as MLflow's source tags do."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from reprolab import tags as tag
from reprolab.config import Config


def git_state(cwd: Path, outputs: tuple[str, ...] = ()) -> dict[str, str]:
    """The code a run came from: MLflow's own source tags (commit, branch, remote URL without
    credentials; the UI links the commit), and `git.commit` and `git.dirty`, which registry
    versions carry too. `outputs`: DVC outputs that git tracks (the metrics and plot data under
    paths.reports), which do not make the tree dirty."""
    from mlflow.utils import git_utils
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_BRANCH, MLFLOW_GIT_COMMIT, MLFLOW_GIT_REPO_URL

    commit = git_utils.get_git_commit(str(cwd))
    if not commit:
        return {tag.GIT_COMMIT: "none", tag.GIT_DIRTY: "unknown"}
    dirty = _dirty(cwd, outputs)
    state = {tag.GIT_COMMIT: commit, tag.GIT_DIRTY: str(dirty).lower(),
             MLFLOW_GIT_COMMIT: commit}
    # a detached HEAD (verify's worktree) has no branch; a repository without remote no URL
    for key, value in ((MLFLOW_GIT_BRANCH, git_utils.get_git_branch(str(cwd))),
                       (MLFLOW_GIT_REPO_URL, git_utils.get_git_repo_url(str(cwd)))):
        if value:
            state[key] = value
    return state


def _dirty(cwd: Path, outputs: tuple[str, ...]) -> bool:
    """Changes to tracked files, except those DVC makes. MLflow's own dirty check (GitPython's
    is_dirty) would count them: DVC rewrites dvc.lock (and .dvc files) and the outputs that git
    tracks between the stages it runs, which is not a change to the code or params the run came
    from; `dvc exp run -S` edits params.yaml, and the run records the resolved config
    (params_hash, config.yaml), which is what `reprolab verify` rebuilds with."""
    excluded = ("dvc.lock", "*.dvc", "params.yaml", *outputs)
    out = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
         *(f":(exclude){path}" for path in excluded)],
        cwd=cwd, capture_output=True, text=True, check=False,
    )
    return out.returncode == 0 and bool(out.stdout.strip())


def lineage_tags(cfg: Config, meta: dict[str, Any], spec: dict[str, Any] | None = None
                 ) -> dict[str, str]:
    """What a run or a registered version came from: code, params, data and platform; with the
    model's `spec`, the code of your own network and the weights it was fine-tuned from."""
    import torch

    from reprolab.data import processed_digest
    from reprolab.files import sha256_file

    lineage = {
        **git_state(cfg.base_dir, (cfg.paths.reports,)),
        tag.PARAMS_HASH: cfg.params_hash,
        tag.DATA_MANIFEST: meta["manifest_sha256"],
        tag.DATA_PROCESSED: processed_digest(meta),
        tag.DATASET: meta["dataset"],
        tag.TORCH_VERSION: torch.__version__,
        tag.CPU_CAPABILITY: torch.backends.cpu.get_cpu_capability(),
    }
    if spec and spec.get("code_sha256"):
        lineage[tag.MODEL_CODE] = spec["code_sha256"]
    if spec and spec.get("pretrained"):
        lineage[tag.PRETRAINED] = spec["pretrained"]["source"]
        lineage[tag.PRETRAINED_SHA] = spec["pretrained"]["sha256"]
    lock = cfg.base_dir / "dvc.lock"
    if lock.is_file():  # as DVC had written it when the stage started
        lineage[tag.DVC_LOCK] = sha256_file(lock)
    for env, name in (("DVC_STAGE", tag.DVC_STAGE), ("DVC_EXP_NAME", tag.DVC_EXP)):
        if os.environ.get(env):
            lineage[name] = os.environ[env]
    return lineage


def source_tags(stage: str) -> dict[str, str]:
    """MLflow's source name as the stage's module in the repository (with the git commit tag,
    the UI can link it), instead of the console script's path inside a virtual environment."""
    module = "data/" + stage if stage in ("fetch", "preprocess") else stage
    return {tag.SOURCE_NAME: f"src/reprolab/{module}.py", tag.SOURCE_TYPE: "LOCAL"}
