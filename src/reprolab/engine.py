"""The training loop as plain functions: fit() and evaluate() return results, nothing else.

The uint8 splits sit on the device whole; batches are slices of a seeded permutation, and
augmentation and normalisation run on whole batches there, so there is no per-sample DataLoader
and two runs with the same seed see the same batches. fit() can hand its complete state to a
caller after every epoch and take it back, which is how `reprolab train` resumes bitwise.

Under torchrun every rank calls fit() with the same arguments: the model trains in PyTorch's
DistributedDataParallel, each rank takes its share of every global batch, and the metrics and the
checks that stop training are reduced across ranks, so that all ranks stop together.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from reprolab.data import Split
from reprolab.errors import ConfigError, ReprolabError, TrainingDiverged
from reprolab.io import startup_over

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


# bf16 on the CPU pays from images of this many pixels (see select_precision)
CPU_BF16_MIN_PIXELS = 16 * 16


def select_precision(name: str, device: torch.device, shape: Sequence[int] | None = None
                     ) -> str:
    """`auto`: bf16 autocast on CUDA devices that support it; on CPUs with native bf16
    instructions (AVX512-BF16 or AMX) for images of 16x16 pixels or more; fp32 elsewhere.

    On such a CPU bf16 trains the seed CNN 1.5x faster or more on 28x28 and 32x32 images at the
    same test accuracy; on 8x8 digits, whose convolutions are small beside the casts, it gained
    1.1x and lost half a point of test accuracy (benchmarks/bench_throughput.py). `shape`: the
    images' C x H x W; None when not known (taken as large enough)."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    large = shape is None or math.prod(shape[-2:]) >= CPU_BF16_MIN_PIXELS
    if device.type == "cpu" and large and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def cpu_has_native_bf16() -> bool:
    """Not torch.ops.mkldnn._is_mkldnn_bf16_supported(): that is also true on plain AVX512,
    where oneDNN emulates bf16 with fp32 arithmetic and conversions, which gains no speed."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matrix multiplies.
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
    """A per-step learning-rate schedule with linear warm-up over `warmup_epochs`: torch's own
    schedulers. Step s of w warm-up steps runs at (s + 1) / w of the lr, then constant or cosine
    down to 0 at the last step (tests/test_engine.py checks every step's lr against that
    formula)."""
    sched = torch.optim.lr_scheduler
    total = hp.epochs * steps_per_epoch
    warmup = round(hp.warmup_epochs * steps_per_epoch)
    if hp.schedule == "onecycle":
        pct = min(max(warmup / total, 1 / total), 0.99) if warmup else 0.3
        return sched.OneCycleLR(
            opt, max_lr=hp.lr, total_steps=total, pct_start=pct,
            cycle_momentum=hp.optimizer in ("sgd", "rmsprop") and hp.momentum > 0,
        )
    if hp.schedule == "cosine":
        after = sched.CosineAnnealingLR(opt, T_max=max(1, total - warmup))
    else:
        after = sched.ConstantLR(opt, factor=1.0, total_iters=0)
    if warmup <= 1:  # one warm-up step runs at the full lr: no warm-up
        return after
    ramp = sched.LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
    return sched.SequentialLR(opt, [ramp, after], milestones=[warmup])


# ---- several processes (torchrun) ----


def world() -> tuple[int, int]:
    """-> (rank, world size) of this process: (0, 1) unless torchrun's process group is up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def start_distributed(device: torch.device) -> torch.device:
    """Join the process group of the ranks torchrun started (its environment names them);
    -> this rank's device: cuda:LOCAL_RANK with NCCL, or the CPU with gloo, where each of the
    machine's ranks takes an equal share of its cores (torchrun would leave each one thread)."""
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"{local_world} ranks on this machine and {torch.cuda.device_count()} GPUs: "
                "train.processes (torchrun's --nproc-per-node) allows one rank per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **_rendezvous_store())
        return device
    if device.type != "cpu":
        raise ConfigError(f"train.device = {device.type!r}: torch.distributed trains on CUDA "
                          "(NCCL) or the CPU (gloo); allowed under torchrun: cuda, cpu, auto")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, (cores or 1) // local_world))
    dist.init_process_group("gloo", **_rendezvous_store())
    return device


