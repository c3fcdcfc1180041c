"""Peak resident memory of `reprolab fetch` + `reprolab preprocess` on full-size inputs.

Writes a CIFAR-10-sized set in CIFAR's real on-disk format (5 pickled batches of 10,000 images
plus a test batch; random pixels) and a folder of 50,000 32x32 PNGs, then runs each stage under
`/usr/bin/time -v` and prints its maximum resident set size. Target: within 2 GiB.

    python benchmarks/preprocess_memory.py [--images 50000]
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LIMIT_MIB = 2048


def write_cifar10(raw: Path, rng: np.random.Generator) -> None:
    folder = raw / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (10_000, 3072), dtype=np.uint8),
                 "labels": (np.arange(10_000) % 10).tolist()}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)


def write_folder(root: Path, count: int, rng: np.random.Generator) -> None:
    for i in range(count):
        folder = root / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / f"{i:05d}.png"
        )


def peak_mib(project: Path, stage: str, overrides: list[str]) -> float:
    args = ["/usr/bin/time", "-v", sys.executable, "-m", "reprolab", stage, "-q"]
    for item in overrides:
        args += ["-S", item]
    done = subprocess.run(args, cwd=project, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-2000:]}")
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    return kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in ("cifar10", "imagefolder"):
            project = Path(tmp) / case
            project.mkdir()
            shutil.copy(REPO / "params.yaml", project / "params.yaml")
            overrides = [f"data.dataset={case}"]
            if case == "cifar10":
                write_cifar10(project / "data/raw/cifar10", rng)
            else:
                write_folder(Path(tmp) / "images", args.images, rng)
                overrides.append(f"data.image_folder={Path(tmp) / 'images'}")
            results[case] = {stage: round(peak_mib(project, stage, overrides), 1)
                             for stage in ("fetch", "preprocess")}
    for case, stages in results.items():
        for stage, mib in stages.items():
            verdict = "meets" if mib <= LIMIT_MIB else "MISSES"
            print(f"{case:12s} {stage:11s} peak RSS {mib:8.1f} MiB  ({verdict} {LIMIT_MIB} MiB)")
    out = REPO / "reports" / "bench" / "preprocess_memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
