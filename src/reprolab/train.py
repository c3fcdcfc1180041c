"""train stage: fit the configured model, track it in MLflow, write models/ and the history."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from reprolab import tracking
from reprolab.config import OPTIMIZERS, Config
from reprolab.data import load_training_data
from reprolab.engine import FitResult, fit, seed_everything, select_device
from reprolab.errors import ConfigError, DataError
from reprolab.io import atomic_dir, write_json, write_text, write_yaml
from reprolab.models import build, count_parameters, model_spec, with_probabilities
from reprolab.tune import best_params_path

log = logging.getLogger(__name__)

CHECKPOINT = "model.pt"
RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.csv"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str
    optimizer: str
    lr: float
    history: list[dict[str, float]]
    model: torch.nn.Module


def resolve_hparams(cfg: Config) -> tuple[str, float, str]:
    """-> (optimizer, lr, source): tune's best params when train.use_tuned, else params.yaml."""
    if not cfg.train.use_tuned:
        return cfg.train.optimizer, cfg.train.lr, "params"
    path = best_params_path(cfg)
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
    return optimizer, float(lr), "tune"


def history_csv(history: list[dict[str, float]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(history[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def run_name(model: str, optimizer: str, lr: float) -> str:
    return f"{model}-{optimizer}-lr{lr:.1e}"


def run(cfg: Config) -> TrainResult:
    optimizer, lr, source = resolve_hparams(cfg)
    device = select_device(cfg.train.device)
    meta, train_split, val_split = load_training_data(cfg.processed_dir, device)
    seed_everything(cfg.seed)
    spec = model_spec(
        cfg.model.name, meta["shape"], meta["num_classes"], cfg.model.hidden, meta["mean"],
        meta["std"],
    )
    model = build(spec).to(device)
    log.info("train: %s on %s, %s lr=%.3g (from %s)", cfg.model.name, device, optimizer, lr, source)

    tracking.configure(cfg)
    tags = {**tracking.lineage_tags(cfg, meta), "device": str(device)}
    params = {
        **cfg.flat(),
        "train.optimizer": optimizer,
        "train.lr": lr,
        "train.hparams_source": source,
        "model.parameters": count_parameters(model),
    }
    with tracking.start_run(run_name(cfg.model.name, optimizer, lr), tags) as run_id:
        tracking.log_params(params)
        tracking.log_dataset(
            train_split.x.cpu().numpy(), train_split.y.cpu().numpy(), meta["dataset"],
            cfg.processed_dir, meta["manifest_sha256"],
        )

        def on_epoch(row: dict[str, float]) -> None:
            tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, row["epoch"])

        result: FitResult = fit(
            model, train_split, val_split, optimizer=optimizer, lr=lr,
            momentum=cfg.train.momentum, epochs=cfg.train.epochs,
            batch_size=cfg.train.batch_size, seed=cfg.seed, on_epoch=on_epoch,
        )
        model = model.cpu().eval()
        example = val_split.x[:4].cpu().numpy().astype(np.float32)
        model_uri = tracking.log_model(with_probabilities(model), example)
        run_info = {
            "run_id": run_id,
            "model_uri": model_uri,
            "tracking_uri": cfg.mlflow_uri,
            "tags": tags,
        }
        write_outputs(cfg, spec, model, run_info, result.history)
        tracking.log_artifact(cfg.report_dir("train") / HISTORY_FILE)
        tracking.log_artifact(cfg.models_dir / CONFIG_FILE)
    return TrainResult(run_id, model_uri, optimizer, lr, result.history, model)


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


def load_checkpoint(models_dir: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    path = models_dir / CHECKPOINT
    if not path.exists():
        raise DataError(f"{path}: not found; run `reprolab train` first")
    blob = torch.load(path, weights_only=True, map_location="cpu")
    model = build(blob["spec"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["spec"]


def main(cfg: Config, args: Any) -> None:
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {cfg.train.device!r}: CUDA is not available here")
    result = run(cfg)
    last = result.history[-1]
    print(
        f"train: run {result.run_id}  val/accuracy {last['val/accuracy']:.4f}  "
        f"model {result.model_uri}"
    )
