"""The training loop: fit() and evaluate() return results, nothing else.

The uint8 splits sit on the device whole; batches are slices of a seeded permutation, and
augmentation and normalisation run on whole batches there, so there is no per-sample DataLoader
and two runs with the same seed see the same batches. fit() can hand its complete state to a
caller after every epoch and take it back, which is how `reprolab train` resumes bitwise.

The loop reads as one process. Under torchrun every rank calls fit() with the same arguments and
three calls of `reprolab.ddp` do the rest: `wrap` puts the model in DistributedDataParallel, each
rank takes its share of every global batch (`data.batches`), and `all_sum` reduces the metrics
and the checks that stop training, so that all ranks stop together.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from reprolab import ddp
from reprolab.data import Split
from reprolab.data.batches import batches_of
from reprolab.device import autocast
from reprolab.errors import TrainingDiverged
from reprolab.lifecycle import startup_over
from reprolab.optim import make_optimizer, make_schedule
from reprolab.progress import Progress

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
    # fine-tuning: the head's qualified name in the model ("" when there is none), the epochs
    # during which the rest (the backbone) is frozen, and the backbone's lr as a share of lr
    head: str = ""
    freeze_epochs: int = 0
    backbone_lr_scale: float = 1.0


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # the epoch whose weights the model holds at the end
    stopped_early: bool = False

    @property
    def last(self) -> dict[str, float]:
        return self.history[-1]


# ---- evaluation ----


@torch.no_grad()
def loss_and_correct(model: nn.Module, split: Split, batch_size: int, precision: str = "fp32"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (summed cross-entropy as float64, count of correct predictions) over the split, on the
    model's device (a mapped split is read a batch at a time)."""
    model.eval()
    device = _device_of(model, split)
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    with autocast(device, precision):
        for start in range(0, len(split), batch_size):
            xb = split.x[start : start + batch_size].to(device, non_blocking=True)
            yb = split.y[start : start + batch_size].to(device, non_blocking=True)
            logits = model(xb).float()
            total_loss += nn.functional.cross_entropy(logits, yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
    return total_loss, correct


def evaluate(model: nn.Module, split: Split, batch_size: int, precision: str = "fp32"):
    """-> (mean cross-entropy, accuracy) over the split."""
    total_loss, correct = loss_and_correct(model, split, batch_size, precision)
    return total_loss.item() / len(split), correct.item() / len(split)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Class probabilities of images (read a batch at a time), on the CPU."""
    model.eval()
    device = _device_of(model, None)
    return torch.cat([model(x[i : i + batch_size].to(device)).float().softmax(1).cpu()
                      for i in range(0, len(x), batch_size)])


def _device_of(model: nn.Module, split: Split | None) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else split.x.device


# ---- training ----


@dataclass
class _Loop:
    """What one fit() trains with, and where it is."""

    model: nn.Module  # the plain module: its state is saved, restored and returned
    net: nn.Module  # what takes the steps: the model, in DDP across ranks, maybe compiled
    opt: torch.optim.Optimizer
    schedule: Any
    scaler: torch.amp.GradScaler
    generator: torch.Generator  # the permutations and the augmentation, the same on all ranks
    device: torch.device
    rank: int
    world: int
    steps: int  # per epoch
    channels_last: bool
    batchnorms: dict[str, nn.Module]  # stood in for by SyncBatchNorm while training
    result: FitResult = field(default_factory=FitResult)
    best: dict[str, Any] | None = None  # early stopping: the best epoch, its value and weights
    bad_epochs: int = 0
    epoch: int = 0  # the last finished one


def _setup(model: nn.Module, n: int, hp: Hyper) -> _Loop:
    device = next(model.parameters()).device
    rank, size = ddp.world()
    # faster convolutions and pooling: tensor cores on CUDA, vectorised kernels on the CPU
    channels_last = device.type in ("cuda", "cpu")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net, batchnorms = ddp.wrap(model, device)
    net = torch.compile(net) if hp.compile else net
    opt = make_optimizer(model, hp)
    steps = math.ceil(n / hp.batch_size)
    return _Loop(model, net, opt, make_schedule(opt, hp, steps),
                 torch.amp.GradScaler(device.type, enabled=hp.precision == "fp16"),
                 torch.Generator(device="cpu").manual_seed(hp.seed), device, rank, size, steps,
                 channels_last, batchnorms)


def _snapshot(loop: _Loop) -> dict[str, Any]:
    """The complete training state after an epoch; fit(state=...) continues from it exactly."""
    return {
        "epoch": loop.epoch,
        "model": loop.model.state_dict(),
        "optimizer": loop.opt.state_dict(),
        "schedule": loop.schedule.state_dict(),
        "scaler": loop.scaler.state_dict(),
        "generator": loop.generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if loop.device.type == "cuda" else [],
        "history": loop.result.history,
        "best": loop.best,
        "bad_epochs": loop.bad_epochs,
    }


def _restore(loop: _Loop, state: dict[str, Any]) -> None:
    loop.model.load_state_dict(state["model"])
    loop.opt.load_state_dict(state["optimizer"])
    loop.schedule.load_state_dict(state["schedule"])
    loop.scaler.load_state_dict(state["scaler"])
    loop.generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if loop.device.type == "cuda" and state.get("cuda_rng"):
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    loop.result.history = list(state["history"])
    loop.best, loop.bad_epochs, loop.epoch = state["best"], state["bad_epochs"], state["epoch"]


def _forward(loop: _Loop, xb: torch.Tensor, yb: torch.Tensor, weight: float, hp: Hyper
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (the loss to differentiate, the batch's summed loss, logits). Across ranks the loss is
    this rank's sum times world / global batch size: DDP averages the gradients of the ranks,
    which is then the gradient of the global batch's mean loss, also for an uneven last batch."""
    if loop.channels_last:
        xb = xb.contiguous(memory_format=torch.channels_last)
    with autocast(loop.device, hp.precision):
        logits = loop.net(xb).float()
        if loop.world == 1:
            loss = nn.functional.cross_entropy(logits, yb, label_smoothing=hp.label_smoothing)
            return loss, loss.detach() * len(yb), logits
        total = nn.functional.cross_entropy(logits, yb, label_smoothing=hp.label_smoothing,
                                            reduction="sum")
    return total * weight, total.detach(), logits


def _optimise(loop: _Loop, loss: torch.Tensor, frozen: list[torch.nn.Parameter]) -> None:
    loop.opt.zero_grad(set_to_none=True)
    if loop.scaler.is_enabled():  # fp16 only
        loop.scaler.scale(loss).backward()
        _drop_grads(frozen)
        loop.scaler.step(loop.opt)
        loop.scaler.update()
    else:
        loss.backward()
        _drop_grads(frozen)
        loop.opt.step()
    loop.schedule.step()


def _drop_grads(frozen: list[torch.nn.Parameter]) -> None:
    """A parameter without a gradient is left as it is by every optimizer: no step, no weight
    decay, no momentum."""
    for param in frozen:
        param.grad = None


def _freeze(loop: _Loop, hp: Hyper) -> list[torch.nn.Parameter]:
    """Fine-tuning: in the first hp.freeze_epochs epochs the backbone (everything but the head)
    does not train; its BatchNorms keep their statistics too. One process stops its gradients
    (less work); across ranks DDP needs the same parameters to take part in every step, so their
    gradients are dropped after the reduction instead. -> the parameters whose gradients the
    step must drop."""
    frozen = bool(hp.head) and loop.epoch < hp.freeze_epochs
    backbone = [(n, p) for n, p in loop.model.named_parameters()
                if not n.startswith(hp.head + ".")] if hp.head else []
    for _, param in backbone:
        param.requires_grad_(not frozen or loop.world > 1)
    if frozen:
        kinds = nn.modules.batchnorm._BatchNorm
        for name, module in loop.model.named_modules():
            if isinstance(module, kinds) and not name.startswith(hp.head + "."):
                module.eval()
    return [p for _, p in backbone] if frozen and loop.world > 1 else []


def _train_epoch(loop: _Loop, train: Split, hp: Hyper, progress: Progress
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over a fresh seeded permutation; -> this rank's summed loss and correct count."""
    epoch, device = loop.epoch + 1, loop.device
    loop.net.train()
    frozen = _freeze(loop, hp)
    # the order lives where the images do: on the device, or on the CPU for a mapped split
    order = torch.randperm(len(train), generator=loop.generator).to(train.x.device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    # Reading a loss syncs a GPU, and across ranks the check is a reduction: there the first
    # non-finite step is remembered on the device and looked at every 50 steps.
    every_step = device.type == "cpu" and loop.world == 1
    first_bad = torch.full((), ddp.NO_STEP, device=device, dtype=torch.long)
    progress.start(epoch)
    batches = batches_of(train, order, hp.batch_size, hp.crop_padding, hp.flip, loop.generator,
                         loop.rank, loop.world, device)
    for step, (xb, yb, weight) in enumerate(batches, start=1):
        loss, batch_loss, logits = _forward(loop, xb, yb, weight, hp)
        if every_step:
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(epoch, step)
        else:
            bad = (first_bad == ddp.NO_STEP) & ~torch.isfinite(loss.detach())
            first_bad = torch.where(bad, step, first_bad)
            if step % 50 == 0 or step == loop.steps:
                ddp.raise_if_diverged(first_bad, epoch)
        _optimise(loop, loss, frozen)
        loss_sum += batch_loss
        correct += (logits.detach().argmax(1) == yb).sum()
        progress.step(step, loss)
    return loss_sum, correct


def _validate(loop: _Loop, val: Split, hp: Hyper) -> tuple[float, float]:
    """-> (val loss, val accuracy). Each rank measures its share of the split (with the plain
    module: DDP would broadcast buffers at every batch) and the sums are reduced, so every rank
    sees the same figures and early-stops with the others."""
    part = ddp.share(len(val), loop.rank, loop.world)
    model = loop.net if loop.world == 1 else loop.model
    sums = loss_and_correct(model, Split(val.x[part], val.y[part]), max(hp.batch_size, 512),
                            hp.precision)
    total_loss, correct = ddp.all_sum(*sums)
    return total_loss / len(val), correct / len(val)


def _epoch(loop: _Loop, train: Split, val: Split, hp: Hyper, progress: Progress
           ) -> dict[str, float]:
    """Train and validate one epoch; -> its row of metrics (MLflow names)."""
    started = time.perf_counter()
    sums = _train_epoch(loop, train, hp, progress)
    if loop.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    loss_sum, correct = ddp.all_sum(*sums)
    val_loss, val_acc = _validate(loop, val, hp)
    n = len(train)
    loop.epoch += 1
    row = {
        "epoch": loop.epoch,
        "train/loss": loss_sum / n,
        "train/accuracy": correct / n,
        "val/loss": val_loss,
        "val/accuracy": val_acc,
        "train/lr": loop.schedule.get_last_lr()[0],
        "train/epoch_seconds": seconds,
        "train/images_per_second": n / seconds if seconds > 0 else 0.0,
    }
    loop.result.history.append(row)
    log.info(
        "epoch %d/%d  train/loss %.4f  val/loss %.4f  val/accuracy %.4f  lr %.3g  "
        "(%.0f img/s)", loop.epoch, hp.epochs, row["train/loss"], val_loss, val_acc,
        row["train/lr"], row["train/images_per_second"],
    )
    progress.end(row)
    return row


def _track_best(loop: _Loop, row: dict[str, float], patience: int) -> None:
    """Early stopping: keep the weights of the best epoch so far."""
    if not patience:
        return
    if loop.best is None or row[MONITOR] > loop.best["value"]:
        weights = {k: v.detach().clone() for k, v in loop.model.state_dict().items()}
        loop.best, loop.bad_epochs = {"epoch": row["epoch"], "value": row[MONITOR],
                                      "model": weights}, 0
    else:
        loop.bad_epochs += 1


def _stopping(loop: _Loop, patience: int) -> bool:
    if not patience or loop.bad_epochs < patience:
        return False
    log.info("early stop after epoch %d: no better %s for %d epochs", loop.epoch, MONITOR,
             patience)
    loop.result.stopped_early = True
    return True


def _finish(loop: _Loop) -> FitResult:
    """The best epoch's weights (with early stopping), in the model's own memory format and
    modules: what is saved and logged is the same whatever trained it."""
    result = loop.result
    result.best_epoch = result.history[-1]["epoch"]
    if loop.best is not None:
        loop.model.load_state_dict(loop.best["model"])
        result.best_epoch = loop.best["epoch"]
        log.info("restored the weights of epoch %d (%s %.4f)", loop.best["epoch"], MONITOR,
                 loop.best["value"])
    ddp.unwrap(loop.model, loop.batchnorms)
    for param in loop.model.parameters():  # a frozen backbone trains again in the next fit
        param.requires_grad_(True)
    if loop.channels_last:
        loop.model.to(memory_format=torch.contiguous_format)
    return result


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
    complete training state after each epoch (its tensors are the live ones: serialise or copy
    them before the next epoch); passing such a state back as `state` continues exactly where it
    was taken, with the same result as an uninterrupted run. Under torchrun, every rank calls
    fit() alike; progress shows on rank 0.
    """
    loop = _setup(model, len(train), hp)  # the optimizer's first use imports torch._dynamo
    startup_over()  # the epochs are the long work: the garbage collector back on
    if state is not None:
        _restore(loop, state)
        log.info("resuming at epoch %d of %d", loop.epoch + 1, hp.epochs)
    bars = Progress(progress and loop.rank == 0, hp.epochs, loop.epoch, loop.steps,
                    hp.batch_size)
    try:
        stop = _stopping(loop, hp.patience)  # a state saved at the epoch that ran out of patience
        while not stop and loop.epoch < hp.epochs:
            row = _epoch(loop, train, val, hp, bars)
            _track_best(loop, row, hp.patience)
            if on_epoch is not None:
                on_epoch(row)
            if save_state is not None:
                save_state(_snapshot(loop))
            stop = _stopping(loop, hp.patience)
    finally:
        bars.close()
    return _finish(loop)
