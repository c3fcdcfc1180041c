"""The GPU check (run by benchmarks/gpu_check.sh): everything that needs only torch, on one GPU, in
about five minutes, into one Markdown table named after the GPU.

Parts, each reported as a row or as "skipped" with the reason:
1. the GPU tests (`pytest -m gpu tests/test_gpu.py`): AMP bf16 and fp16, channels-last,
   device-resident batches, torch.compile, a checkpoint saved on the GPU resumed bit-identically;
2. time to 99% test accuracy on real MNIST: the tutorials' plain loop against reprolab's best
   recipe (benchmarks/tta.py), same GPU, same run;
3. bf16 against fp32 images per second (the engine, CIFAR-shaped synthetic images);
4. torchrun with one rank on NCCL (benchmarks/bench_scaling.py's rank).

    python benchmarks/gpu_check.py --mnist DIR --out FILE [--device cuda] [--quick]

`--mnist`: a folder holding MNIST/raw/ with the four IDX files (gpu_check.sh makes one from the
files it is given). `--quick` runs tiny sizes (what the CPU test of this script uses): its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TARGET = 0.99


def gpu_tests(device: str, quick: bool) -> list[str]:
    """Run the gpu-marked tests on this machine's Python (no conftest: that one needs the
    packages of the full install)."""
    if quick:
        return ["| GPU tests | - | - | not run in --quick |"]
    cmd = [sys.executable, "-m", "pytest", "--noconftest", "-p", "no:cacheprovider", "-m", "gpu",
           "-q", "-rs", str(REPO / "tests" / "test_gpu.py")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1].strip("= ")
    return [f"| GPU tests (`pytest -m gpu`) | {last} | - | exit code {proc.returncode} |"]


def time_to_accuracy(device: str, mnist: Path | None, quick: bool) -> list[str]:
    import torch
    import tta

    if mnist is None or not (mnist / "MNIST" / "raw" / tta.IDX["train"][0]).is_file():
        return [f"| time to {TARGET:.0%} on MNIST | skipped | - | no MNIST files given |"]
    dev = torch.device(device)
    arrays = tta.mnist_arrays(mnist)
    if quick:
        arrays = {k: (x[:600], y[:600]) for k, (x, y) in arrays.items()}
    target = 0.5 if quick else TARGET
    plain = [tta.plain_loop(dev, mnist, target, 1 if quick else 6, seed) for seed in (0, 1)][
        : 1 if quick else 2]
    val_size = 100 if quick else 5000
    spec, hyper = tta.best_recipe(arrays, dev, epochs=1 if quick else None, val_size=val_size)
    best = [tta.engine_run(dev, arrays, spec, tta.with_seed(hyper, seed), target, val_size)
            for seed in range(1 if quick else 3)]
    rows = []
    for name, runs in (("plain loop (tutorial)", plain), ("reprolab best recipe", best)):
        times = [r.seconds for r in runs if r.reached]
        shown = ", ".join(f"{r.seconds:.1f} s (epoch {r.epoch})" if r.reached else
                          f"not reached ({max(r.accuracies):.4f})" for r in runs)
        median = f"{statistics.median(times):.1f} s" if times else "not reached"
        rows.append((name, median, shown, times))
    ratio = (statistics.median(rows[0][3]) / statistics.median(rows[1][3])
             if rows[0][3] and rows[1][3] else None)
    out = [f"| time to {target:.1%} test accuracy, {n} | {m} | "
           f"{f'{ratio:.1f}x sooner' if ratio and n.startswith('reprolab') else '-'} | {s} |"
           for n, m, s, _ in rows]
    return out


def precision_rows(device: str, quick: bool) -> list[str]:
    import torch

    from reprolab.data import Split
    from reprolab.engine import Hyper, fit
    from reprolab.models import build, model_spec

    dev = torch.device(device)
    n, size = (256, 16) if quick else (50_000, 32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    train, val = Split(x, y).to(dev), Split(x[:512], y[:512]).to(dev)
    rows = []
    for name in ("fast_cnn",) if quick else ("fast_cnn", "resnet18"):
        spec = model_spec(name, [3, size, size], 10, [125.0] * 3, [63.0] * 3,
                          {"width": 8 if quick else 64} if name == "fast_cnn" else {})
        speed = {}
        for precision in ("fp32", "bf16", "fp32", "bf16"):  # the second pair is measured
            hyper = Hyper(optimizer="sgd", lr=0.01, epochs=1, batch_size=512,
                          precision=precision)
            speed[precision] = fit(build(spec).to(dev), train, val, hyper).last[
                "train/images_per_second"]
        rows.append(f"| {name} images/s, {n:,} images {size}x{size}, batch 512 | "
                    f"bf16 {speed['bf16']:,.0f}, fp32 {speed['fp32']:,.0f} | "
                    f"{speed['bf16'] / speed['fp32']:.2f}x | autocast |")
    return rows


def torchrun_rows(device: str, quick: bool) -> list[str]:
    import bench_scaling

    ranks = argparse.Namespace(device=device, images=512 if quick else 60_000,
                               batch=256 if quick else 1024)
    seen: dict = {}
    speed = bench_scaling.launch(1, ranks, seen)
    result = seen[1, 0]
    return [f"| torchrun, 1 rank ({result['backend']}), MNIST-shaped {ranks.images:,} images | "
            f"{speed:,.0f} img/s | - | val/accuracy {result['val_accuracy']:.4f}, "
            f"{result['precision']} |"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--mnist", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "gpu" / "README.md")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    import torch

    sys.path.insert(0, str(HERE))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        for part in ("GPU tests", f"time to {TARGET:.0%} on MNIST",
                     "bf16 vs fp32 images per second", "torchrun, 1 rank on NCCL"):
            print(f"gpu_check: {part}: skipped (no CUDA)")
        return 0
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        platform.processor() or platform.machine()
    lines = [f"# GPU check: {name}", "",
             f"torch {torch.__version__}, Python {platform.python_version()}, "
             f"{time.strftime('%Y-%m-%d')}", "",
             "| what | figure | ratio | note |", "|---|---|---|---|"]
    failed = False
    for part, fn in (("GPU tests", lambda: gpu_tests(args.device, args.quick)),
                     ("time to accuracy", lambda: time_to_accuracy(args.device, args.mnist,
                                                                    args.quick)),
                     ("bf16 vs fp32", lambda: precision_rows(args.device, args.quick)),
                     ("torchrun", lambda: torchrun_rows(args.device, args.quick))):
        started = time.perf_counter()
        try:
            rows = fn()
        except Exception as exc:  # noqa: BLE001 - one part's failure is reported, the rest run
            traceback.print_exc()
            rows, failed = [f"| {part} | failed | - | {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''} |"], True
        print(f"gpu_check: {part}: {time.perf_counter() - started:.0f} s", flush=True)
        lines += rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
