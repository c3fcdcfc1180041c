"""The built-in networks: ordinary entries of the model table (`model.name: simple_cnn`), written
to the same contract as a network of your own (nets/example.py); and the input stage that every
model starts with.

The contract: a callable taking `num_classes` and `in_chans` (and `input_size`, height and
width, when its signature names it), plus the keywords of `model.kwargs`, that returns an
`nn.Module` mapping float images N x in_chans x H x W, already normalised, to N x num_classes
logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class InputStage(nn.Module):
    """Raw pixels (0..255) in, the network's input out, on the device: grayscale repeated to
    the channels the network takes, resized to its input size, normalised with `mean` and
    `std` per channel (stored as buffers, in pixel units)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], data_shape: Sequence[int],
                 channels: int | None = None, size: Sequence[int] | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        data_channels, *data_size = data_shape
        self.repeat = channels if channels and channels != data_channels else None
        self.size = tuple(size) if size and tuple(size) != tuple(data_size) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.repeat is not None:
            x = x.expand(-1, self.repeat, -1, -1)
        if self.size is not None:
            x = nn.functional.interpolate(x, size=self.size, mode="bilinear",
                                          align_corners=False)
        return (x - self.mean) / self.std


class SimpleCNN(nn.Module):
    """The classic net: conv 32 -> conv 64 (each ReLU + 2x2 max-pool) -> fc hidden -> fc K.

    Padding 1 keeps the spatial size through each conv, so any image of at least 4x4 pixels and
    any channel count works; the flattened size follows from the image size.
    """

    def __init__(self, num_classes: int, in_chans: int, input_size: tuple[int, int],
                 hidden: int = 128):
        super().__init__()
        height, width = input_size
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, padding=1),
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

    def __init__(self, num_classes: int, in_chans: int, width: int = 64):
        super().__init__()
        if width < 2:
            raise ValueError(f"width = {width}: allowed: 2 or more")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width // 2, 2, padding=1), nn.GELU())
        self.groups = nn.Sequential(
            ConvGroup(width // 2, width), ConvGroup(width, 4 * width),
            ConvGroup(4 * width, 4 * width),
        )
        self.head = nn.Linear(4 * width, num_classes, bias=False)
        self.scale = 1 / 9

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.groups(self.stem(x))
        return self.head(torch.amax(x, dim=(2, 3))) * self.scale


def resnet18(num_classes: int, in_chans: int, input_size: tuple[int, int]) -> nn.Module:
    """torchvision's ResNet-18 (random init); a 3x3 stride-1 stem without max-pool for images
    up to 64 pixels, so that 32x32 inputs keep their resolution."""
    from torchvision.models import resnet18 as torchvision_resnet18

    net = torchvision_resnet18(weights=None, num_classes=num_classes)
    if max(input_size) <= 64:
        net.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_chans != 3:
        net.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
    return net
