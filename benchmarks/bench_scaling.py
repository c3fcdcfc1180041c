"""9. Scaling: N ranks against 1 process on the same global batch (data-parallel training).

Both sides are launched alike, by torchrun (`python -m torch.distributed.run --standalone
--nproc-per-node N`), and run the engine's fit() on the same MNIST-shaped synthetic data
(benchmarks/workloads.py, made in the ranks: no files, no download), simple_cnn, the same global
batch, `train.precision: auto` as resolved here. N ranks on the CPU use gloo and split the cores
between them (as `reprolab train` does); 1 process uses them all (B), or as many as one rank
has (C: the same work per thread, so N ranks against C is the parallel efficiency of DDP
itself). The figure is the images per second of the last epoch, measured inside rank 0
(start-up and the first epoch excluded); scaling efficiency is the speed-up over N.

    python benchmarks/bench_scaling.py [--processes N] [--batch B] [--images N] [--rounds R]
    python benchmarks/bench_scaling.py --device cuda     # N GPUs against 1 (NCCL)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import QUICK, alternate_many, quiet, report, row_from

HERE = Path(__file__).resolve().parent
EPOCHS = 2


def worker(out: Path, device_name: str, images: int, batch: int, threads: int) -> None:
    """One rank: join the others, train, and (rank 0) write the last epoch's images/s."""
    import torch
    import workloads

    from reprolab.data import Split
    from reprolab.ddp import start_distributed
    from reprolab.device import select_device, select_precision
    from reprolab.engine import Hyper, fit
    from reprolab.models import build, model_spec

    device = start_distributed(select_device(device_name))
    if threads:
        torch.set_num_threads(threads)
    x, y = workloads.images(images, (1, 28, 28), seed=1)
    train = Split(torch.from_numpy(x), torch.from_numpy(y)).to(device)
    val = Split(train.x[:1000], train.y[:1000])
    torch.manual_seed(0)
    spec = model_spec("simple_cnn", (1, 28, 28), 10, [128.0], [64.0], {"hidden": 128})
    hyper = Hyper(optimizer="adam", lr=1e-3, epochs=EPOCHS, batch_size=batch,
                  precision=select_precision("auto", device, (1, 28, 28)))
    result = fit(build(spec).to(device), train, val, hyper)
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps({"images_per_second": result.last["train/images_per_second"],
                                   "val_accuracy": result.last["val/accuracy"],
                                   "precision": hyper.precision, "threads": torch.get_num_threads(),
                                   "backend": torch.distributed.get_backend()}))
    torch.distributed.destroy_process_group()


def launch(processes: int, args: argparse.Namespace, seen: dict, threads: int = 0) -> float:
    """One side of one round: torchrun with `processes` ranks (`threads` each, 0: the cores'
    share); -> rank 0's images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={processes}", str(Path(__file__).resolve()), "--worker",
               str(out), "--device", args.device, "--images", str(args.images),
               "--batch", str(args.batch), "--threads", str(threads)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent / "src")])}
        proc = subprocess.run(cmd, cwd=HERE, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"torchrun with {processes} ranks failed:\n{proc.stderr[-3000:]}")
        result = json.loads(out.read_text())
    seen[processes, threads] = result
    return result["images_per_second"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=1_000 if QUICK else 12_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1 if QUICK else 3)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--name", default="scaling", help="the report's name")
    args = parser.parse_args(argv)
    quiet()
    if args.worker:
        return worker(args.worker, args.device, args.images, args.batch, args.threads)
    n, seen = args.processes, {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, (cores or 1) // n) if args.device == "cpu" else 0
    sides = {"A": lambda: launch(n, args, seen), "B": lambda: launch(1, args, seen),
             "C": lambda: launch(1, args, seen, share)}
    if not share:  # GPUs: a rank has a device, not a share of the cores
        del sides["C"]
    samples = alternate_many(sides, rounds=args.rounds, warmup=0 if QUICK else 1)
    many, one = seen[n, 0], seen[1, 0]
    what = f"MNIST-shaped {args.images:,} images, global batch {args.batch}, {args.device}"
    whole = row_from(
        {k: samples[k] for k in ("A", "B", "A'")}, name=f"{n} ranks vs 1 process, {what}",
        a_label=f"{n} ranks", b_label="1 process", unit="img/s", ratio="A/B",
        note=(f"scaling efficiency {median_ratio(samples, 'B') / n:.0%} (speed-up / {n}); "
              f"{many['backend']}, {many['threads']} thread(s) per rank, {one['threads']} in "
              f"the single process; {many['precision']}; val accuracy {many['val_accuracy']:.4f}"
              f" ({n} ranks) and {one['val_accuracy']:.4f} (1). What limits it: the ranks share "
              "the cores the single process uses whole, and each step adds an all-reduce of the "
              "gradients; a process's threads also wait on each other when another job takes a "
              "core, which ranks of one thread do not (compare the next row)"),
    )
    rows = [whole]
    if share:
        rows.append(row_from(
            {"A": samples["A"], "B": samples["C"], "A'": samples["A'"]},
            name=f"{n} ranks vs 1 process of {share} thread(s), {what}", a_label=f"{n} ranks",
            b_label=f"1 process, {share} thread(s)", unit="img/s", ratio="A/B",
            note=(f"the same threads per rank as the single process has: DDP's own efficiency "
                  f"{median_ratio(samples, 'C') / n:.0%} (ideal: {n}x, 100%)"),
        ))
    report(args.name, rows)


def median_ratio(samples: dict[str, list[float]], baseline: str) -> float:
    from harness import median

    return median(samples["A"]) / median(samples[baseline])


if __name__ == "__main__":
    main()
