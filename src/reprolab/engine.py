"""The training loop as plain functions: fit() and evaluate() return results, nothing else.

The uint8 splits sit on the device whole; batches are slices of a seeded permutation, and
augmentation and normalisation run on whole batches there, so there is no per-sample DataLoader
and two runs with the same seed see the same batches. fit() can hand its complete state to a
caller after every epoch and take it back, which is how `reprolab train` resumes bitwise.
"""

from __future__ import annotations

import logging
import math
import random
import sys
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
MONITOR = "val/accuracy"  # early stopping and "best epoch" maximise this


@dataclass(frozen=True)
class Hyper:
    """What fit() needs to know; train and tune build it from their params sections."""

    optimizer: str
    lr: float
    epochs: int
    batch_size: int
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine | onecycle
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    patience: int = 0  # early stopping after this many epochs without a better MONITOR; 0: off
    precision: str = "fp32"  # fp32 | bf16 | fp16 (resolve "auto" with select_precision)
    compile: bool = False
    crop_padding: int = 0  # random crop after zero padding by this many pixels; 0: off
    flip: bool = False  # random horizontal flip
    seed: int = 0


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # the epoch whose weights the model holds at the end
    stopped_early: bool = False

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1]

    @property
    def best_val_accuracy(self) -> float:
        return max(row[MONITOR] for row in self.history)


# ---- devices, seeds, precision ----


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


def select_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on CUDA devices that support it, fp32 elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matrix multiplies.
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _autocast(device: torch.device, precision: str) -> Any:
    dtype = _AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


# ---- optimisation ----


def make_optimizer(params: Any, hp: Hyper) -> torch.optim.Optimizer:
    params = list(params)
    # One fused kernel per step instead of several ops per parameter tensor (CPU and CUDA)
    fused = params[0].device.type in ("cpu", "cuda") or None
    if hp.optimizer == "sgd":
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum,
                               nesterov=hp.nesterov and hp.momentum > 0,
                               weight_decay=hp.weight_decay, fused=fused)
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)
    if hp.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=hp.lr, momentum=hp.momentum,
                                   weight_decay=hp.weight_decay)
    raise AssertionError(f"unknown optimizer {hp.optimizer!r}: the config should have refused it")


def make_schedule(opt: torch.optim.Optimizer, hp: Hyper, steps_per_epoch: int) -> Any:
    """A per-step learning-rate schedule with linear warm-up over `warmup_epochs`."""
    total = hp.epochs * steps_per_epoch
    warmup = round(hp.warmup_epochs * steps_per_epoch)
    if hp.schedule == "onecycle":
        pct = min(max(warmup / total, 1 / total), 0.99) if warmup else 0.3
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=hp.lr, total_steps=total, pct_start=pct,
            cycle_momentum=hp.optimizer in ("sgd", "rmsprop") and hp.momentum > 0,
        )
    cosine = hp.schedule == "cosine"

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not cosine:
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# ---- batches ----


def augment(x: torch.Tensor, crop_padding: int, flip: bool, generator: torch.Generator):
    """Random crop (after zero padding) and horizontal flip of a whole batch, on its device.

    The random draws come from a CPU generator (small tensors), so the same seed gives the same
    augmentation on every device.
    """
    n, _, h, w = x.shape
    if crop_padding:
        p = crop_padding
        padded = nn.functional.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def batches_of(split: Split, order: torch.Tensor, batch_size: int, crop_padding: int = 0,
               flip: bool = False, generator: torch.Generator | None = None):
    """Training batches straight from the device-resident split: one gather per batch in the
    order given, augmented as a whole batch. No per-sample Python, no collation, no copies to
    the device (benchmarks/bench_datapath.py measures it against a DataLoader)."""
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        # index_select: the same gather as split.x[idx], several times faster on the CPU
        xb, yb = split.x.index_select(0, idx), split.y.index_select(0, idx)
        if crop_padding or flip:
            xb = augment(xb, crop_padding, flip, generator)
        yield xb, yb


# ---- evaluation ----


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int, precision: str = "fp32"):
    """-> (mean cross-entropy, accuracy) over the split."""
    model.eval()
    device = split.x.device
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    with _autocast(device, precision):
        for start in range(0, len(split), batch_size):
            xb, yb = split.x[start : start + batch_size], split.y[start : start + batch_size]
            logits = model(xb).float()
            total_loss += nn.functional.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    return total_loss.item() / len(split), correct.item() / len(split)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    chunks = [model(x[i : i + batch_size]).float().softmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(chunks)


# ---- training ----


def _progress(total: int, desc: str, enabled: bool, leave: bool = True) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=leave, unit="batch" if not leave else "epoch",
                disable=not (enabled and sys.stderr.isatty()), dynamic_ncols=True)


