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


class ConvGroup(nn.Sequential):
    """conv -> 2x2 max-pool -> BN -> GELU -> conv -> BN -> GELU, as in the fast CIFAR-10 nets."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.MaxPool2d(2, ceil_mode=True),  # ceil: a 1x1 map stays 1x1 on tiny images
            nn.BatchNorm2d(cout),
            nn.GELU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.GELU(),
        )


class FastCNN(nn.Module):
    """A small batch-normalised conv net in the spirit of the fastest CIFAR-10 training scripts
    (airbench): a 2x2 stem, three conv groups of widths w, 4w, 4w, global max-pool, a linear
    head without bias whose logits are scaled down for a calm start."""

    def __init__(self, channels: int, num_classes: int, width: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width // 2, 2, padding=1), nn.GELU())
        self.groups = nn.Sequential(
            ConvGroup(width // 2, width), ConvGroup(width, 4 * width),
            ConvGroup(4 * width, 4 * width),
        )
        self.head = nn.Linear(4 * width, num_classes, bias=False)
        self.scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.stem(x))
        return self.head(torch.amax(x, dim=(2, 3))) * self.scale


def _simple_cnn(spec: dict[str, Any]) -> nn.Module:
    channels, height, width = spec["shape"]
    return SimpleCNN(channels, height, width, spec["num_classes"], spec["hidden"])


def _resnet18(spec: dict[str, Any]) -> nn.Module:
    """torchvision's ResNet-18 (random init); a 3x3 stride-1 stem without max-pool for images
    up to 64 pixels, so that 32x32 inputs keep their resolution."""
    from torchvision.models import resnet18

    channels, height, width = spec["shape"]
    net = resnet18(weights=None, num_classes=spec["num_classes"])
    if max(height, width) <= 64:
        net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    return net


def _fast_cnn(spec: dict[str, Any]) -> nn.Module:
    return FastCNN(spec["shape"][0], spec["num_classes"], spec["width"])


MODELS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "simple_cnn": _simple_cnn,
    "resnet18": _resnet18,
    "fast_cnn": _fast_cnn,
}


def model_spec(
    name: str, shape: Sequence[int], num_classes: int, mean: Sequence[float],
    std: Sequence[float], hidden: int = 128, width: int = 64,
) -> dict[str, Any]:
    """Everything needed to rebuild a model; saved in the checkpoint beside its weights."""
    return {
        "name": name, "shape": list(shape), "num_classes": num_classes, "hidden": hidden,
        "width": width, "mean": list(mean), "std": list(std),
    }


def build(spec: dict[str, Any]) -> nn.Sequential:
    return nn.Sequential(Normalize(spec["mean"], spec["std"]), MODELS[spec["name"]](spec))


def with_probabilities(model: nn.Module) -> nn.Module:
    return nn.Sequential(model, nn.Softmax(dim=1))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the model file (models/model.pt): train writes it, evaluate reads it ----


def save_checkpoint(path: Any, spec: dict[str, Any], model: nn.Module) -> None:
    """The spec and the weights, nothing else: the file is a pure function of both, so its
    sha256 names the model (MLflow runs and registry versions carry it)."""
    torch.save({"spec": spec, "state_dict": model.state_dict()}, path)


def load_checkpoint(path: Any) -> tuple[nn.Module, dict[str, Any]]:
    """-> (model in eval mode, spec); loading runs no pickled code (weights_only)."""
    from pathlib import Path

    from reprolab.errors import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; run `reprolab train` first")
    blob = torch.load(path, weights_only=True, map_location="cpu")
    model = build(blob["spec"])
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob["spec"]


def check_fits(model_shape: Any, data_shape: Any, model_what: str, data_what: str, fix: str
               ) -> None:
    """Refuse, in one line, a model whose input (C x H x W) is not the data's: a model of 8x8
    digits asked about 28x28 images would fail deep inside torch, or answer nonsense."""
    from reprolab.errors import DataError

    model_shape, data_shape = tuple(model_shape), tuple(data_shape)
    if model_shape != data_shape:
        def text(shape: tuple[int, ...]) -> str:
            return f"{'x'.join(map(str, shape))} ({shape[0]} channel{'s' * (shape[0] != 1)})"

        raise DataError(f"{model_what}: takes {text(model_shape)} images, but {data_what} holds "
                        f"{text(data_shape)}; {fix}")
