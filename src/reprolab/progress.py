"""The progress of a fit: bars on a terminal, a log line at least every half minute without."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

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

