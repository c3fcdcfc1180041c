"""The optimizer and the per-step learning-rate schedule of a fit, from its Hyper.

OPTIMIZERS and SCHEDULES are the tables that params.yaml's names come from (config.py reads them;
torch is imported only when an optimizer is made).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from reprolab.engine import Hyper


def _sgd(torch: Any, groups: list[dict[str, Any]], hp: Hyper, fused: bool | None) -> Any:
    return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum,
                           nesterov=hp.nesterov and hp.momentum > 0,
                           weight_decay=hp.weight_decay, fused=fused)


def _adam(torch: Any, groups: list[dict[str, Any]], hp: Hyper, fused: bool | None) -> Any:
    return torch.optim.Adam(groups, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)


def _adamw(torch: Any, groups: list[dict[str, Any]], hp: Hyper, fused: bool | None) -> Any:
    return torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay, fused=fused)


def _rmsprop(torch: Any, groups: list[dict[str, Any]], hp: Hyper, fused: bool | None) -> Any:
    return torch.optim.RMSprop(groups, lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)


# train.optimizer and tune.optimizers name these
OPTIMIZERS: dict[str, Callable[..., Any]] = {
    "sgd": _sgd, "adam": _adam, "adamw": _adamw, "rmsprop": _rmsprop,
}
SCHEDULES = ("constant", "cosine", "onecycle")


def param_groups(model: Any, hp: Hyper) -> list[dict[str, Any]]:
    """One group of every parameter; when fine-tuning (a head named), the backbone's group first
    at lr x backbone_lr_scale, then the head's at lr. Two groups also keep each group's state
    uniform when a frozen backbone starts to train (fused SGD refuses momentum buffers that
    exist for some parameters of a group and not for others)."""
    named = list(model.named_parameters())
    if not hp.head:
        return [{"params": [p for _, p in named]}]
    head = [p for n, p in named if n.startswith(hp.head + ".")]
    backbone = [p for n, p in named if not n.startswith(hp.head + ".")]
    return [{"params": backbone, "lr": hp.lr * hp.backbone_lr_scale}, {"params": head}]


def make_optimizer(model: Any, hp: Hyper) -> torch.optim.Optimizer:
    import torch

    groups = param_groups(model, hp)
    # One fused kernel per step instead of several ops per parameter tensor (CPU and CUDA)
    fused = groups[0]["params"][0].device.type in ("cpu", "cuda") or None
    if hp.optimizer not in OPTIMIZERS:
        raise AssertionError(f"unknown optimizer {hp.optimizer!r}: the config refuses it")
    return OPTIMIZERS[hp.optimizer](torch, groups, hp, fused)


def make_schedule(opt: torch.optim.Optimizer, hp: Hyper, steps_per_epoch: int) -> Any:
    """A per-step learning-rate schedule with linear warm-up over `warmup_epochs`: torch's own
    schedulers. Step s of w warm-up steps runs at (s + 1) / w of the lr, then constant or cosine
    down to 0 at the last step (tests/test_engine.py checks every step's lr against that
    formula). Each parameter group follows it from its own lr."""
    import torch

    sched = torch.optim.lr_scheduler
    total = hp.epochs * steps_per_epoch
    warmup = round(hp.warmup_epochs * steps_per_epoch)
    if hp.schedule == "onecycle":
        pct = min(max(warmup / total, 1 / total), 0.99) if warmup else 0.3
        peaks = [group["lr"] for group in opt.param_groups]
        return sched.OneCycleLR(
            opt, max_lr=peaks if len(peaks) > 1 else hp.lr, total_steps=total, pct_start=pct,
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
