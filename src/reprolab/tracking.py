"""Runs in MLflow: the store, runs and their tags, metrics, datasets and logged models. With
lineage.py (what a run came from), registry.py (the Model Registry) and serving.py, the only
importers of mlflow."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from reprolab import tags as tag
from reprolab.config import Config

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"


# The experiment tag by which MLflow's UI opens an experiment on its runs (training) rather than
# on traces (GenAI); MLflow sets it itself only for experiments its GenAI features create.
MODEL_DEVELOPMENT = "custom_model_development"
# The run `mlflow run` created for the project, when it launched this command (see configure).
_project_run: str | None = None


def configure(cfg: Config, parent_run: str | None = None) -> str:
    """Point MLflow at the configured store and experiment; -> the experiment id.

    Under `mlflow run`, the experiment is the project run's (`--experiment-name`), and each stage
    nests its own runs under the project run: MLflow hands that run to the command in
    MLFLOW_RUN_ID, and mlflow.start_run() would otherwise resume it in every stage, so that tune,
    its trials and train would all log into one run (and clash on their params).
    `parent_run`: the run whose experiment a spawned tuning worker logs its trials into.
    """
    global _project_run
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    _project_run = os.environ.pop("MLFLOW_RUN_ID", None) or _project_run
    if parent_run or _project_run:
        experiment_id = MlflowClient().get_run(parent_run or _project_run).info.experiment_id
    else:
        experiment_id = _experiment_named(cfg)
    experiment = mlflow.set_experiment(experiment_id=experiment_id)
    if tag.EXPERIMENT_KIND not in experiment.tags:
        MlflowClient().set_experiment_tag(experiment_id, tag.EXPERIMENT_KIND, MODEL_DEVELOPMENT)
    return experiment_id


def _experiment_named(cfg: Config) -> str:
    name = cfg.tracking.experiment
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        root = cfg.mlflow_artifact_root
        location = root.as_uri() if root else None
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except MlflowException:
            if mlflow.get_experiment_by_name(name) is None:
                raise  # not another process creating it first: the store refused
        experiment = mlflow.get_experiment_by_name(name)
    return experiment.experiment_id


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
    from reprolab.lifecycle import drop_interrupted_frames, signals_held

    tags = dict(tags or {})
    if run_id is None and not nested and tag.PARENT_RUN not in tags and _project_run:
        tags[tag.PARENT_RUN] = _project_run  # a stage under `mlflow run`: see configure
    # FAILED until the block has returned: a stop that lands as an error is being handled (a
    # rank whose peer died gets torchrun's SIGTERM then) must not leave the run FINISHED
    run, status = None, "FAILED"
    try:
        # a signal while MLflow creates the run waits until it is created, then ends it KILLED
        # below: cut inside, the run would stay RUNNING with nobody to end it
        with signals_held():
            run = mlflow.start_run(run_id=run_id, run_name=run_name, tags=tags, nested=nested)
            # before MLflow's own handler at exit (they run last registered first)
            atexit.unregister(end_left_runs)
            atexit.register(end_left_runs)
        yield run.info.run_id
        status = "FINISHED"
    except KeyboardInterrupt as exc:
        status = "KILLED"
        drop_interrupted_frames(exc)  # an interrupted write's lock, which the end below needs
        raise
    finally:
        try:
            # a signal now (torchrun stops the other ranks of a failed one with SIGTERM) would
            # cut the run's end short and leave it RUNNING: it waits, and is dropped when an
            # error or an interrupt is ending the run anyway
            with signals_held(reraise=status == "FINISHED"):
                if run is not None:
                    mlflow.end_run(status)
        except Exception as exc:  # noqa: BLE001 - the store failed: keep the error that ended us
            log.info("could not mark run %s %s: %s", run.info.run_id, status,
                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            if status == "FINISHED":
                raise


def end_left_runs() -> None:
    """At exit: a run whose `with` block did not end it (a stop landed before its end was under
    way) ends KILLED. MLflow's own handler at exit would end it FINISHED."""
    with contextlib.suppress(Exception):
        while mlflow.active_run() is not None:
            mlflow.end_run("KILLED")


