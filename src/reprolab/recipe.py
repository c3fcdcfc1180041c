"""What trains a model, from a resolved config: the model spec and the engine's settings.

train and tune share these (one layer below both stages, so neither imports the other).
"""

from __future__ import annotations

from typing import Any

from reprolab.config import Config
from reprolab.device import select_precision
from reprolab.engine import Hyper
from reprolab.models import model_spec


def spec_for(cfg: Config, meta: dict[str, Any]) -> dict[str, Any]:
    return model_spec(cfg.model.name, meta["shape"], meta["num_classes"], meta["mean"],
                      meta["std"], hidden=cfg.model.hidden, width=cfg.model.width)


def hyper_for(cfg: Config, epochs: int, device: Any, shape: list[int] | None) -> Hyper:
    """The engine's settings from the train and data sections of a resolved config (tuned
    values, or a trial's point, already applied with config.with_train). `shape`: the images'
    C x H x W (meta.json's), which `precision: auto` looks at."""
    t = cfg.train
    return Hyper(
        optimizer=t.optimizer, lr=t.lr, epochs=epochs, batch_size=t.batch_size,
        momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay,
        schedule=t.schedule, warmup_epochs=min(t.warmup_epochs, epochs - 1),
        label_smoothing=t.label_smoothing, patience=t.early_stopping_patience,
        precision=select_precision(t.precision, device, shape), compile=t.compile,
        crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, seed=cfg.seed,
    )


def short_lr(lr: float) -> str:
    return f"{lr:.1e}".replace("e-0", "e-").replace("e+0", "e+")


def run_name(model: str, optimizer: str, lr: float) -> str:
    return f"{model}-{optimizer}-lr{short_lr(lr)}"
