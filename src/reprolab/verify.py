"""`reprolab verify MODEL_URI`: rebuild a registered model from its recorded commit and compare.

The version's tags say where it came from (git commit, params hash, data hashes, torch version,
device, CPU capability, model sha256); its training run holds the resolved config. The rebuild
happens in a temporary git worktree of that commit, with that config as params.yaml, this
repository's DVC cache (and remote) for the data, and a throwaway MLflow store, so that checking
a model adds nothing to the team's runs. `train` runs for real (forced); the stages before it are
restored from the cache when DVC has them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from reprolab import tags as tag
from reprolab.config import Config
from reprolab.data import load_meta, processed_digest
from reprolab.errors import DataError, ReprolabError
from reprolab.files import sha256_file

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Verdict:
    identical: bool
    registered: str  # the registered model's sha256
    rebuilt: str | None  # None when no rebuild was possible
    reasons: list[str]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise ReprolabError(f"verify: `{' '.join(cmd)}` failed in {cwd}: {tail[0]}")
    return proc.stdout


@contextlib.contextmanager
def worktree(repo: Path, commit: str) -> Iterator[Path]:
    """A detached git worktree of `commit`, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="reprolab-verify-") as tmp:
        path = Path(tmp) / "src"
        _run(["git", "worktree", "add", "--detach", str(path), commit], repo)
        try:
            yield path
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=repo,
                           capture_output=True)
            subprocess.run(["git", "worktree", "prune"], cwd=repo, capture_output=True)


def rebuild(repo: Path, commit: str, config: dict[str, Any], store: Path
            ) -> tuple[Path, dict[str, Any]]:
    """Train again at `commit` with `config`; -> (the rebuilt model file, its data's meta)."""
    with worktree(repo, commit) as tree:
        (tree / "params.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if not k.startswith("DVC_")}
        bin_dir = str(Path(sys.executable).parent)
        env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
                   MLFLOW_TRACKING_URI=f"sqlite:///{store / 'mlflow.db'}")
        dvc = [str(Path(bin_dir) / "dvc")]
        # this repository's cache: data and upstream outputs it already has are not rebuilt
        _run([*dvc, "config", "--local", "cache.dir", str(repo / ".dvc" / "cache")], tree, env)
        with contextlib.suppress(ReprolabError):  # no remote, or it lacks something: rebuilt
            _run([*dvc, "pull", "--allow-missing", "-q"], tree, env)
        _run([*dvc, "repro", "tune"], tree, env)
        _run([*dvc, "repro", "--force", "--single-item", "train"], tree, env)
        model = tree / config["paths"]["models"] / "model.pt"
        kept = store / "model.pt"
        model.replace(kept)  # the worktree goes away
        return kept, load_meta(tree / config["paths"]["processed"])


def params_hash(config: dict[str, Any]) -> str:
    """The params_hash of a recorded config (Config.params_hash), from the mapping itself: a
    config written by an earlier version of reprolab may not validate any more."""
    import hashlib
    import json

    blob = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def likely_reasons(tags: dict[str, str], config: dict[str, Any], meta: dict[str, Any]
                   ) -> list[str]:
    """What differs between where the version was built and this rebuild."""
    import torch

    from reprolab.device import select_device

    here = {
        "params": params_hash(config),
        "data": meta["manifest_sha256"],
        "processed data": processed_digest(meta),
        "torch version": torch.__version__,
        "device": str(select_device(config["train"]["device"])),
        "CPU capability": torch.backends.cpu.get_cpu_capability(),
    }
    recorded = {"params": tags.get(tag.PARAMS_HASH), "data": tags.get(tag.DATA_MANIFEST),
                "processed data": tags.get(tag.DATA_PROCESSED),
                "torch version": tags.get(tag.TORCH_VERSION), "device": tags.get(tag.DEVICE),
                "CPU capability": tags.get(tag.CPU_CAPABILITY)}
    return [f"{what} {recorded[what]} (registered) vs {here[what]} (here)"
            for what in here if recorded[what] is not None and recorded[what] != here[what]]


def run(cfg: Config, model_uri: str) -> Verdict:
    from reprolab import registry, tracking

    tracking.configure(cfg)
    version = registry.registered_version(model_uri)
    tags = version["tags"]
    registered = tags.get(tag.MODEL_HASH)
    commit = tags.get(tag.GIT_COMMIT, "none")
    if not registered:
        raise DataError(f"{model_uri}: version {version['version']} has no {tag.MODEL_HASH} tag "
                        "(registered before reprolab recorded it); nothing to compare with")
    if commit == "none":
        return Verdict(False, registered, None, ["code: not built from a git commit"])
    if tags.get(tag.GIT_DIRTY) == "true":
        return Verdict(False, registered, None, [
            f"code: built from uncommitted changes on top of {commit[:12]}; the commit alone "
            "cannot rebuild it"])
    config = yaml.safe_load(tracking.run_artifact_text(version["run_id"], "config.yaml"))
    with tempfile.TemporaryDirectory(prefix="reprolab-verify-store-") as store:
        model, meta = rebuild(cfg.base_dir, commit, config, Path(store))
        rebuilt = sha256_file(model)
    if rebuilt == registered:
        return Verdict(True, registered, rebuilt, [])
    reasons = likely_reasons(tags, config, meta) or [
        "none of code, params, data, torch version, device or CPU capability differ: "
        "nondeterministic training (on a GPU, set train.deterministic: true)"]
    return Verdict(False, registered, rebuilt, reasons)


def main(cfg: Config, args: Any) -> int:
    verdict = run(cfg, args.model_uri)
    if verdict.identical:
        print(f"verify: {args.model_uri}: identical (model sha256 {verdict.registered[:12]})")
        return 0
    rebuilt = f", rebuilt {verdict.rebuilt[:12]}" if verdict.rebuilt else ""
    print(f"verify: {args.model_uri}: differs (registered {verdict.registered[:12]}{rebuilt}); "
          f"likely reason: {'; '.join(verdict.reasons)}")
    return 1
