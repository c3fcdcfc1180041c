"""A network of your own: copy this file, change the class, and name it in params.yaml:

    model:
      name: nets.example:TinyNet
      kwargs: {hidden: 32}

The contract: reprolab calls it with `num_classes` and `in_chans` (and `input_size`, height and
width, when the signature names it) plus the keywords of `model.kwargs`, and it returns an
nn.Module that maps float images N x in_chans x H x W, already normalised, to N x num_classes
logits. Keep the classifier in a child named `head` (or `fc`, `classifier`): fine-tuning tells it
from the backbone by that name. Editing this folder makes `tune` and `train` stale in DVC, and the
registered model serves without it (it is traced, not imported).
"""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv -> BatchNorm -> ReLU, twice, global average pool, a linear head."""

    def __init__(self, num_classes: int, in_chans: int, hidden: int = 32):
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(in_chans, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))
