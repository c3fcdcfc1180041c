"""Where and how precisely training runs: the device, its precision, the seeds."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def select_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    return torch.device(name)


# bf16 on the CPU pays from images of this many pixels (see select_precision)
CPU_BF16_MIN_PIXELS = 16 * 16


def select_precision(name: str, device: torch.device, shape: Sequence[int] | None = None
                     ) -> str:
    """`auto`: bf16 autocast on CUDA devices that support it; on CPUs with native bf16
    instructions (AVX512-BF16 or AMX) for images of 16x16 pixels or more; fp32 elsewhere.

    On such a CPU bf16 trains the seed CNN 1.5x faster or more on 28x28 and 32x32 images at the
    same test accuracy; on 8x8 digits, whose convolutions are small beside the casts, it gained
    1.1x and lost half a point of test accuracy (benchmarks/bench_throughput.py). `shape`: the
    images' C x H x W; None when not known (taken as large enough)."""
    if name != "auto":
        return name
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    large = shape is None or math.prod(shape[-2:]) >= CPU_BF16_MIN_PIXELS
    if device.type == "cpu" and large and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def cpu_has_native_bf16() -> bool:
    """Not torch.ops.mkldnn._is_mkldnn_bf16_supported(): that is also true on plain AVX512,
    where oneDNN emulates bf16 with fp32 arithmetic and conversions, which gains no speed."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting for deterministic matrix multiplies.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> Any:
    dtype = _AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