def training_run_for(model_file: Path, digest: str, experiment: str | None = None
                     ) -> dict[str, Any]:
    """-> {run_id, model_uri, tags} of the training run that wrote `model_file`, whose sha256 is
    `digest` (the caller hashed it already), found in the store MLflow points at (latest
    finished run first, in `experiment` first)."""
    from reprolab.errors import DataError

    client = MlflowClient()
    query = f"tags.`{tag.MODEL_HASH}` = '{digest}' and attributes.status = 'FINISHED'"

    def latest(experiment_ids: list[str]) -> list[Any]:
        return client.search_runs(experiment_ids, query, max_results=1,
                                  order_by=["attributes.start_time DESC"]) if experiment_ids else []

    # this project's experiment first; then any (`mlflow run --experiment-name` trains elsewhere)
    own = mlflow.get_experiment_by_name(experiment) if experiment else None
    runs = latest([own.experiment_id]) if own else []
    if not runs:
        runs = latest([e.experiment_id for e in client.search_experiments()])
    if not runs:
        raise DataError(
            f"{model_file}: no finished training run with {tag.MODEL_HASH} {digest[:12]} in the "
            f"MLflow store {mlflow.get_tracking_uri()}; it lives in the store that trained it (a "
            "team's `mlflow server`, or another clone's mlflow.db): set MLFLOW_TRACKING_URI to "
            "that store, or train again here with `dvc repro --force train`"
        )
    run = runs[0]
    run_tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    run_tags[tag.SOURCE_GIT_COMMIT] = run_tags.get(tag.GIT_COMMIT, "none")
    return {"run_id": run.info.run_id, "model_uri": run.data.tags[tag.MODEL_URI],
            "tags": run_tags}


def run_exists(run_id: str) -> bool:
    try:
        MlflowClient().get_run(run_id)
    except MlflowException:
        return False
    return True


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


def _dataset(features: Any, targets: Any, name: str, source: str, digest: str) -> Any:
    with warnings.catch_warnings():
        # MLflow registers its local-path source twice and warns that the path is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source")
        return mlflow.data.from_numpy(
            features, targets=targets, source=str(source), name=name, digest=digest[:16]
        )


def log_datasets(splits: list[tuple[Any, Any, str, str, str, str]]) -> None:
    """Splits as the active run's inputs, in one call: each (features, targets, name, source,
    digest, context), with MLflow's dataset context (`training`, `validation`). `source` is
    repository-relative and `digest` the split's sha256, so two clones log the same dataset."""
    mlflow.log_inputs([_dataset(*split[:5]) for split in splits],
                      contexts=[split[5] for split in splits], tags_list=[None] * len(splits))


