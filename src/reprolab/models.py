"""Model registry: name -> constructor. Every model takes raw pixels and normalises inside.

A model built here takes float32 images N x C x H x W with pixel values 0..255 (the uint8 values
of the processed splits, or of an image file) and returns logits. `with_probabilities` wraps it
for serving so that the logged model returns class probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the train split's statistics stored as buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class SimpleCNN(nn.Module):
    """The classic net: conv 32 -> conv 64 (each ReLU + 2x2 max-pool) -> fc hidden -> fc K.

    Padding 1 keeps the spatial size through each conv, so any image of at least 4x4 pixels and
    any channel count works; the flattened size follows from the image size.
    """

    def __init__(self, channels: int, height: int, width: int, num_classes: int, hidden: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        flat = 64 * (height // 4) * (width // 4)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _simple_cnn(shape: Sequence[int], num_classes: int, hidden: int) -> nn.Module:
    channels, height, width = shape
    return SimpleCNN(channels, height, width, num_classes, hidden)


MODELS: dict[str, Callable[..., nn.Module]] = {"simple_cnn": _simple_cnn}


def model_spec(
    name: str, shape: Sequence[int], num_classes: int, hidden: int, mean: Sequence[float],
    std: Sequence[float],
) -> dict[str, Any]:
    """Everything needed to rebuild a model; saved in the checkpoint beside its weights."""
    return {
        "name": name, "shape": list(shape), "num_classes": num_classes, "hidden": hidden,
        "mean": list(mean), "std": list(std),
    }


def build(spec: dict[str, Any]) -> nn.Sequential:
    body = MODELS[spec["name"]](spec["shape"], spec["num_classes"], spec["hidden"])
    return nn.Sequential(Normalize(spec["mean"], spec["std"]), body)


def with_probabilities(model: nn.Module) -> nn.Module:
    return nn.Sequential(model, nn.Softmax(dim=1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
