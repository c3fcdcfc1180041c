"""train stage: fit the configured model, track it in MLflow, write models/ and the history.

After every epoch the complete training state goes to an atomic checkpoint outside the DVC
outputs; `reprolab train` after a crash resumes from it when the config matches, continues the
same MLflow run, and ends with the weights an uninterrupted run would have had.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import signal
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
from reprolab.errors import ConfigError, DataError
from reprolab.io import atomic_dir, atomic_path, read_json, write_json, write_text, write_yaml
from reprolab.models import build, count_parameters, model_spec, with_probabilities

log = logging.getLogger(__name__)

CHECKPOINT = "model.pt"
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.csv"
CURVE_FILE = "learning_curve.png"


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


def load_resume_state(path: Path, identity: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    state = torch.load(path, weights_only=True, map_location="cpu")
    if state.get("identity") != identity:
        log.info("ignoring checkpoint %s: it was written by a different config", path)
        return None
    log.info("found checkpoint %s after epoch %d of run %s", path, state["epoch"],
             state["run_id"])
    return state


def run(cfg: Config, progress: bool = False) -> TrainResult:
    params, source = resolve_hparams(cfg)
    optimizer, lr = params["optimizer"], params["lr"]
    device = select_device(cfg.train.device)
    seed_everything(cfg.seed, cfg.train.deterministic)
    meta, train_split, val_split = load_training_data(cfg.processed_dir, device)
    spec = spec_for(cfg, meta)
    model = build(spec).to(device)
    hyper = hyper_for(cfg, params, cfg.train.epochs, device)
    identity = checkpoint_identity(cfg, hyper, meta)
    resume = load_resume_state(cfg.checkpoint_file, identity)

    tracking.configure(cfg)
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

        def on_epoch(row: dict[str, float]) -> None:
            tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

        def save_state(state: dict[str, Any]) -> None:
            with atomic_path(cfg.checkpoint_file) as tmp:
                torch.save({**state, "identity": identity, "run_id": run_id}, tmp)

        result = fit(model, train_split, val_split, hyper, on_epoch=on_epoch,
                     state=resume, save_state=save_state, progress=progress)
        model = model.cpu().eval()
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