def fit(
    model: nn.Module,
    train: Split,
    val: Split,
    hp: Hyper,
    *,
    on_epoch: EpochCallback | None = None,
    state: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = False,
) -> FitResult:
    """Train `model` in place on `train`, validating on `val` after each epoch.

    `train` and `val` must already be on the model's device. `on_epoch` gets each epoch's row of
    metrics (MLflow names) and may raise to stop, as Optuna's pruning does. `save_state` gets the
    complete training state after each epoch; passing such a state back as `state` continues
    exactly where it was taken, with the same result as an uninterrupted run.
    """
    device = next(model.parameters()).device
    # faster convolutions and pooling: tensor cores on CUDA, vectorised kernels on the CPU
    channels_last = device.type in ("cuda", "cpu")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if hp.compile else model
    n = len(train)
    steps_per_epoch = math.ceil(n / hp.batch_size)
    opt = make_optimizer(model.parameters(), hp)
    schedule = make_schedule(opt, hp, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=hp.precision == "fp16")
    generator = torch.Generator(device="cpu").manual_seed(hp.seed)
    check_every = 1 if device.type == "cpu" else 50  # a finiteness check syncs the GPU
    result = FitResult()
    best: dict[str, Any] | None = None
    bad_epochs, first_epoch = 0, 1

    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng"):
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        result.history = list(state["history"])
        best, bad_epochs = state["best"], state["bad_epochs"]
        first_epoch = state["epoch"] + 1
        log.info("resuming at epoch %d of %d", first_epoch, hp.epochs)

    epochs_bar = _progress(hp.epochs, "train", progress)
    epochs_bar.update(first_epoch - 1)
    for epoch in range(first_epoch, hp.epochs + 1):
        step_model.train()
        started = time.perf_counter()
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        nonfinite_at = torch.zeros((), device=device, dtype=torch.long)
        batches = _progress(steps_per_epoch, f"epoch {epoch}", progress, leave=False)
        for step, (xb, yb) in enumerate(
            batches_of(train, order, hp.batch_size, hp.crop_padding, hp.flip, generator), start=1
        ):
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            with _autocast(device, hp.precision):
                logits = step_model(xb).float()
                loss = nn.functional.cross_entropy(logits, yb, label_smoothing=hp.label_smoothing)
            if check_every == 1:  # the CPU: reading the loss costs no sync
                if not math.isfinite(loss.item()):
                    raise TrainingDiverged(epoch, step)
            else:
                # Remember the first non-finite step without a sync; look every few steps.
                nonfinite_at = torch.where(
                    (nonfinite_at == 0) & ~torch.isfinite(loss.detach()), step, nonfinite_at
                )
                if step % check_every == 0 or step == steps_per_epoch:
                    bad_step = int(nonfinite_at.item())
                    if bad_step:
                        raise TrainingDiverged(epoch, bad_step)
            opt.zero_grad(set_to_none=True)
            if scaler.is_enabled():  # fp16 only
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            schedule.step()
            loss_sum += loss.detach() * len(yb)
            correct += (logits.detach().argmax(1) == yb).sum()
            if batches.disable is False and step % 10 == 0:
                batches.set_postfix(loss=f"{loss.item():.4f}")
            batches.update()
        batches.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        val_loss, val_acc = evaluate(step_model, val, max(hp.batch_size, 512), hp.precision)
        row = {
            "epoch": epoch,
            "train/loss": loss_sum.item() / n,
            "train/accuracy": correct.item() / n,
            "val/loss": val_loss,
            "val/accuracy": val_acc,
            "train/lr": schedule.get_last_lr()[0],
            "train/epoch_seconds": seconds,
            "train/images_per_second": n / seconds if seconds > 0 else 0.0,
        }
        result.history.append(row)
        if hp.patience:
            if best is None or row[MONITOR] > best["value"]:
                state_copy = {k: v.detach().clone() for k, v in model.state_dict().items()}
                best, bad_epochs = {"epoch": epoch, "value": row[MONITOR],
                                    "model": state_copy}, 0
            else:
                bad_epochs += 1
        log.info(
            "epoch %d/%d  train/loss %.4f  val/loss %.4f  val/accuracy %.4f  lr %.3g  "
            "(%.0f img/s)", epoch, hp.epochs, row["train/loss"], val_loss, val_acc,
            row["train/lr"], row["train/images_per_second"],
        )
        epochs_bar.set_postfix(
            val_acc=f"{val_acc:.4f}", img_s=f"{row['train/images_per_second']:.0f}"
        )
        epochs_bar.update()
        if on_epoch is not None:
            on_epoch(row)
        if save_state is not None:
            save_state({
                "epoch": epoch,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict(),
                "generator": generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
                "history": result.history,
                "best": best,
                "bad_epochs": bad_epochs,
            })
        if hp.patience and bad_epochs >= hp.patience:
            log.info("early stop after epoch %d: no better %s for %d epochs", epoch, MONITOR,
                     hp.patience)
            result.stopped_early = True
            break
    epochs_bar.close()
    result.best_epoch = result.history[-1]["epoch"]
    if best is not None:
        model.load_state_dict(best["model"])
        result.best_epoch = best["epoch"]
        log.info("restored the weights of epoch %d (%s %.4f)", best["epoch"], MONITOR,
                 best["value"])
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return result

