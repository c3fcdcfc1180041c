"""benchmarks/gpu_check.sh, on a machine without CUDA: it says per part that it skipped and exits
0; its code paths run on the CPU with tiny sizes (the figures mean nothing here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from tta import tiny_mnist  # noqa: E402


def test_without_cuda_every_part_says_it_skipped_and_the_script_exits_0(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"),
                           str(tiny_mnist(tmp_path / "mnist", gz=True)), str(tmp_path / "out.md")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("gpu_check:")]
    assert lines == [f"gpu_check: {part}: skipped (no CUDA)" for part in (
        "GPU tests", "time to 99% on MNIST", "bf16 vs fp32 images per second",
        "torchrun, 1 rank on NCCL")]
    assert not (tmp_path / "out.md").exists()


def test_every_part_runs_on_the_cpu_in_quick_mode(tmp_path):
    import gpu_check

    mnist = tmp_path / "root"
    tiny_mnist(mnist / "MNIST" / "raw")
    out = tmp_path / "gpu.md"
    assert gpu_check.main(["--device", "cpu", "--quick", "--mnist", str(mnist),
                           "--out", str(out)]) == 0
    table = out.read_text()
    assert "plain loop (tutorial)" in table and "reprolab best recipe" in table
    assert "fast_cnn images/s" in table and "torchrun, 1 rank (gloo)" in table
    assert "failed" not in table


def test_mnist_is_read_from_its_idx_files(tmp_path):
    import tta

    root = tmp_path / "root"
    tiny_mnist(root / "MNIST" / "raw")
    arrays = tta.mnist_arrays(root)
    assert arrays["train"][0].shape == (300, 1, 28, 28)
    assert arrays["test"][1].dtype == np.int64 and set(arrays["test"][1]) <= {0, 1, 2, 3}
