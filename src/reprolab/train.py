"""train stage: fit the configured model, track it in MLflow, write models/ and the history.

A crash or a kill resumes where it stopped, in the same MLflow run (`reprolab.checkpoint`); one
trainer at a time, and with train.processes > 1 the torchrun ranks (`reprolab.launch`). Under
torchrun every rank runs this module: rank 0 alone talks to MLflow and writes the checkpoint and
the outputs.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from reprolab import lineage, notes
from reprolab import tags as tag
from reprolab.checkpoint import (
    Checkpointer,
    checkpoint_identity,
    fit_saving,
    log_missing_epochs,
    read_checkpoint,
    resume_state,
)
from reprolab.config import Config, with_tuned
from reprolab.data import load_meta, load_training_data
from reprolab.ddp import from_rank0, same_everywhere, world
from reprolab.device import seed_everything, select_device
from reprolab.engine import FitResult, Hyper
from reprolab.errors import ConfigError
from reprolab.files import (
    atomic_dir,
    check_replaceable,
    sha256_file,
    write_text,
    write_yaml,
)
from reprolab.launch import launch, one_trainer, ranks, worker_args
from reprolab.lifecycle import interrupt_on_sigterm
from reprolab.models import count_parameters, save_checkpoint, with_probabilities
from reprolab.recipe import hyper_for, model_recipe, run_name

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# Timings vary run to run: MLflow has them; history.csv, a DVC output, does not.
VOLATILE = ("train/epoch_seconds", "train/images_per_second")


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str
    hyper: Hyper
    fit: FitResult
    model: torch.nn.Module

    @property
    def history(self) -> list[dict[str, float]]:
        return self.fit.history


def history_csv(history: list[dict[str, float]]) -> str:
    out = io.StringIO()
    fields = [k for k in history[0] if k not in VOLATILE]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def lock_file(cfg: Config) -> Path:
    """Beside the checkpoint it guards, outside the DVC outputs (DVC deletes those first)."""
    return cfg.checkpoint_file.with_suffix(".lock")


def run(cfg: Config, progress: bool = False) -> TrainResult:
    """Train in this process: alone, or as one of torchrun's ranks (see `launch`)."""
    with ranks(select_device(cfg.train.device)) as device:
        # rank 0 holds the lock from reading the checkpoint to deleting it
        lock = one_trainer(lock_file(cfg)) if world()[0] == 0 else contextlib.nullcontext()
        with lock:
            return train_locked(cfg, device, progress)


