"""Training batches straight from a device-resident split, with whole-batch augmentation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from reprolab.data import Split
from reprolab.ddp import share


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
               rank: int = 0, world: int = 1, device: torch.device | None = None
               ) -> Iterator[tuple[torch.Tensor, torch.Tensor, float]]:
    """Training batches straight from the split: one gather per batch in the order given,
    augmented as a whole batch on `device`. No per-sample Python, no collation
    (benchmarks/bench_datapath.py measures it against a DataLoader). A split held on the device
    is gathered there; a mapped one (data.load_training_data) is gathered on the CPU from the
    page cache and copied to the device one batch ahead (`ahead`).

    Across `world` ranks, every rank walks the same order and takes its contiguous share of each
    global batch of `batch_size`; the augmentation draws for the whole global batch and slices,
    so the random streams of all ranks stay in step. Yields (images, labels, world / size of the
    global batch): the weight of a summed loss whose gradient DDP averages over the ranks.
    """
    device = device or split.x.device
    gathered = _gathered(split, order, batch_size, crop_padding, flip, generator, rank, world)
    if split.x.device != device:
        gathered = ahead(gathered, device)
    for xb, yb, weight, draws in gathered:
        if draws:
            xb = apply_augment(xb, draws, crop_padding)
        yield xb, yb, weight


def _gathered(split: Split, order: torch.Tensor, batch_size: int, crop_padding: int,
              flip: bool, generator: torch.Generator | None, rank: int, world: int
              ) -> Iterator[tuple[torch.Tensor, torch.Tensor, float, dict[str, torch.Tensor]]]:
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        draws = augment_draws(len(idx), crop_padding, flip, generator) \
            if crop_padding or flip else {}
        weight = world / len(idx)
        if world > 1:
            part = share(len(idx), rank, world)
            idx, draws = idx[part], {k: v[part] for k, v in draws.items()}
        # index_select: the same gather as split.x[idx], several times faster on the CPU
        yield split.x.index_select(0, idx), split.y.index_select(0, idx), weight, draws


def ahead(batches: Iterator[tuple[Any, ...]], device: torch.device) -> Iterator[tuple[Any, ...]]:
    """Batches gathered on the CPU, copied to `device` one step ahead: on a GPU from pinned
    memory without waiting, so the copy of batch i + 1 overlaps the step on batch i."""
    cuda = device.type == "cuda"
    waiting = None
    for xb, yb, *rest in batches:
        if cuda:
            xb, yb = xb.pin_memory(), yb.pin_memory()
        moved = (xb.to(device, non_blocking=cuda), yb.to(device, non_blocking=cuda), *rest)
        if waiting is not None:
            yield waiting
        waiting = moved
    if waiting is not None:
        yield waiting
