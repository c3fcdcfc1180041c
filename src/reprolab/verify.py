"""`reprolab verify MODEL_URI`: check every claim a registered version makes, and rebuild its
model from its recorded commit to compare.

The claims, cheapest first, and the first that fails is the answer:
1. its model files are the ones it recorded (their sha256, tags.MODEL_FILES);
2. its lineage tags are its training run's (for every tag both carry);
3. the resolved config its run saved (config.yaml) hashes to its params_hash;
4. its commit is in this repository, and was clean;
5. the rebuild (a temporary git worktree of that commit, that config as params.yaml, this
   repository's DVC cache and remote for the data, a throwaway MLflow store) reads the data its
   manifest hash names, and trains weights equal to the registered model's, tensor by tensor
   (an exported file carries paths and ids that differ between rebuilds; its weights do not).

Exit codes: 0 identical; 2 cannot verify (which claim could not be checked, and why);
3 differs (which claim failed); 1 a fault of the environment.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from reprolab import tags as tag
from reprolab.config import Config
from reprolab.data import load_meta, processed_digest
from reprolab.errors import DataError, ReprolabError

log = logging.getLogger(__name__)

IDENTICAL, CANNOT, DIFFERS = 0, 2, 3
# lineage tags a version copies from its training run: both must say the same
SHARED = (tag.GIT_COMMIT, tag.GIT_DIRTY, tag.PARAMS_HASH, tag.DATA_MANIFEST, tag.DATA_PROCESSED,
          tag.DATASET, tag.TORCH_VERSION, tag.CPU_CAPABILITY, tag.DEVICE, tag.PRECISION,
          tag.MODEL_HASH, tag.MODEL_FILES, tag.MODEL_CODE, tag.PRETRAINED_SHA)


@dataclass(frozen=True)
class Verdict:
    code: int  # IDENTICAL, CANNOT or DIFFERS
    claim: str  # what was found: "identical", or the claim that failed or could not be checked
    reasons: list[str] = field(default_factory=list)  # for a rebuild that differs: likely why


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


def rebuild(repo: Path, commit: str, config: dict[str, Any], store: Path, pretrained: str | None
            ) -> tuple[Path | None, dict[str, Any]]:
    """Train again at `commit` with `config`; -> (the rebuilt model file, its data's meta), or
    (None, {"missing": path}) when the weights it was fine-tuned from are not to be had."""
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
        with contextlib.suppress(ReprolabError):  # what the cache has (the weights): checked out
            _run([*dvc, "checkout", "--allow-missing", "-q"], tree, env)
        if pretrained and not (tree / pretrained).is_file():
            return None, {"missing": pretrained}
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
        "processed data": processed_digest(meta),
        "torch version": torch.__version__,
        "device": str(select_device(config["train"]["device"])),
        "CPU capability": torch.backends.cpu.get_cpu_capability(),
    }
    recorded = {"params": tags.get(tag.PARAMS_HASH),
                "processed data": tags.get(tag.DATA_PROCESSED),
                "torch version": tags.get(tag.TORCH_VERSION), "device": tags.get(tag.DEVICE),
                "CPU capability": tags.get(tag.CPU_CAPABILITY)}
    return [f"{what} {recorded[what]} (registered) vs {here[what]} (here)"
            for what in here if recorded[what] is not None and recorded[what] != here[what]]


def weights_differ(rebuilt: Path, registered: Path) -> str | None:
    """The first weight of the rebuilt checkpoint that is not the registered model's (its pt2,
    the model wrapped with a softmax: keys under `0.`), or None when every tensor is equal."""
    import torch

    mine = torch.load(rebuilt, weights_only=True, map_location="cpu")["state_dict"]
    program = torch.export.load(str(next(registered.rglob("*.pt2"))))
    theirs = {k.removeprefix("0."): v for k, v in program.state_dict.items()}
    theirs.update({k.removeprefix("0."): v for k, v in program.constants.items()
                   if isinstance(v, torch.Tensor)})
    for key, value in mine.items():
        other = theirs.get(key)
        if other is None or other.shape != value.shape or not torch.equal(other, value):
            return key
    return None


def claims_before_rebuild(version: dict[str, Any], run: dict[str, Any] | None,
                          config: dict[str, Any] | None, repo: Path) -> Verdict | None:
    """Claims 2 to 4 (see the module's docstring); None when they all hold."""
    tags = version["tags"]
    if run is None:
        return Verdict(CANNOT, f"its training run {version['run_id']} is not in this store")
    for key in SHARED:
        if key in tags and key in run["tags"] and tags[key] != run["tags"][key]:
            return Verdict(DIFFERS, f"tag {key}: the version says {tags[key][:16]}, its "
                                    f"training run {run['tags'][key][:16]}")
    if config is None:
        return Verdict(CANNOT, "its training run holds no config.yaml")
    if params_hash(config) != tags.get(tag.PARAMS_HASH):
        return Verdict(DIFFERS, f"params: its run's config.yaml hashes to "
                                f"{params_hash(config)[:12]}, the version says "
                                f"{tags.get(tag.PARAMS_HASH, 'nothing')[:12]}")
    commit = tags.get(tag.GIT_COMMIT, "none")
    if commit == "none":
        return Verdict(CANNOT, "code: not built from a git commit")
    known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=repo,
                           capture_output=True).returncode == 0
    if not known:
        return Verdict(CANNOT, f"code: commit {commit[:12]} is not in this repository "
                               "(fetch it, or verify in a clone that has it)")
    if tags.get(tag.GIT_DIRTY) == "true":
        return Verdict(CANNOT, f"code: built from uncommitted changes on top of {commit[:12]}; "
                               "the commit alone cannot rebuild it")
    return None


