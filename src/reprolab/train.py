"""train stage: fit the configured model, track it in MLflow, write models/ and the history.

After every epoch the complete training state goes to an atomic checkpoint outside the DVC
outputs; `reprolab train` after a crash resumes from it when the config matches, continues the
same MLflow run, and ends with the weights an uninterrupted run would have had. One trainer at a
time: a lock file beside the checkpoint refuses a second one while the first runs.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reprolab import tracking
from reprolab.config import Config, with_tuned
from reprolab.data import load_training_data, processed_digest
from reprolab.engine import FitResult, Hyper, fit, seed_everything, select_device
from reprolab.errors import ConfigError, ReprolabError
from reprolab.io import (
    LockHeld,
    atomic_dir,
    atomic_path,
    check_replaceable,
    exclusive_lock,
    sha256_file,
    write_text,
    write_yaml,
)
from reprolab.models import build, count_parameters, save_checkpoint, with_probabilities
from reprolab.recipe import hyper_for, run_name, spec_for

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.csv"
CURVE_FILE = "learning_curve.png"
# Timings vary run to run: MLflow has them; history.csv, a DVC output, does not.
VOLATILE = ("train/epoch_seconds", "train/images_per_second")


class TrainerBusy(ReprolabError):
    """Another `reprolab train` is training the same project. Exit code 2."""

    exit_code = 2


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


def write_learning_curve(path: Path, history: list[dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key in ("train/loss", "val/loss"):
        left.plot(epochs, [row[key] for row in history], label=key)
    for key in ("train/accuracy", "val/accuracy"):
        right.plot(epochs, [row[key] for row in history], label=key)
    for ax, title in ((left, "loss"), (right, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def checkpoint_identity(cfg: Config, hyper: Hyper, meta: dict[str, Any]) -> str:
    """What must match for a checkpoint to be resumed: the resolved config (tuned values
    included), the engine's settings on this device, the data."""
    blob = f"{cfg.params_hash}|{hyper}|{meta['manifest_sha256']}"
    return hashlib.sha256(blob.encode()).hexdigest()


def lock_file(cfg: Config) -> Path:
    """Beside the checkpoint it guards, outside the DVC outputs (DVC deletes those first)."""
    return cfg.checkpoint_file.with_suffix(".lock")


@contextlib.contextmanager
def one_trainer(path: Path) -> Iterator[None]:
    """Refuse a second trainer of the same project while one runs. After a kill -9 of
    `dvc repro` its `reprolab train` child goes on as an orphan; a second trainer would resume
    the same checkpoint into the same MLflow run and both would log every epoch."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(path))
        except LockHeld as held:
            pid = held.pid or "unknown"
            raise TrainerBusy(
                f"another `reprolab train` (pid {pid}) is training this project (lock {path}); "
                f"wait for it to finish, or stop it (kill {pid}) and run train again"
            ) from None
        yield


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The resume checkpoint, or None. One that cannot be read (truncated by a full disk,
    flipped bytes) is moved aside with a warning and training starts over: never a traceback,
    never a checkpoint that blocks `train` until someone deletes it."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(state, dict) or "epoch" not in state:
            raise ValueError("not a reprolab checkpoint")
        return state
    except Exception as exc:  # noqa: BLE001 - zip, unpickling and tensor errors all mean "corrupt"
        aside = next(path.with_name(f"{path.name}.corrupt-{n}") for n in itertools.count(1)
                     if not path.with_name(f"{path.name}.corrupt-{n}").exists())
        path.replace(aside)
        log.warning("checkpoint %s is unreadable (%s); moved to %s, training from the start",
                    path, type(exc).__name__, aside.name)
        return None


def resume_state(path: Path, state: dict[str, Any] | None, identity: str) -> dict[str, Any] | None:
    """-> the checkpoint to resume from, or None. MLflow must be configured: the run of a
    checkpoint discarded for another config can never be resumed, so it ends KILLED."""
    if state is None:
        return None
    if state.get("identity") != identity:
        log.info("ignoring checkpoint %s: it was written by a different config", path)
        if state.get("run_id") and tracking.end_run_by_id(state["run_id"], "KILLED"):
            log.info("ended its run %s KILLED", state["run_id"])
        return None
    log.info("found checkpoint %s after epoch %d of run %s", path, state["epoch"],
             state["run_id"])
    return state


# Each epoch's metrics reach MLflow exactly once across kills and resumes. MLflow appends a
# second point when a step is logged again and cannot remove one, so nothing may be logged twice.
# An epoch is logged only after its checkpoint is on disk: the run then never holds an epoch the
# checkpoint lacks, and the epochs a resume trains again were never logged. The one gap, a kill
# after a checkpoint and before (or during) its log, is filled on resume from the checkpoint's
# history for the steps the run lacks, so MLflow holds the values of history.csv.


def epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "epoch"}


def log_missing_epochs(run_id: str, history: list[dict[str, float]]) -> None:
    """Log the checkpoint's epochs (each metric separately) that the run does not hold yet."""
    if not history:
        return
    have = tracking.logged_steps(run_id, list(epoch_metrics(history[0])))
    for row in history:
        missing = {k: v for k, v in epoch_metrics(row).items() if row["epoch"] not in have[k]}
        if missing:
            tracking.log_metrics(missing, row["epoch"])


