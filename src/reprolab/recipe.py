"""What trains a model, from a resolved config: the model (its spec, built, pretrained weights
loaded) and the engine's settings.

train and tune share these (one layer below both stages, so neither imports the other).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprolab.config import Config
from reprolab.device import select_precision
from reprolab.engine import Hyper
from reprolab.errors import ConfigError
from reprolab.models import TIMM, build, check_output, head_name, spec_for, timm_data_config
from reprolab.pretrained import Weights, load_into, resolve


@dataclass(frozen=True)
class ModelRecipe:
    """How to make the model that trains: its spec (saved in models/model.pt) and the weights it
    starts from, if any. `build()` makes a fresh one (each tuning trial makes its own)."""

    spec: dict[str, Any]
    weights: Weights | None
    base_dir: Path

    def build(self) -> Any:
        model = build(self.spec, self.base_dir)
        check_output(model, self.spec)
        if self.weights is not None:
            name = self.spec["name"]
            first = timm_data_config(name)["first_conv"] if name.startswith(TIMM) else None
            load_into(model, self.weights, head_name(model), first)
        return model


def model_recipe(cfg: Config, meta: dict[str, Any]) -> ModelRecipe:
    """The model of a config on the data of meta.json. A missing or wrong weights file, a net
    that does not import or build: one line, before any output."""
    m = cfg.model
    weights = resolve(m.name, m.pretrained, cfg.base_dir, m.allow_download)
    spec = spec_for(m.name, m.kwargs, meta["shape"], meta["num_classes"], meta["mean"],
                    meta["std"], weights.record if weights else None, m.input_size, cfg.base_dir)
    return ModelRecipe(spec, weights, cfg.base_dir)


def model_identity(cfg: Config) -> dict[str, Any]:
    """What makes two models the same before training: the model section, your network's code
    (sha256) and the weights file it starts from (sha256). Tuning studies are keyed by it, so an
    edited network or new weights start a new study."""
    from reprolab.files import sha256_file
    from reprolab.plugins import code_sha256, is_import_path

    m = cfg.model
    weights = cfg.base_dir / m.pretrained if isinstance(m.pretrained, str) else None
    return {"model": m.model_dump(mode="json"),
            "code": code_sha256(m.name, cfg.base_dir) if is_import_path(m.name) else None,
            "weights": sha256_file(weights) if weights and weights.is_file() else None}


def hyper_for(cfg: Config, epochs: int, device: Any, shape: list[int] | None,
              model: Any = None) -> Hyper:
    """The engine's settings from the train and data sections of a resolved config (tuned
    values, or a trial's point, already applied with config.with_train). `shape`: the images'
    C x H x W (meta.json's), which `precision: auto` looks at. `model`: the built model, whose
    head the fine-tuning knobs tell from its backbone."""
    t = cfg.train
    freeze = epochs if t.freeze_backbone is True else int(t.freeze_backbone)
    tuning = bool(freeze or t.backbone_lr_scale != 1.0)
    head = head_name(model) if model is not None and tuning else None
    if tuning and not head:
        raise ConfigError(
            f"train.freeze_backbone / train.backbone_lr_scale: model {cfg.model.name!r} has no "
            "head to tell from its backbone (no child named head, fc or classifier, and no "
            "nn.Linear); allowed: false and 1.0 for this model")
    return Hyper(
        optimizer=t.optimizer, lr=t.lr, epochs=epochs, batch_size=t.batch_size,
        momentum=t.momentum, nesterov=t.nesterov, weight_decay=t.weight_decay,
        schedule=t.schedule, warmup_epochs=min(t.warmup_epochs, epochs - 1),
        label_smoothing=t.label_smoothing, patience=t.early_stopping_patience,
        precision=select_precision(t.precision, device, shape), compile=t.compile,
        crop_padding=cfg.data.crop_padding, flip=cfg.data.flip, seed=cfg.seed,
        head=head or "", freeze_epochs=min(freeze, epochs), backbone_lr_scale=t.backbone_lr_scale,
    )


def short_lr(lr: float) -> str:
    return f"{lr:.1e}".replace("e-0", "e-").replace("e+0", "e+")


def run_name(model: str, optimizer: str, lr: float) -> str:
    """A run's name in the MLflow UI: the model (its last part for an import path or timm), the
    optimizer and the learning rate."""
    short = model.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    return f"{short}-{optimizer}-lr{short_lr(lr)}"
