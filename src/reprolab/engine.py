"""The training loop as plain functions: fit() and evaluate() return results, nothing else.

The uint8 splits sit on the device whole; batches are slices of a seeded permutation, so there
is no per-sample DataLoader and two runs with the same seed see the same batches.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from reprolab.data import Split
from reprolab.errors import TrainingDiverged

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, float]], None]


def select_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(
    name: str, params: Any, lr: float, momentum: float
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=momentum)
    raise AssertionError(f"unknown optimizer {name!r}: config validation should have refused it")


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1]

    @property
    def best_val_accuracy(self) -> float:
        return max(row["val/accuracy"] for row in self.history)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int) -> tuple[float, float]:
    """-> (mean cross-entropy, accuracy) over the split."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(split), batch_size):
        xb, yb = split.x[start : start + batch_size], split.y[start : start + batch_size]
        logits = model(xb)
        total_loss += nn.functional.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    return total_loss / len(split), correct / len(split)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    chunks = [model(x[i : i + batch_size]).softmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(chunks)


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    *,
    optimizer: str,
    lr: float,
    momentum: float,
    epochs: int,
    batch_size: int,
    seed: int,
    on_epoch: EpochCallback | None = None,
) -> FitResult:
    """Train `model` in place on `train`, validating after each epoch.

    `train` and `val` must already be on the model's device. `on_epoch` gets each epoch's row
    of metrics (MLflow names) and may raise to stop, as Optuna's pruning does.
    """
    device = next(model.parameters()).device
    opt = make_optimizer(optimizer, model.parameters(), lr, momentum)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    result = FitResult()
    n = len(train)
    for epoch in range(1, epochs + 1):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for step, start in enumerate(range(0, n, batch_size), start=1):
            idx = order[start : start + batch_size]
            xb, yb = train.x[idx], train.y[idx]
            logits = model(xb)
            loss = nn.functional.cross_entropy(logits, yb)
            if not torch.isfinite(loss):
                raise TrainingDiverged(epoch, step, loss.item())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.argmax(1) == yb).sum()
        seconds = time.perf_counter() - started
        val_loss, val_acc = evaluate(model, val, max(batch_size, 512))
        row = {
            "epoch": epoch,
            "train/loss": loss_sum.item() / n,
            "train/accuracy": correct.item() / n,
            "val/loss": val_loss,
            "val/accuracy": val_acc,
            "train/lr": opt.param_groups[0]["lr"],
            "train/epoch_seconds": seconds,
            "train/images_per_second": n / seconds if seconds > 0 else math.inf,
        }
        result.history.append(row)
        log.info(
            "epoch %d/%d  train/loss %.4f  val/loss %.4f  val/accuracy %.4f  (%.0f img/s)",
            epoch, epochs, row["train/loss"], val_loss, val_acc, row["train/images_per_second"],
        )
        if on_epoch is not None:
            on_epoch(row)
    return result