def run(cfg: Config, progress: bool = False) -> TrainResult:
    with one_trainer(lock_file(cfg)):  # held from reading the checkpoint to deleting it
        return train_locked(cfg, progress)


def train_locked(cfg: Config, progress: bool) -> TrainResult:
    check_replaceable(cfg.models_dir, model_files(cfg))  # before any work, not after it
    cfg = with_tuned(cfg)  # the config that trains, written to models/config.yaml
    source = "tune" if cfg.train.use_tuned else "params"
    optimizer, lr = cfg.train.optimizer, cfg.train.lr
    device = select_device(cfg.train.device)
    seed_everything(cfg.seed, cfg.train.deterministic)
    meta, train_split, val_split = load_training_data(cfg.processed_dir, device)
    spec = spec_for(cfg, meta)
    model = build(spec).to(device)
    hyper = hyper_for(cfg, cfg.train.epochs, device)
    identity = checkpoint_identity(cfg, hyper, meta)
    tracking.configure(cfg)
    resume = resume_state(cfg.checkpoint_file, read_checkpoint(cfg.checkpoint_file), identity)
    resume_run = resume["run_id"] if resume and tracking.run_exists(resume["run_id"]) else None
    if resume and not resume_run:
        log.info("run %s is not in this MLflow store; starting a new run", resume["run_id"])
    log.info("train: %s on %s (%s), %s lr=%.3g (from %s)", cfg.model.name, device,
             hyper.precision, optimizer, lr, source)
    tags = {**tracking.lineage_tags(cfg, meta), **tracking.source_tags("train"),
            "device": str(device), "precision": hyper.precision}
    with tracking.start_run(run_name(cfg.model.name, optimizer, lr), tags,
                            run_id=resume_run) as run_id:
        if resume_run is None:
            tracking.log_params({**cfg.flat(), "train.hparams_source": source,
                                 "model.parameters": count_parameters(model)})
            tracking.log_dataset(
                train_split.x.cpu().numpy(), train_split.y.cpu().numpy(), meta["dataset"],
                cfg.paths.processed, processed_digest(meta),
            )
            if (cfg.base_dir / "dvc.lock").is_file():  # the pipeline state the run belongs to
                tracking.log_artifact(cfg.base_dir / "dvc.lock")
        if resume:  # also into a new run when the checkpoint's run is not in this store
            log_missing_epochs(run_id, resume["history"])

        def save_state_then_log(state: dict[str, Any]) -> None:  # in this order: see above
            with atomic_path(cfg.checkpoint_file) as tmp:
                torch.save({**state, "identity": identity, "run_id": run_id}, tmp)
            row = state["history"][-1]
            tracking.log_metrics(epoch_metrics(row), row["epoch"])

        result = fit(model, train_split, val_split, hyper, state=resume,
                     save_state=save_state_then_log, progress=progress)
        model = model.cpu().eval()
        # A rerun after a kill between logging the model and finishing finds it logged already.
        model_uri = tracking.logged_model_uri(run_id) if resume_run else None
        if model_uri is None:
            example = val_split.x[:4].cpu().numpy().astype(np.float32)
            model_uri = tracking.log_model(with_probabilities(model), example, meta["classes"])
        model_hash = write_outputs(cfg, spec, model, result.history)
        # the DVC outputs name no run: evaluate and register find it by the model's content
        tracking.set_tags({"best_epoch": str(result.best_epoch),
                           tracking.MODEL_HASH_TAG: model_hash,
                           tracking.MODEL_URI_TAG: model_uri})
        for path in (cfg.report_dir("train") / HISTORY_FILE, cfg.report_dir("train") / CURVE_FILE,
                     cfg.models_dir / CONFIG_FILE):
            tracking.log_artifact(path)
    cfg.checkpoint_file.unlink(missing_ok=True)  # finished: models/ holds the result
    return TrainResult(run_id, model_uri, hyper, result, model)


def model_files(cfg: Config) -> tuple[str, ...]:
    """What train writes into models/ ("run.json": what it held before outputs named no run)."""
    return (cfg.model_file.name, CONFIG_FILE, "run.json")


def write_outputs(
    cfg: Config, spec: dict[str, Any], model: torch.nn.Module, history: list[dict[str, float]],
) -> str:
    """models/ (the model and the resolved config) and the history; -> the model's sha256.

    All pure functions of code, params and data: no run id, path, time or timing inside.
    """
    with atomic_dir(cfg.models_dir, model_files(cfg)) as tmp:
        save_checkpoint(tmp / cfg.model_file.name, spec, model)
        model_hash = sha256_file(tmp / cfg.model_file.name)
        write_yaml(tmp / CONFIG_FILE, cfg.as_dict())
    write_text(cfg.report_dir("train") / HISTORY_FILE, history_csv(history))
    write_learning_curve(cfg.report_dir("train") / CURVE_FILE, history)
    return model_hash


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(cfg: Config, args: Any) -> None:
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {cfg.train.device!r}: CUDA is not available here")
    if cfg.train.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device = 'mps': MPS is not available here")
    # SIGTERM ends the run KILLED like Ctrl-C; the last epoch's checkpoint stays for resuming.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # log lines print above the progress bar, not through it
        result = run(cfg, progress=not args.quiet)
    last = result.history[-1]
    print(
        f"train: run {result.run_id}  val/accuracy {last['val/accuracy']:.4f}  "
        f"model {result.model_uri}"
    )