def train_locked(cfg: Config, device: torch.device, progress: bool) -> TrainResult:
    rank, size = world()
    # before any work, not after it; rank 0 writes the outputs
    from_rank0(lambda: check_replaceable(cfg.models_dir))
    cfg = with_tuned(cfg)  # the config that trains, written to models/config.yaml
    seed_everything(cfg.seed, cfg.train.deterministic)
    # the model first: a net that does not build, or weights that do not fit, is one line
    recipe = model_recipe(cfg, load_meta(cfg.processed_dir))
    model = recipe.build()
    spec = recipe.spec
    # the ranks of this machine share the budget (and, beyond it, one mapping in the page cache)
    meta, train_split, val_split = load_training_data(
        cfg.processed_dir, device, cfg.train.memory_budget_mb,
        int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    model = model.to(device)
    hyper = hyper_for(cfg, cfg.train.epochs, device, meta["shape"], model)
    identity = checkpoint_identity(cfg, hyper, meta, size, spec)
    same_everywhere(identity, "config, data or number of ranks")
    resume = from_rank0(lambda: find_resume(cfg, identity))
    log.info("train: %s on %s (%s%s), %s lr=%.3g (from %s)", cfg.model.name, device,
             hyper.precision, f", {size} ranks" if size > 1 else "", cfg.train.optimizer,
             cfg.train.lr, "tune" if cfg.train.use_tuned else "params")
    with recorded(cfg, meta, spec, model, (train_split, val_split), device, hyper,
                  resume) as (run_id, run_tags):
        run_id = from_rank0(lambda: run_id)
        saver = None
        if rank == 0:  # the run holds the resumed epochs (log_missing_epochs)
            saver = Checkpointer(cfg.checkpoint_file, cfg.train.checkpoint_every_s,
                                 {"identity": identity, "run_id": run_id},
                                 logged=resume["epoch"] if resume else 0)
        result = fit_saving(model, train_split, val_split, hyper, resume, saver, progress)
        model = model.cpu().eval()
        model_uri = ""
        if rank == 0:
            example = val_split.x[:4].cpu().numpy().astype(np.float32)
            try:
                model_uri = publish(cfg, spec, model, result, example, meta, run_tags, run_id,
                                    reuse=resume is not None and resume["run_id"] == run_id,
                                    saver=saver)
            except BaseException:  # the run ends FAILED or KILLED with every epoch in it
                saver.log(result.history, failing=True)
                raise
    if rank == 0:
        cfg.checkpoint_file.unlink(missing_ok=True)  # finished: models/ holds the result
    return TrainResult(run_id, model_uri, hyper, result, model)


def find_resume(cfg: Config, identity: str) -> dict[str, Any] | None:
    """Rank 0: the checkpoint to resume (MLflow configured), None to start afresh."""
    from reprolab import tracking  # rank 0 alone: the others and the launcher never import MLflow

    tracking.configure(cfg)
    return resume_state(cfg.checkpoint_file, read_checkpoint(cfg.checkpoint_file), identity)


@contextlib.contextmanager
def recorded(cfg: Config, meta: dict[str, Any], spec: dict[str, Any], model: torch.nn.Module,
             splits: tuple[Any, Any], device: torch.device, hyper: Hyper,
             resume: dict[str, Any] | None) -> Iterator[tuple[str | None, dict[str, str]]]:
    """Rank 0: the MLflow run of this training (the checkpoint's, when the store has it), with
    its params, tags, note and datasets; -> (its id, its tags). The other ranks log nothing
    (-> None, {})."""
    if world()[0] != 0:
        yield None, {}
        return
    from reprolab import tracking

    resume_run = resume["run_id"] if resume and tracking.run_exists(resume["run_id"]) else None
    if resume and not resume_run:
        log.info("run %s is not in this MLflow store; starting a new run", resume["run_id"])
    size, backend = world()[1], dist.get_backend() if dist.is_initialized() else "none"
    ranks_tags = {tag.WORLD_SIZE: str(size), tag.BACKEND: backend}
    tags = {**lineage.lineage_tags(cfg, meta, spec), **lineage.source_tags("train"),
            tag.DEVICE: str(device), tag.PRECISION: hyper.precision, **ranks_tags}
    with tracking.start_run(run_name(cfg.model.name, cfg.train.optimizer, cfg.train.lr), tags,
                            run_id=resume_run) as run_id:
        tracking.set_tags({tag.NOTE: notes.train(cfg, meta, tags)})
        if resume_run is None:
            tracking.log_params({**cfg.flat(), **ranks_tags,
                                 "train.hparams_source": "tune" if cfg.train.use_tuned else
                                 "params", "model.parameters": count_parameters(model)})
            tracking.log_datasets([
                (data.x.cpu().numpy(), data.y.cpu().numpy(), f"{meta['dataset']}-{split}",
                 cfg.paths.processed, meta["split_sha256"][split], context)
                for (split, context), data in zip((("train", "training"), ("val", "validation")),
                                                  splits, strict=True)])
            if (cfg.base_dir / "dvc.lock").is_file():  # the pipeline state the run belongs to
                tracking.log_artifact(cfg.base_dir / "dvc.lock")
        if resume:  # also into a new run when the checkpoint's run is not in this store
            log_missing_epochs(run_id, resume.get("history", []))
        yield run_id, tags


def publish(cfg: Config, spec: dict[str, Any], model: torch.nn.Module, result: FitResult,
            example: np.ndarray, meta: dict[str, Any], run_tags: dict[str, str], run_id: str,
            reuse: bool, saver: Checkpointer) -> str:
    """Rank 0, after training: the logged model (the plain module, probabilities out), the DVC
    outputs, and the tags and artifacts that tie them to the run, with the last epochs'
    metrics; -> the model's URI."""
    from reprolab import tracking

    # A rerun after a kill between logging the model and finishing finds it logged already.
    model_uri = tracking.logged_model_uri(run_id) if reuse else None
    if model_uri is None:
        model_uri = tracking.log_model(with_probabilities(model), example, meta["classes"])
    files = tracking.record_model_files(model_uri)  # what every reader of it checks
    model_hash = write_outputs(cfg, spec, model, result.history)
    # the DVC outputs name no run: evaluate and register find it by the model's content
    saver.log(result.history, tags={tag.KEPT_EPOCH: str(result.best_epoch),
                                    tag.MODEL_HASH: model_hash, tag.MODEL_URI: model_uri,
                                    tag.MODEL_FILES: files,
                                    tag.NOTE: notes.train(cfg, meta, run_tags, result)})
    for path in (cfg.history_file, cfg.models_dir / CONFIG_FILE):
        tracking.log_artifact(path)
    return model_uri


def write_outputs(
    cfg: Config, spec: dict[str, Any], model: torch.nn.Module, history: list[dict[str, float]],
) -> str:
    """models/ (the model and the resolved config) and the history; -> the model's sha256.

    All pure functions of code, params and data: no run id, path, time or timing inside.
    """
    with atomic_dir(cfg.models_dir) as tmp:
        save_checkpoint(tmp / cfg.model_file.name, spec, model)
        model_hash = sha256_file(tmp / cfg.model_file.name)
        write_yaml(tmp / CONFIG_FILE, cfg.as_dict())
    write_text(cfg.history_file, history_csv(history))
    return model_hash


def main(cfg: Config, args: Any) -> int:
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {cfg.train.device!r}: CUDA is not available here")
    if cfg.train.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device = 'mps': MPS is not available here")
    # SIGTERM ends the run KILLED like Ctrl-C, with a checkpoint of the last finished epoch.
    interrupt_on_sigterm()
    if cfg.train.processes > 1 and "WORLD_SIZE" not in os.environ:  # not under torchrun yet
        # what the ranks would each refuse: one line, before any starts
        check_replaceable(cfg.models_dir)
        with_tuned(cfg)
        return launch(cfg.train.processes, worker_args(args), lock_file(cfg))
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # log lines print above the progress bar, not through it
        result = run(cfg, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":
        last = result.history[-1]
        print(f"train: run {result.run_id}  val/accuracy {last['val/accuracy']:.4f}  "
              f"model {result.model_uri}")
    return 0