def _rendezvous_store() -> dict[str, Any]:
    """The ranks' store, under a prefix of this attempt. torchrun hands its agent's store to
    the ranks of every restart (--max-restarts) as it is: the addresses that the ranks of a
    killed attempt left there would send the new ranks to ports nobody listens on."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"reprolab/attempt-{attempt}", store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def all_ranks(exc: BaseException) -> BaseException:
    """Mark an error that every rank raises at the same point: see train.ranks."""
    exc.all_ranks = True  # type: ignore[attr-defined]
    return exc


class RankFailed(ReprolabError):
    """What failed on rank 0, raised on every other rank with the same exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def from_rank0(fn: Callable[[], Any]) -> Any:
    """fn() runs on rank 0 alone; every rank gets its result. Its failure reaches every rank
    too (as RankFailed), so no rank waits forever for a collective that rank 0 never joins."""
    rank, size = world()
    if size == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except BaseException as exc:
            box[0] = ("failed", str(exc) or type(exc).__name__, getattr(exc, "exit_code", 1))
            dist.broadcast_object_list(box, src=0)
            all_ranks(exc)
            raise
    dist.broadcast_object_list(box, src=0)
    if box[0][0] == "failed":
        raise all_ranks(RankFailed(f"on rank 0: {box[0][1]}", box[0][2]))
    return box[0][1]


def same_everywhere(identity: str, what: str) -> None:
    """Refuse, on every rank, to train when the ranks' `identity` (of config, data and code)
    differ: machines with other params or data would each train something else."""
    rank, size = world()
    if size == 1:
        return
    identities: list[Any] = [None] * size
    dist.all_gather_object(identities, identity)
    other = next((r for r, i in enumerate(identities) if i != identities[0]), None)
    if other is not None:
        raise all_ranks(ConfigError(
            f"rank {other} has another {what} than rank 0 ({identities[other][:12]} vs "
            f"{identities[0][:12]}); run every machine on the same commit, params and data"
        ))


def share(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous part of n items; the first n % world ranks take one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def all_sum(*values: torch.Tensor) -> list[float]:
    """Scalar tensors summed over all ranks, in one reduction (float64: counts stay exact)."""
    if world()[1] == 1:
        return [v.item() for v in values]  # (MPS has no float64)
    stacked = torch.stack([v.detach().double() for v in values])
    dist.all_reduce(stacked)
    return stacked.tolist()


NO_STEP = 2**62  # "no non-finite loss yet" in the cross-rank minimum of steps


def raise_if_diverged(first_bad: torch.Tensor, epoch: int) -> None:
    """The first step of the epoch whose loss was not finite on any rank. One reduction: every
    rank raises at the same check, none is left waiting in a collective."""
    if world()[1] > 1:
        first_bad = first_bad.clone()
        dist.all_reduce(first_bad, op=dist.ReduceOp.MIN)
    step = int(first_bad.item())
    if step != NO_STEP:
        raise all_ranks(TrainingDiverged(epoch, step))


# ---- batches ----


def augment_draws(n: int, crop_padding: int, flip: bool, generator: torch.Generator
                  ) -> dict[str, torch.Tensor]:
    """The random draws of n images' augmentation, from a CPU generator (small tensors), so the
    same seed gives the same augmentation on every device and every number of ranks."""
    draws = {}
    if crop_padding:
        draws["dy"] = torch.randint(0, 2 * crop_padding + 1, (n,), generator=generator)
        draws["dx"] = torch.randint(0, 2 * crop_padding + 1, (n,), generator=generator)
    if flip:
        draws["flip"] = torch.rand(n, generator=generator) < 0.5
    return draws


def apply_augment(x: torch.Tensor, draws: dict[str, torch.Tensor], crop_padding: int):
    """Random crop (after zero padding) and horizontal flip of a whole batch, on its device."""
    n, _, h, w = x.shape
    if "dy" in draws:
        p = crop_padding
        padded = nn.functional.pad(x, (p, p, p, p))
        dy, dx = draws["dy"].to(x.device), draws["dx"].to(x.device)
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if "flip" in draws:
        mask = draws["flip"].to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(3), x)
    return x


def augment(x: torch.Tensor, crop_padding: int, flip: bool, generator: torch.Generator):
    """Random crop (after zero padding) and horizontal flip of a whole batch."""
    return apply_augment(x, augment_draws(len(x), crop_padding, flip, generator), crop_padding)


