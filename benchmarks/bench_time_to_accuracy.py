"""8. Time to accuracy on real MNIST, on this machine's CPU: how soon each setup first reaches
99% test accuracy (wall-clock from the first step, the per-epoch test evaluations included).

- **plain**: the PyTorch tutorials' loop that reprolab replaces (benchmarks/tta.py:
  plain_loop: the seed article's net, Adam at 1e-3, batches of 64 from a DataLoader over
  torchvision's MNIST with ToTensor(), fp32, all 60,000 training images);
- **defaults**: reprolab's engine (`fit`) with params.yaml's `model` and `train` sections as
  shipped and `train.use_tuned=false`, on the whole training set less a 5,000-image
  validation split; beside it, what the whole `reprolab train` command adds for one epoch
  (start-up, MLflow, checkpoints);
- **best**: reprolab's best recipe for this set (benchmarks/mnist_best.yaml, the same as
  tta.best_recipe), over 5 seeds: the spread, and the share that reached the target.

    python benchmarks/bench_time_to_accuracy.py [--mnist DIR] [--repeats 3] [--seeds 5]

`--mnist`: a folder holding MNIST/raw/ with the four IDX files (default data/raw/mnist, where
`reprolab fetch` puts them; ../shared/datasets/mnist on our machines). Without the files the
benchmark reports that it was skipped. BENCH_QUICK: tiny IDX files (tta.tiny_mnist), one repeat, a
low target: it checks the code, its figures mean nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tta
from harness import QUICK, REPO, Row, quiet, report, scratch

TARGET = 0.99


def defaults(arrays: dict[str, Any], device: Any, max_epochs: int | None = None,
             val_size: int = 5000) -> tuple[dict, Any]:
    """params.yaml's model and train sections as shipped (train.use_tuned=false), for MNIST:
    the schedule runs over train.epochs, as `reprolab train` runs it (the run stops at the
    target); `max_epochs` shortens it (the quick mode)."""
    from reprolab.config import load_config
    from reprolab.models import model_spec
    from reprolab.recipe import hyper_for

    cfg = load_config(REPO / "params.yaml", ["data.dataset=mnist", "train.use_tuned=false"])
    mean, std = tta.train_stats(arrays, val_size)
    spec = model_spec(cfg.model.name, (1, 28, 28), 10, mean, std, dict(cfg.model.kwargs))
    hyper = hyper_for(cfg, max_epochs or cfg.train.epochs, device, [1, 28, 28])
    return spec, hyper


def command_cost(mnist: Path, arrays: dict[str, Any], device: Any) -> tuple[float, float]:
    """-> (seconds of `reprolab train -S train.epochs=1` on MNIST with the defaults, seconds of
    one epoch of the same through `fit` in this process): what the whole command adds."""
    import shutil

    from harness import pipeline_project

    root = scratch("bench-tta-")
    shutil.copytree(mnist / "MNIST", root / "data" / "raw" / "mnist" / "MNIST")
    pipeline_project(root, "data.dataset=mnist", "train.use_tuned=false")
    started = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "reprolab"), "train", "-q", "--params",
                    str(root / "params.yaml"), "-S", "data.dataset=mnist",
                    "-S", "train.use_tuned=false", "-S", "train.epochs=1"],
                   cwd=root, check=True, env=_env(root))
    whole = time.perf_counter() - started
    spec, hyper = defaults(arrays, device, 1)
    epoch = tta.engine_run(device, arrays, spec, hyper, 2.0).epoch_seconds[0]
    return whole, epoch


def _env(root: Path) -> dict[str, str]:
    import os

    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}


def summarise(name: str, reaches: list[tta.Reach], plain_seconds: float | None, target: float,
              wanted: str = "") -> Row:
    """One setup's row: median seconds to `target` over its runs, the spread, the share that
    reached it, and the plain loop's median over this one (the speed-up), against `wanted`."""
    from harness import check

    times = [r.seconds for r in reaches if r.reached]
    finals = [max(r.accuracies) if r.accuracies else 0.0 for r in reaches]
    seconds = statistics.median(times) if times else float("nan")
    speedup = plain_seconds / seconds if plain_seconds and times else float("nan")
    epochs = sorted({r.epoch for r in reaches if r.reached})
    note = (f"reached {len(times)}/{len(reaches)}; seconds {', '.join(f'{t:.1f}' for t in times)}"
            f"; epochs {epochs}; best accuracy {min(finals):.4f}..{max(finals):.4f}")
    met = (check(speedup, wanted) if times else False) if wanted else None
    return Row(name=f"{name}: time to {target:.1%} test accuracy", a_label=name,
               b_label="plain", a=seconds, b=plain_seconds or float("nan"), unit="s",
               ratio=speedup, ratio_label="B/A", control=None, target=wanted,
               met=met, rounds=len(reaches),
               samples={"seconds": [r.seconds or float("nan") for r in reaches],
                        "accuracies": [r.accuracies for r in reaches]}, note=note)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=REPO / "data" / "raw" / "mnist")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-epochs", type=int, default=8, help="of the plain loop")
    args = parser.parse_args(argv)
    quiet()
    import torch

    from reprolab.device import cpu_has_native_bf16

    mnist, target, device = args.mnist, TARGET, torch.device("cpu")
    if QUICK:
        mnist = scratch("bench-tta-quick-")
        tta.tiny_mnist(mnist / "MNIST" / "raw")
        args.repeats, args.seeds, args.max_epochs = 1, 2, 2
        target = 0.5
    elif not (mnist / "MNIST" / "raw" / tta.IDX["train"][0]).is_file():
        report("time_to_accuracy", [], {"skipped": f"no MNIST files in {mnist}/MNIST/raw"})
        return []
    # the defaults train in bf16 on a CPU with native bf16, in fp32 elsewhere
    wanted = {"best": ">= 10", "defaults": ">= 2" if cpu_has_native_bf16() else ">= 1.5"}
    arrays = tta.mnist_arrays(mnist)
    val_size = 100 if QUICK else 5000
    started = time.perf_counter()
    plain = [tta.plain_loop(device, mnist, target, args.max_epochs, seed)
             for seed in range(args.repeats)]
    plain_times = [r.seconds for r in plain if r.reached]
    plain_median = statistics.median(plain_times) if plain_times else None
    spec, shipped = defaults(arrays, device, args.max_epochs if QUICK else None, val_size)
    default_runs = [tta.engine_run(device, arrays, spec, tta.with_seed(shipped, seed), target,
                                   val_size) for seed in range(args.repeats)]
    spec, hyper = tta.best_recipe(arrays, device, val_size=val_size)
    best_runs = [tta.engine_run(device, arrays, spec, tta.with_seed(hyper, seed), target,
                                val_size) for seed in range(args.seeds)]
    rows = [summarise("plain", plain, plain_median, target),
            summarise("defaults", default_runs, plain_median, target, wanted["defaults"]),
            summarise("best", best_runs, plain_median, target, wanted["best"])]
    whole, epoch = command_cost(mnist, arrays, device) if not QUICK else \
        (float("nan"), float("nan"))
    rows.append(Row(name="`reprolab train`, 1 epoch of defaults: the command against its epoch",
                    a_label="command", b_label="epoch", a=whole, b=epoch, unit="s",
                    ratio=whole - epoch, ratio_label="A-B (s)", control=None, target="",
                    met=None, rounds=1,
                    note="start-up, reading the splits, the MLflow run, logging the model, "
                    "checkpoints; the epoch includes one test evaluation"))
    report("time_to_accuracy", rows,
           {"target": target, "native_bf16": cpu_has_native_bf16(),
            "precision_defaults": shipped.precision,
            "seconds": time.perf_counter() - started})
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
