#!/usr/bin/env bash
# The GPU check, for the day a GPU machine is lent: GPU tests, time to 99% on real MNIST (plain
# loop against the best recipe), bf16 against fp32, and torchrun on NCCL; one Markdown table
# named after the GPU, in about five minutes. Needs only torch, torchvision and pytest (no
# MLflow, DVC or Optuna, no network): it runs on the machine's own Python with src/ on PYTHONPATH.
#
#   benchmarks/gpu_check.sh [MNIST_DIR] [OUT_FILE]
#
# MNIST_DIR holds the four IDX files, plain or gzipped (train-images-idx3-ubyte[.gz], ...), or
# their MNIST/raw/ folder; to carry them to a lent machine, gzip them into an untracked folder
# of the working tree (about 11 MB). OUT_FILE defaults to reports/gpu/README.md. Without CUDA
# every part says it skipped, and the script exits 0. PYTHON picks the interpreter (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
MNIST_IN=${1:-}
OUT_FILE=${2:-reports/gpu/README.md}

ROOT=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
trap 'rm -rf "$ROOT"' EXIT
ARGS=(--out "$OUT_FILE")
if [[ -n "$MNIST_IN" ]]; then
    src=$MNIST_IN
    [[ -d "$src/MNIST/raw" ]] && src="$src/MNIST/raw"
    mkdir -p "$ROOT/MNIST/raw"
    found=0
    for name in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
                t10k-labels-idx1-ubyte; do
        if [[ -f "$src/$name" ]]; then
            cp "$src/$name" "$ROOT/MNIST/raw/$name" && found=$((found + 1))
        elif [[ -f "$src/$name.gz" ]]; then
            gunzip -c "$src/$name.gz" > "$ROOT/MNIST/raw/$name" && found=$((found + 1))
        fi
    done
    if [[ $found -eq 4 ]]; then
        ARGS+=(--mnist "$ROOT")
    else
        echo "gpu_check: $MNIST_IN holds $found of the four MNIST files; time to accuracy skips"
    fi
fi
exec "$PY" benchmarks/gpu_check.py "${ARGS[@]}"
