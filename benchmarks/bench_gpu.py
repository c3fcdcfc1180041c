"""7. GPU mode (CUDA only; on a machine without CUDA it reports that it was skipped).

- Images per second of each model at bf16 against fp32 (autocast), one epoch of a
  CIFAR-10-sized set (random pixels) per round, batches of 512.
- Time to 99% test accuracy on MNIST, with the four MNIST files placed by hand under
  --mnist (default data/raw/mnist/MNIST/raw, torchvision's layout): fast_cnn, params.yaml's
  train section, bf16, the test split evaluated after every epoch; the clock includes that.
- torchrun on the GPUs (benchmarks/bench_scaling.py's ranks, NCCL): with 2 or more GPUs, all of
  them against 1 on the same global batch (speed-up and scaling efficiency); with one, a 1-rank
  smoke run under torchrun on cuda:0 (the NCCL path), its images per second.

    python benchmarks/bench_gpu.py [--device cuda] [--mnist DIR] [--images N] [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import tempfile
import time
from pathlib import Path

from harness import REPO, Row, alternate, pipeline_project, quiet, report, row_from

MODELS = ("simple_cnn", "fast_cnn", "resnet18")


class Reached(Exception):
    """The target accuracy was reached: stop training."""


def throughput_rows(device, images: int, rounds: int) -> list[Row]:
    import torch

    from reprolab.data import Split
    from reprolab.engine import Hyper, fit
    from reprolab.models import build, model_spec

    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (images,), generator=gen)
    train = Split(x, y).to(device)
    val = Split(x[:512], y[:512]).to(device)
    rows = []
    for name in MODELS:
        spec = model_spec(name, [3, 32, 32], 10, [125.0] * 3, [63.0] * 3,
                          {"width": 64} if name == "fast_cnn" else {})

        def side(precision: str, spec=spec) -> float:
            model = build(spec).to(device)
            hyper = Hyper(optimizer="sgd", lr=0.01, epochs=1, batch_size=512,
                          precision=precision)
            return fit(model, train, val, hyper).last["train/images_per_second"]

        samples = alternate(lambda: side("bf16"), lambda: side("fp32"), rounds=rounds)
        rows.append(row_from(samples, name=f"{name} images/s, {images:,} images 32x32",
                             a_label="bf16", b_label="fp32", unit="img/s", ratio="A/B"))
    return rows


def time_to_accuracy(device, mnist: Path, target: float) -> Row | None:
    from reprolab import recipe
    from reprolab.data import load_split, load_training_data
    from reprolab.data.torchvision_sets import SPECS, missing_files
    from reprolab.device import seed_everything
    from reprolab.engine import evaluate, fit

    root = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    raw = root / "data" / "raw" / "mnist" / SPECS["mnist"].folder
    if missing_files("mnist", mnist.parents[1]):
        print(f"time to {target:.0%} on MNIST: skipped, the MNIST files are not in {mnist}")
        return None
    shutil.copytree(mnist, raw)
    cfg = pipeline_project(root, "data.dataset=mnist", "model.name=fast_cnn",
                         "train.use_tuned=false", f"train.device={device}", "train.epochs=50")()
    seed_everything(cfg.seed)
    meta, train_split, val_split = load_training_data(cfg.processed_dir, device)
    test_split = load_split(cfg.processed_dir, "test").to(device)
    model = recipe.model_recipe(cfg, meta).build().to(device)
    hyper = recipe.hyper_for(cfg, cfg.train.epochs, device, meta["shape"])
    reached: dict[str, float] = {}

    def on_epoch(row: dict[str, float]) -> None:
        accuracy = evaluate(model, test_split, 1024, hyper.precision)[1]
        if accuracy >= target:
            reached.update(epoch=row["epoch"], accuracy=accuracy)
            raise Reached

    started = time.perf_counter()
    with contextlib.suppress(Reached):
        fit(model, train_split, val_split, hyper, on_epoch=on_epoch)
    seconds = time.perf_counter() - started
    return Row(name=f"time to {target:.0%} test accuracy, MNIST fast_cnn", a_label="engine",
               b_label="", a=seconds, b=0.0, unit="s", ratio=reached.get("epoch", 0),
               ratio_label="epochs", control=None, target="", met=None, rounds=1,
               note=(f"reached {reached['accuracy']:.4f} after {reached['epoch']} epochs"
                     if reached else f"not reached in {cfg.train.epochs} epochs"))


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mnist", type=Path, default=REPO / "data/raw/mnist/MNIST/raw")
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--accuracy", type=float, default=0.99)
    args = parser.parse_args(argv)
    quiet()
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        report("gpu", [], {"skipped": "no CUDA device on this machine"})
        return []
    device = torch.device(args.device)
    rows = throughput_rows(device, args.images, args.rounds)
    row = time_to_accuracy(device, args.mnist, args.accuracy)
    rows += ([row] if row else []) + torchrun_rows(args.rounds)
    report("gpu", rows)
    return rows


def torchrun_rows(rounds: int) -> list[Row]:
    """N GPUs against 1 under torchrun (bench_scaling.py's ranks), or a 1-GPU smoke run."""
    import argparse

    import bench_scaling
    import torch

    gpus = torch.cuda.device_count()
    ranks = argparse.Namespace(device="cuda", images=60_000, batch=1024)
    seen: dict = {}
    if gpus < 2:
        speed = bench_scaling.launch(1, ranks, seen)
        return [Row(name="torchrun smoke, 1 rank on cuda:0 (NCCL), MNIST-shaped 60,000 images",
                    a_label="1 rank", b_label="", a=speed, b=0.0, unit="img/s", ratio=1.0,
                    ratio_label="-", control=None, target="", met=None, rounds=1,
                    note=f"one GPU here: no scaling figure; {seen[1, 0]}")]
    samples = alternate(lambda: bench_scaling.launch(gpus, ranks, seen),
                        lambda: bench_scaling.launch(1, ranks, seen), rounds=rounds)
    row = row_from(samples, name=f"torchrun, {gpus} GPUs vs 1, MNIST-shaped 60,000 images, "
                   "global batch 1024", a_label=f"{gpus} GPUs", b_label="1 GPU", unit="img/s",
                   ratio="A/B")
    row.note = f"scaling efficiency {row.ratio / gpus:.0%}; NCCL; {seen[gpus, 0]}"
    return [row]


if __name__ == "__main__":
    main()
