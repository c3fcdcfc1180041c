"""The optimizer and the per-step learning-rate schedule of a fit, from its Hyper."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from reprolab.engine import Hyper


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

