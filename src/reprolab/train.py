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
import logging
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from reprolab import tracking
from reprolab.config import OPTIMIZERS, Config
from reprolab.data import load_training_data
from reprolab.engine import (
    FitResult,
    Hyper,
    fit,
    seed_everything,
    select_device,
    select_precision,
)
from reprolab.errors import ConfigError, DataError, ReprolabError
from reprolab.io import (
    LockHeld,
    atomic_dir,
    atomic_path,
    exclusive_lock,
    read_json,
    write_json,
    write_text,
    write_yaml,
)
from reprolab.models import build, count_parameters, model_spec, with_probabilities

log = logging.getLogger(__name__)

CHECKPOINT = "model.pt"
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.csv"
CURVE_FILE = "learning_curve.png"


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


TUNABLE = ("optimizer", "lr", "weight_decay", "momentum", "batch_size")


def resolve_hparams(cfg: Config) -> tuple[dict[str, Any], str]:
    """-> (hyperparameters, source): tune's best params when train.use_tuned, else params.yaml.

    Always optimizer and lr; also weight_decay, momentum or batch_size when tune searched them.
    """
    if not cfg.train.use_tuned:
        return {"optimizer": cfg.train.optimizer, "lr": cfg.train.lr}, "params"
    path = cfg.best_params_file
    if not path.exists():
        raise DataError(
            f"{path}: not found; run `reprolab tune` first, or set train.use_tuned: false"
        )
    best = yaml.safe_load(path.read_text()) or {}
    optimizer, lr = best.get("optimizer"), best.get("lr")
    if optimizer not in OPTIMIZERS or not isinstance(lr, int | float) or lr <= 0:
        raise DataError(
            f"{path}: expected optimizer in {', '.join(OPTIMIZERS)} and lr > 0, "
            f"got optimizer={optimizer!r} lr={lr!r}"
        )
    unknown = set(best) - set(TUNABLE)
    if unknown:
        raise DataError(f"{path}: unknown keys {sorted(unknown)}; allowed: {', '.join(TUNABLE)}")
    return {**best, "lr": float(lr)}, "tune"


def spec_for(cfg: Config, meta: dict[str, Any]) -> dict[str, Any]:
    return model_spec(cfg.model.name, meta["shape"], meta["num_classes"], meta["mean"],
                      meta["std"], hidden=cfg.model.hidden, width=cfg.model.width)


def hyper_for(
    cfg: Config, params: dict[str, Any], epochs: int, device: torch.device
) -> Hyper:
    """The engine's settings from the train and data sections, with `params` (optimizer, lr
    and any tuned dimension) taking precedence. tune shares it."""
    t = cfg.train
    return Hyper(
        optimizer=params["optimizer"], lr=params["lr"], epochs=epochs,
        batch_size=params.get("batch_size", t.batch_size),
        momentum=params.get("momentum", t.momentum), nesterov=t.nesterov,
        weight_decay=params.get("weight_decay", t.weight_decay),
        schedule=t.schedule, warmup_epochs=min(t.warmup_epochs, epochs - 1),
        label_smoothing=t.label_smoothing, patience=t.early_stopping_patience,
        precision=select_precision(t.precision, device), compile=t.compile,
        crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, seed=cfg.seed,
    )


def short_lr(lr: float) -> str:
    return f"{lr:.1e}".replace("e-0", "e-").replace("e+0", "e+")


def run_name(model: str, optimizer: str, lr: float) -> str:
    return f"{model}-{optimizer}-lr{short_lr(lr)}"


def history_csv(history: list[dict[str, float]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]), lineterminator="\n")
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
    """What must match for a checkpoint to be resumed: config, effective hparams, data."""
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
    if not path.exists():
        return None
    return torch.load(path, weights_only=True, map_location="cpu")


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
    params, source = resolve_hparams(cfg)
    optimizer, lr = params["optimizer"], params["lr"]
    device = select_device(cfg.train.device)
    seed_everything(cfg.seed, cfg.train.deterministic)
    meta, train_split, val_split = load_training_data(cfg.processed_dir, device)
    spec = spec_for(cfg, meta)
    model = build(spec).to(device)
    hyper = hyper_for(cfg, params, cfg.train.epochs, device)
    identity = checkpoint_identity(cfg, hyper, meta)
    tracking.configure(cfg)
    resume = resume_state(cfg.checkpoint_file, read_checkpoint(cfg.checkpoint_file), identity)
    resume_run = resume["run_id"] if resume and tracking.run_exists(resume["run_id"]) else None
    if resume and not resume_run:
        log.info("run %s is not in this MLflow store; starting a new run", resume["run_id"])
    log.info("train: %s on %s (%s), %s lr=%.3g (from %s)", cfg.model.name, device,
             hyper.precision, optimizer, lr, source)
    tags = {**tracking.lineage_tags(cfg, meta), "device": str(device),
            "precision": hyper.precision}
    with tracking.start_run(run_name(cfg.model.name, optimizer, lr), tags,
                            run_id=resume_run) as run_id:
        if resume_run is None:
            tracking.log_params({
                **cfg.flat(), **{f"train.{k}": v for k, v in params.items()},
                "train.hparams_source": source, "model.parameters": count_parameters(model),
            })
            tracking.log_dataset(
                train_split.x.cpu().numpy(), train_split.y.cpu().numpy(), meta["dataset"],
                cfg.processed_dir, meta["manifest_sha256"],
            )
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
        tracking.set_tags({"best_epoch": str(result.best_epoch)})
        run_info = {"run_id": run_id, "model_uri": model_uri, "tracking_uri": cfg.mlflow_uri,
                    "tags": tags}
        write_outputs(cfg, spec, model, run_info, result.history)
        for path in (cfg.report_dir("train") / HISTORY_FILE, cfg.report_dir("train") / CURVE_FILE,
                     cfg.models_dir / CONFIG_FILE):
            tracking.log_artifact(path)
    cfg.checkpoint_file.unlink(missing_ok=True)  # finished: models/ holds the result
    return TrainResult(run_id, model_uri, hyper, result, model)


def write_outputs(
    cfg: Config, spec: dict[str, Any], model: torch.nn.Module, run_info: dict[str, Any],
    history: list[dict[str, float]],
) -> None:
    checkpoint = {"spec": spec, "state_dict": model.state_dict(), "params_hash": cfg.params_hash}
    with atomic_dir(cfg.models_dir) as tmp:
        torch.save(checkpoint, tmp / CHECKPOINT)
        write_json(tmp / RUN_FILE, run_info)
        write_yaml(tmp / CONFIG_FILE, cfg.as_dict())
    write_text(cfg.report_dir("train") / HISTORY_FILE, history_csv(history))
    write_learning_curve(cfg.report_dir("train") / CURVE_FILE, history)


def training_run(cfg: Config) -> dict[str, Any]:
    """models/run.json, with MLflow pointed at the store and that run checked to be in it."""
    path = cfg.models_dir / RUN_FILE
    if not path.is_file():
        raise DataError(f"{path}: not found; run `reprolab train` (or `dvc repro`) first")
    run_info = read_json(path)
    tracking.configure(cfg)
    tracking.require_training_run(run_info, path)
    return run_info


def load_checkpoint(models_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    path = models_dir / CHECKPOINT
    if not path.exists():
        raise DataError(f"{path}: not found; run `reprolab train` first")
    blob = torch.load(path, weights_only=True, map_location="cpu")
    model = build(blob["spec"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["spec"]


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