def batches_of(split: Split, order: torch.Tensor, batch_size: int, crop_padding: int = 0,
               flip: bool = False, generator: torch.Generator | None = None,
               rank: int = 0, world: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """Training batches straight from the device-resident split: one gather per batch in the
    order given, augmented as a whole batch. No per-sample Python, no collation, no copies to
    the device (benchmarks/bench_datapath.py measures it against a DataLoader).

    Across `world` ranks, every rank walks the same order and takes its contiguous share of each
    global batch of `batch_size`; the augmentation draws for the whole global batch and slices,
    so the random streams of all ranks stay in step. Yields (images, labels, world / size of the
    global batch): the weight of a summed loss whose gradient DDP averages over the ranks.
    """
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        draws = augment_draws(len(idx), crop_padding, flip, generator) \
            if crop_padding or flip else {}
        weight = world / len(idx)
        if world > 1:
            part = share(len(idx), rank, world)
            idx, draws = idx[part], {k: v[part] for k, v in draws.items()}
        # index_select: the same gather as split.x[idx], several times faster on the CPU
        xb, yb = split.x.index_select(0, idx), split.y.index_select(0, idx)
        if draws:
            xb = apply_augment(xb, draws, crop_padding)
        yield xb, yb, weight


# ---- evaluation ----


@torch.no_grad()
def loss_and_correct(model: nn.Module, split: Split, batch_size: int, precision: str = "fp32"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (summed cross-entropy as float64, count of correct predictions) over the split."""
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
    return total_loss, correct


def evaluate(model: nn.Module, split: Split, batch_size: int, precision: str = "fp32"):
    """-> (mean cross-entropy, accuracy) over the split."""
    total_loss, correct = loss_and_correct(model, split, batch_size, precision)
    return total_loss.item() / len(split), correct.item() / len(split)


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    chunks = [model(x[i : i + batch_size]).float().softmax(1) for i in range(0, len(x), batch_size)]
    return torch.cat(chunks)


# ---- progress ----

PROGRESS_EVERY_S = 30.0  # without a terminal: a line at least this often within an epoch


class Progress:
    """On a terminal, tqdm bars over epochs and batches. Without one (CI, DVC's queue logs,
    `mlflow run`), a log line at least every PROGRESS_EVERY_S seconds within an epoch (step,
    loss, images per second): a long epoch is never silent. Cheap per step when off."""

    def __init__(self, enabled: bool, epochs: int, done: int, steps: int, batch_size: int):
        from tqdm.auto import tqdm

        self.tqdm, self.bars = tqdm, enabled and sys.stderr.isatty()
        self.lines = enabled and not self.bars
        self.epochs, self.steps, self.batch_size = epochs, steps, batch_size
        self.epoch_bar = tqdm(total=epochs, initial=done, desc="train", unit="epoch",
                              disable=not self.bars, dynamic_ncols=True)
        self.batch_bar: Any = None

    def start(self, epoch: int) -> None:
        self.epoch, self.started = epoch, time.monotonic()
        self.last_line = self.started
        self.batch_bar = self.tqdm(total=self.steps, desc=f"epoch {epoch}", leave=False,
                                   unit="batch", disable=not self.bars, dynamic_ncols=True)

    def step(self, step: int, loss: torch.Tensor) -> None:
        if self.bars:
            if step % 10 == 0:
                self.batch_bar.set_postfix(loss=f"{loss.item():.4f}")
            self.batch_bar.update()
        elif self.lines and time.monotonic() - self.last_line >= PROGRESS_EVERY_S:
            self.last_line = now = time.monotonic()
            log.info("epoch %d/%d  step %d/%d  loss %.4f  (%.0f img/s)", self.epoch, self.epochs,
                     step, self.steps, loss.item(), step * self.batch_size / (now - self.started))

    def end(self, row: dict[str, float]) -> None:
        self.batch_bar.close()
        self.epoch_bar.set_postfix(val_acc=f"{row['val/accuracy']:.4f}",
                                   img_s=f"{row['train/images_per_second']:.0f}")
        self.epoch_bar.update()

    def close(self) -> None:
        if self.batch_bar is not None:
            self.batch_bar.close()
        self.epoch_bar.close()


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
    rank, size = world()
    # faster convolutions and pooling: tensor cores on CUDA, vectorised kernels on the CPU
    channels_last = device.type in ("cuda", "cpu")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    batchnorms = _sync_batchnorm(model) if size > 1 and device.type == "cuda" else {}
    net = model
    if size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    net = torch.compile(net) if hp.compile else net
    opt = make_optimizer(model.parameters(), hp)
    steps = math.ceil(n / hp.batch_size)
    return _Loop(model, net, opt, make_schedule(opt, hp, steps),
                 torch.amp.GradScaler(device.type, enabled=hp.precision == "fp16"),
                 torch.Generator(device="cpu").manual_seed(hp.seed), device, rank, size, steps,
                 channels_last, batchnorms)


def _sync_batchnorm(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorm over the whole global batch (NCCL only: SyncBatchNorm refuses CPU tensors, so
    with gloo each rank normalises its own share). -> the BatchNorm modules replaced; they
    share their tensors with their stand-ins, and _finish puts them back."""
    kinds = nn.modules.batchnorm._BatchNorm
    originals = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return originals


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
    with _autocast(loop.device, hp.precision):
        logits = loop.net(xb).float()
        if loop.world == 1:
            loss = nn.functional.cross_entropy(logits, yb, label_smoothing=hp.label_smoothing)
            return loss, loss.detach() * len(yb), logits
        total = nn.functional.cross_entropy(logits, yb, label_smoothing=hp.label_smoothing,
                                            reduction="sum")
    return total * weight, total.detach(), logits


def _optimise(loop: _Loop, loss: torch.Tensor) -> None:
    loop.opt.zero_grad(set_to_none=True)
    if loop.scaler.is_enabled():  # fp16 only
        loop.scaler.scale(loss).backward()
        loop.scaler.step(loop.opt)
        loop.scaler.update()
    else:
        loss.backward()
        loop.opt.step()
    loop.schedule.step()


def _train_epoch(loop: _Loop, train: Split, hp: Hyper, progress: Progress
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass over a fresh seeded permutation; -> this rank's summed loss and correct count."""
    epoch, device = loop.epoch + 1, loop.device
    loop.net.train()
    order = torch.randperm(len(train), generator=loop.generator).to(device)
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    # Reading a loss syncs a GPU, and across ranks the check is a reduction: there the first
    # non-finite step is remembered on the device and looked at every 50 steps.
    every_step = device.type == "cpu" and loop.world == 1
    first_bad = torch.full((), NO_STEP, device=device, dtype=torch.long)
    progress.start(epoch)
    batches = batches_of(train, order, hp.batch_size, hp.crop_padding, hp.flip, loop.generator,
                         loop.rank, loop.world)
    for step, (xb, yb, weight) in enumerate(batches, start=1):
        loss, batch_loss, logits = _forward(loop, xb, yb, weight, hp)
        if every_step:
            if not math.isfinite(loss.item()):
                raise TrainingDiverged(epoch, step)
        else:
            bad = (first_bad == NO_STEP) & ~torch.isfinite(loss.detach())
            first_bad = torch.where(bad, step, first_bad)
            if step % 50 == 0 or step == loop.steps:
                raise_if_diverged(first_bad, epoch)
        _optimise(loop, loss)
        loss_sum += batch_loss
        correct += (logits.detach().argmax(1) == yb).sum()
        progress.step(step, loss)
    return loss_sum, correct


def _validate(loop: _Loop, val: Split, hp: Hyper) -> tuple[float, float]:
    """-> (val loss, val accuracy). Each rank measures its share of the split (with the plain
    module: DDP would broadcast buffers at every batch) and the sums are reduced, so every rank
    sees the same figures and early-stops with the others."""
    part = share(len(val), loop.rank, loop.world)
    model = loop.net if loop.world == 1 else loop.model
    sums = loss_and_correct(model, Split(val.x[part], val.y[part]), max(hp.batch_size, 512),
                            hp.precision)
    total_loss, correct = all_sum(*sums)
    return total_loss / len(val), correct / len(val)


def _epoch(loop: _Loop, train: Split, val: Split, hp: Hyper, progress: Progress
           ) -> dict[str, float]:
    """Train and validate one epoch; -> its row of metrics (MLflow names)."""
    started = time.perf_counter()
    sums = _train_epoch(loop, train, hp, progress)
    if loop.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    loss_sum, correct = all_sum(*sums)
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
    for name, module in loop.batchnorms.items():
        module.train(loop.model.training)
        loop.model.set_submodule(name, module)
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
