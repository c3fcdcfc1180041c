"""The only module that imports mlflow: runs, lineage tags, models and the registry."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from reprolab.config import Config

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"


def configure(cfg: Config) -> str:
    """Point MLflow at the configured store and experiment; -> the experiment id."""
    uri = cfg.mlflow_uri
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        root = cfg.mlflow_artifact_root
        location = root.as_uri() if root else None
        with contextlib.suppress(MlflowException):  # another process created it first
            mlflow.create_experiment(name, artifact_location=location)
        experiment = mlflow.get_experiment_by_name(name)
    mlflow.set_experiment(experiment_id=experiment.experiment_id)
    return experiment.experiment_id


def git_state(cwd: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=False
        )
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"git.commit": "none", "git.dirty": "unknown"}
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def lineage_tags(cfg: Config, meta: dict[str, Any]) -> dict[str, str]:
    """What a run or a registered version came from: code, params and data."""
    import torch

    tags = {
        **git_state(cfg.base_dir),
        "params_hash": cfg.params_hash,
        "data.manifest_sha256": meta["manifest_sha256"],
        "data.dataset": meta["dataset"],
        "torch.version": torch.__version__,
    }
    for env, tag in (("DVC_STAGE", "dvc.stage"), ("DVC_EXP_NAME", "dvc.exp_name")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


@contextlib.contextmanager
def start_run(
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    nested: bool = False,
    run_id: str | None = None,
) -> Iterator[str]:
    """A run that ends FINISHED, FAILED on an exception, or KILLED on Ctrl-C / SIGTERM.

    Nothing is left RUNNING (short of kill -9, after which `reprolab train` resumes the run).
    """
    run = mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags, nested=nested)
    status = "FINISHED"
    try:
        yield run.info.run_id
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        mlflow.end_run(status)


def run_exists(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


def require_training_run(run_info: dict[str, Any], source: Path) -> None:
    """The run that models/run.json names must be in the store MLflow points at now.

    It is not when the store was deleted or MLFLOW_TRACKING_URI changed since training; DVC may
    then restore models/ from its run-cache without training again.
    """
    if run_exists(run_info["run_id"]):
        return
    from reprolab.errors import DataError

    raise DataError(
        f"{source}: training run {run_info['run_id']} is not in the MLflow store "
        f"{mlflow.get_tracking_uri()} (it was logged to {run_info.get('tracking_uri')}); "
        "train again with `dvc repro --force train` or `reprolab train`"
    )


def log_params(params: dict[str, Any]) -> None:
    mlflow.log_params(params)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """One batched call per epoch, never one per step. Synchronous on purpose: a call costs a
    few milliseconds, while MLflow's async queue adds about a second to the end of every run
    (every tuning trial)."""
    mlflow.log_metrics(metrics, step=step)


def set_tags(tags: dict[str, str]) -> None:
    mlflow.set_tags(tags)


def log_figure(figure: Any, artifact_file: str) -> None:
    mlflow.log_figure(figure, artifact_file)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_dataset(features: Any, targets: Any, name: str, source: Path, digest: str) -> None:
    with warnings.catch_warnings():
        # MLflow registers its local-path source twice and warns that the path is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source")
        dataset = mlflow.data.from_numpy(
            features, targets=targets, source=str(source), name=name, digest=digest[:16]
        )
    mlflow.log_input(dataset, context="training")


def log_model(model: Any, input_example: Any, classes: list[str]) -> str:
    """Log a model that takes raw pixels and returns probabilities; -> its model URI.

    MLflow stores it with torch.export (`pt2`), whose loading runs no pickled code.
    """
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    signature = infer_signature(input_example, output.astype(np.float32))
    info = mlflow.pytorch.log_model(
        model,
        name=MODEL_ARTIFACT,
        signature=signature,
        input_example=input_example,
        serialization_format="pt2",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        metadata={"classes": list(classes)},
    )
    return info.model_uri


def load_classifier(model_uri: str) -> tuple[Any, tuple[int, ...], list[str]]:
    """-> (model, input shape C x H x W, class names) of a logged or registered model."""
    from reprolab.errors import DataError

    try:
        info = mlflow.models.get_model_info(model_uri)
        model = mlflow.pytorch.load_model(model_uri)
    except MlflowException as exc:
        raise DataError(f"--model {model_uri}: {str(exc).splitlines()[0]}") from None
    shape = tuple(info.signature.inputs.inputs[0].shape[1:])
    classes = (info.metadata or {}).get("classes") or []  # models logged without names
    return model, shape, classes


def log_to_run(
    run_id: str, metrics: dict[str, float], artifacts: list[Path], artifact_path: str
) -> None:
    """Add results to a finished run (evaluate adds test/* to the training run)."""
    client = MlflowClient()
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def run_metrics(run_id: str) -> dict[str, float]:
    return MlflowClient().get_run(run_id).data.metrics


# ---- registry ----


def ensure_registered_model(name: str, tags: dict[str, str]) -> dict[str, str]:
    """Create the registered model with `tags` unless it exists; -> its tags as stored."""
    client = MlflowClient()
    with contextlib.suppress(MlflowException):  # it exists, or another process created it first
        client.create_registered_model(name, tags=tags)
    return dict(client.get_registered_model(name).tags)


def register_version(name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Register the run's model once: a second call for the same run returns the same version.

    `model_uri` is the logged model's `models:/m-...` URI. A REST server refuses it as a version
    source unless the call names the logged model too (`model_id`), as mlflow.register_model does.
    """
    client = MlflowClient()
    for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
        return str(version.version)
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(
        name, model_uri, run_id=run_id, tags=tags, model_id=model_id
    )
    return str(version.version)


def model_versions(name: str) -> list[dict[str, Any]]:
    """-> every version of `name` as {version, run_id, tags}, in version order (all pages)."""
    client, token, out = MlflowClient(), None, []
    while True:
        page = client.search_model_versions(f"name = '{name}'", max_results=1000,
                                            page_token=token)
        out += [{"version": str(v.version), "run_id": v.run_id, "tags": dict(v.tags)}
                for v in page]
        token = page.token
        if not token:
            return sorted(out, key=lambda v: int(v["version"]))


def set_alias(name: str, alias: str, version: str | None) -> None:
    """Point `alias` at `version`; None removes the alias."""
    client = MlflowClient()
    if version is not None:
        client.set_registered_model_alias(name, alias, version)
        return
    with contextlib.suppress(MlflowException):  # no such alias: nothing to remove
        client.delete_registered_model_alias(name, alias)


# ---- runs by id (tune) ----


def end_run_by_id(run_id: str, status: str) -> bool:
    """End a run that another process left RUNNING (a tuning worker that died or stalled);
    -> whether it was RUNNING. A run that already ended keeps its status; a run that is not in
    this store (its worker logged elsewhere) is left alone."""
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
        client.set_terminated(run_id, status)
    except MlflowException:
        return False
    return True


# ---- runs by id (train) ----


def logged_steps(run_id: str, keys: list[str]) -> dict[str, set[int]]:
    """-> the steps each metric of the run already holds. MLflow appends a second point for a
    step logged again and has no call to remove one, so a resumed run asks before logging."""
    client = MlflowClient()
    return {key: {m.step for m in client.get_metric_history(run_id, key)} for key in keys}


def logged_model_uri(run_id: str) -> str | None:
    """-> the URI of a model the run has already logged completely (READY), or None.

    A run resumed after a kill between logging its model and finishing reuses it instead of
    logging a second model on the same run.
    """
    from mlflow.entities import LoggedModelStatus

    client = MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    models = client.search_logged_models(
        [experiment], filter_string=f"source_run_id = '{run_id}'"
    )
    ready = [m for m in models if m.status == LoggedModelStatus.READY]
    return ready[0].model_uri if ready else None