def run(cfg: Config, model_uri: str) -> Verdict:
    from reprolab import registry, tracking

    tracking.configure(cfg)
    version = registry.registered_version(model_uri)  # an alias: resolved once
    with tempfile.TemporaryDirectory(prefix="reprolab-verify-store-") as store:
        try:
            artifact = registry.fetch_checked(version, Path(store) / "artifact")
        except DataError as exc:
            return Verdict(CANNOT if "without file hashes" in str(exc) else DIFFERS, str(exc))
        run = tracking.run_record(version["run_id"])
        config = None
        with contextlib.suppress(DataError):
            config = yaml.safe_load(tracking.run_artifact_text(version["run_id"], "config.yaml"))
        early = claims_before_rebuild(version, run, config, cfg.base_dir)
        if early is not None:
            return early
        pretrained = config["model"].get("pretrained") if isinstance(
            config["model"].get("pretrained"), str) else None
        model, meta = rebuild(cfg.base_dir, version["tags"][tag.GIT_COMMIT], config,
                              Path(store), pretrained)
        if model is None:
            return Verdict(CANNOT, f"the weights it was fine-tuned from ({meta['missing']}, "
                                   f"sha256 {version['tags'].get(tag.PRETRAINED_SHA, '?')[:12]}) "
                                   "are in neither this repository's DVC cache nor its remote")
        if meta["manifest_sha256"] != version["tags"].get(tag.DATA_MANIFEST):
            return Verdict(DIFFERS, f"data: the rebuild read data with manifest "
                                    f"{meta['manifest_sha256'][:12]}, the version says "
                                    f"{version['tags'].get(tag.DATA_MANIFEST, 'nothing')[:12]}")
        first = weights_differ(model, artifact)
        if first is None:
            return Verdict(IDENTICAL, "identical")
        reasons = likely_reasons(version["tags"], config, meta) or [
            "none of code, params, data, torch version, device or CPU capability differ: "
            "nondeterministic training (on a GPU, set train.deterministic: true)"]
        return Verdict(DIFFERS, f"weights: the rebuilt {first} is not the registered one",
                       reasons)


def main(cfg: Config, args: Any) -> int:
    verdict = run(cfg, args.model_uri)
    if verdict.code == IDENTICAL:
        print(f"verify: {args.model_uri}: identical (every claim checked, the weights rebuilt "
              "tensor by tensor)")
    elif verdict.code == CANNOT:
        print(f"verify: {args.model_uri}: cannot verify: {verdict.claim}")
    else:
        likely = f"; likely reason: {'; '.join(verdict.reasons)}" if verdict.reasons else ""
        print(f"verify: {args.model_uri}: differs: {verdict.claim}{likely}")
    return verdict.code
