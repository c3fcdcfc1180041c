"""Time to accuracy on real MNIST: the plain loop of the PyTorch tutorials against reprolab's
engine, on one device, with the test set evaluated after every epoch (the clock includes it).

Needs only torch and torchvision (no config, MLflow, DVC or Optuna), so that
benchmarks/gpu_check.sh runs it on a GPU machine that has nothing else; the CPU benchmark
(bench_time_to_accuracy.py) runs the same functions.

`mnist` is a folder holding `MNIST/raw/` with the four IDX files (torchvision's layout).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass
class Reach:
    """One run towards the target: when it got there (or not), and its curve."""

    seconds: float | None  # wall-clock from the first step to the evaluation that reached it
    epoch: int | None  # the epoch after which the test accuracy first reached the target
    accuracies: list[float] = field(default_factory=list)  # test accuracy after each epoch
    epoch_seconds: list[float] = field(default_factory=list)  # cumulative, at each evaluation

    @property
    def reached(self) -> bool:
        return self.epoch is not None


def mnist_arrays(mnist: Path) -> dict[str, tuple[Any, Any]]:
    """{"train": (uint8 N x 1 x 28 x 28, int64 labels), "test": (...)} from the IDX files."""
    from reprolab.data.torchvision_sets import read_idx

    raw = Path(mnist) / "MNIST" / "raw"
    out = {}
    for split, (images, labels) in IDX.items():
        out[split] = (read_idx(raw / images)[:, None], read_idx(raw / labels).astype("int64"))
    return out


def tiny_mnist(folder: Path, gz: bool = False) -> Path:
    """The four MNIST files with 300 training and 100 test images: a bright square whose corner
    is the label (learnable in one epoch)."""
    import gzip

    import numpy as np
    from workloads import write_idx

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 300), ("t10k", 100)):
        labels = rng.integers(0, 4, n)
        images = rng.integers(0, 40, (n, 28, 28))
        for i, label in enumerate(labels):
            r, c = divmod(int(label), 2)
            images[i, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] += 200
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            path = folder / f"{prefix}-{kind}-ubyte"
            write_idx(path, array)
            if gz:
                path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
                path.unlink()
    return folder


def tutorial_net() -> Any:
    """The seed article's net: 3x3 convs of 32 and 64 channels (padding 1), each with ReLU and
    2x2 max-pool, fc 128, fc 10."""
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def plain_loop(device: Any, mnist: Path, target: float, max_epochs: int, seed: int) -> Reach:
    """The PyTorch tutorials' loop as the seed article writes it: torchvision's MNIST with
    ToTensor() and no workers, batches of 64 from a DataLoader, Adam at 1e-3, fp32 on all 60,000
    training images, the test set evaluated after each epoch."""
    import torch
    from torch import nn
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    train = datasets.MNIST(str(mnist), train=True, download=False,
                           transform=transforms.ToTensor())
    test = datasets.MNIST(str(mnist), train=False, download=False,
                          transform=transforms.ToTensor())
    loader = torch.utils.data.DataLoader(train, batch_size=64, shuffle=True)
    test_loader = torch.utils.data.DataLoader(test, batch_size=1000)
    model = tutorial_net().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    reach = Reach(None, None)
    started = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in test_loader:
                correct += (model(x.to(device)).argmax(1) == y.to(device)).sum().item()
        reach.accuracies.append(correct / len(test))
        reach.epoch_seconds.append(time.perf_counter() - started)
        if reach.accuracies[-1] >= target:
            reach.seconds, reach.epoch = reach.epoch_seconds[-1], epoch
            return reach
    return reach


class _Reached(Exception):
    pass


def engine_run(device: Any, arrays: dict[str, tuple[Any, Any]], spec: dict[str, Any],
               hyper: Any, target: float, val_size: int = 5000) -> Reach:
    """reprolab's engine (`fit`) on the whole training set held on the device, the test split
    evaluated after each epoch; `val_size` images at the end of the training set are the
    validation split fit() needs (the recipe trains on the rest). Stops at the target."""
    import torch

    from reprolab.data import Split
    from reprolab.device import seed_everything
    from reprolab.engine import evaluate, fit
    from reprolab.models import build

    (x, y), (tx, ty) = arrays["train"], arrays["test"]
    train = Split(torch.from_numpy(x[:-val_size]), torch.from_numpy(y[:-val_size])).to(device)
    val = Split(torch.from_numpy(x[-val_size:]), torch.from_numpy(y[-val_size:])).to(device)
    test = Split(torch.from_numpy(tx), torch.from_numpy(ty)).to(device)
    seed_everything(hyper.seed)
    model = build(spec).to(device)
    reach = Reach(None, None)
    started = time.perf_counter()

    def on_epoch(row: dict[str, float]) -> None:
        accuracy = evaluate(model, test, 2048, hyper.precision)[1]
        if device.type == "cuda":
            torch.cuda.synchronize()
        reach.accuracies.append(accuracy)
        reach.epoch_seconds.append(time.perf_counter() - started)
        if accuracy >= target:
            reach.seconds, reach.epoch = reach.epoch_seconds[-1], int(row["epoch"])
            raise _Reached

    with contextlib.suppress(_Reached):
        fit(model, train, val, hyper, on_epoch=on_epoch)
    return reach


def train_stats(arrays: dict[str, tuple[Any, Any]], val_size: int = 5000
                ) -> tuple[list[float], list[float]]:
    """Mean and std of the training images (less the validation part), as preprocess records
    them in meta.json and the model's input stage uses them."""
    x = arrays["train"][0][:-val_size].astype("float64")
    return [float(x.mean())], [float(x.std())]


BEST = Path(__file__).resolve().parent / "mnist_best.txt"


def best_overrides(path: Path = BEST) -> list[str]:
    """The recipe's `-S` overrides: benchmarks/mnist_best.txt without its comments."""
    import shlex

    return [item for line in path.read_text().splitlines() if not line.startswith("#")
            for item in shlex.split(line)]


def best_recipe(arrays: dict[str, tuple[Any, Any]], device: Any, epochs: int | None = None,
                val_size: int = 5000) -> tuple[dict[str, Any], Any]:
    """reprolab's best recipe for MNIST (benchmarks/mnist_best.txt) as a model spec and the
    engine's settings, read without reprolab's config (the GPU machine has no pydantic);
    tests/test_benchmarks.py checks that `reprolab train` with the same overrides builds the
    same."""
    from reprolab.device import select_precision
    from reprolab.engine import Hyper
    from reprolab.models import model_spec

    o = dict(item.split("=", 1) for item in best_overrides())
    width = int(o["model.kwargs"].strip("{}").split(":")[1])
    mean, std = train_stats(arrays, val_size)
    spec = model_spec(o["model.name"], (1, 28, 28), 10, mean, std, {"width": width})
    hyper = Hyper(optimizer=o["train.optimizer"], lr=float(o["train.lr"]),
                  epochs=epochs or int(o["train.epochs"]), batch_size=int(o["train.batch_size"]),
                  weight_decay=float(o["train.weight_decay"]), schedule=o["train.schedule"],
                  warmup_epochs=float(o["train.warmup_epochs"]),
                  label_smoothing=float(o["train.label_smoothing"]),
                  precision=select_precision(o["train.precision"], device, (1, 28, 28)), seed=0)
    return spec, hyper


def with_seed(hyper: Any, seed: int) -> Any:
    import dataclasses

    return dataclasses.replace(hyper, seed=seed)