def log_evaluation(run_id: str, model_uri: str, metrics: dict[str, float],
                   test: tuple[Any, Any, str, str, str], artifacts: list[Path],
                   artifact_path: str) -> None:
    """Add the test results to the finished training run: the test split as its input (context
    `evaluation`), the metrics linked to the logged model and to that dataset, so that the
    model's page lists them, and the artifacts. `test` is (features, targets, name, source,
    digest) as for log_datasets."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client, dataset = MlflowClient(), _dataset(*test)
    context = InputTag(key=MLFLOW_DATASET_CONTEXT, value="evaluation")
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), [context])])
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    mlflow.log_metrics(metrics, run_id=run_id, model_id=model_id, dataset=dataset,
                       synchronous=True)
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def log_model(model: Any, input_example: Any, classes: list[str]) -> str:
    """Log a model that takes raw pixels and returns probabilities; -> its model URI.

    MLflow stores it with torch.export (`pt2`), whose loading runs no pickled code, in
    reprolab's flavour (reprolab.serving): MLflow's pytorch flavour, served by a loader that
    checks the files and the pixels.
    """
    import numpy as np
    import torch
    from mlflow.models import Model, infer_signature

    from reprolab import serving

    with torch.no_grad():
        output = model(torch.from_numpy(input_example)).numpy()
    signature = infer_signature(input_example, output.astype(np.float32))
    info = Model.log(
        artifact_path=None,
        name=MODEL_ARTIFACT,
        flavor=serving,
        pytorch_model=model,
        signature=signature,
        input_example=input_example,
        serialization_format="pt2",
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        metadata={"classes": list(classes)},
        # MLflow would load the model back and predict the example to check that it serves (a
        # failure only warns), a third of the run's tracking cost on digits;
        # tests/test_serving.py serves logged models for real
        validate_serving_input=False,
    )
    return info.model_uri


def record_model_files(model_uri: str) -> str:
    """The sha256 of every file of a logged model, as stored (downloaded back), recorded on the
    logged model as tags.MODEL_FILES; -> that JSON, which the training run and every registered
    version of it carry too, and every reader checks."""
    import json
    import tempfile

    from reprolab.registry import file_hashes

    with tempfile.TemporaryDirectory(prefix="reprolab-logged-") as tmp:
        folder = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        files = json.dumps(file_hashes(Path(folder)), sort_keys=True, separators=(",", ":"))
    MlflowClient().set_logged_model_tags(model_uri.removeprefix("models:/"),
                                         {tag.MODEL_FILES: files})
    return files


def run_artifact_text(run_id: str, path: str) -> str:
    """The text of one artifact of a run."""
    import tempfile

    from reprolab.errors import DataError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=tmp)
        except (MlflowException, OSError) as exc:
            raise DataError(f"run {run_id}: no artifact {path} "
                            f"({str(exc).splitlines()[0]})") from None
        return Path(local).read_text()


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
    # one that a failure (a full disk, a lost server) left unfinished is removed: the run ends
    # with exactly one model
    for model in models:
        if model.status != LoggedModelStatus.READY:
            client.delete_logged_model(model.model_id)
    return ready[0].model_uri if ready else None


def model_input_shape(model_uri: str) -> tuple[int, ...]:
    """C x H x W that a logged model takes, from its signature (reads MLmodel only)."""
    info = mlflow.models.get_model_info(model_uri)
    return tuple(int(n) for n in info.signature.inputs.inputs[0].shape[1:])


def run_record(run_id: str) -> dict[str, Any] | None:
    """-> {status, tags, metrics} of a run in this store, or None when it is not there."""
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    return {"status": run.info.status, "tags": dict(run.data.tags),
            "metrics": dict(run.data.metrics)}



def use_store(cfg: Config | None) -> None:
    """The project's store, or without a project (no params.yaml) the one MLFLOW_TRACKING_URI
    names: never MLflow's default, which would create an empty store in the current folder."""
    from reprolab.errors import ConfigError

    if cfg is not None:
        configure(cfg)
    elif os.environ.get("MLFLOW_TRACKING_URI"):
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    else:
        raise ConfigError(
            "no params.yaml here to find the project's MLflow store: run in the project, pass "
            "--params PATH, or set MLFLOW_TRACKING_URI (e.g. sqlite:////path/to/mlflow.db)"
        )


# ---- training's metrics, off the path of every epoch ----


def log_epochs(rows: list[dict[str, float]], tags: dict[str, str] | None = None) -> None:
    """Several epochs' metrics in one call to the active run, each at its row's `epoch` as the
    step (rows may hold only some metrics), with `tags` if any. Training calls it at its
    checkpoints: one call per checkpoint instead of one synchronous call per epoch, and no
    logging thread (MLflow's asynchronous logging adds up to a second to the end of every run,
    waiting on its queue)."""
    import time

    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    metrics = [Metric(key, float(value), now, int(row["epoch"]))
               for row in rows for key, value in row.items() if key != "epoch"]
    run_tags = [RunTag(key, str(value)) for key, value in (tags or {}).items()]
    if metrics or run_tags:
        MlflowClient().log_batch(mlflow.active_run().info.run_id, metrics=metrics,
                                 tags=run_tags)
