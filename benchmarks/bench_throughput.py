"""3. Training throughput: the engine with its default settings (params.yaml's train section)
against the classic tutorial loop (a DataLoader over float tensors, fp32, zero_grad / backward /
step, validation every epoch) training the same simple_cnn from the same initial weights on
digits for the same epochs. Images per second (training images x epochs / wall seconds, the
validation included for both) and the final test accuracy of both; the engine's FLOP/s as a
fraction of this machine's measured fp32 matrix-multiply peak. Target: >= 1.5x the tutorial
loop at equal or better accuracy.
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

from harness import Row, alternate, check, median, pipeline_project, quiet, report, row_from

EPOCHS = 15


def matmul_peak_flops(n: int = 1024, repeats: int = 20) -> float:
    """The best fp32 matrix-multiply rate of this process (FLOP/s)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def training_flops_per_image(model, x) -> float:
    """Forward + backward FLOPs of one training step, per image (torch's FLOP counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        labels = torch.zeros(len(x), dtype=torch.long)
        torch.nn.functional.cross_entropy(model(x), labels).backward()
    return counter.get_total_flops() / len(x)


def main() -> list[Row]:
    quiet()
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from reprolab import recipe
    from reprolab.data import load_split, load_training_data
    from reprolab.engine import evaluate, fit, seed_everything, select_device
    from reprolab.models import build

    root = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    cfg = pipeline_project(root, "train.use_tuned=false", "train.device=cpu",
                         f"train.epochs={EPOCHS}")()
    device = select_device("cpu")
    meta, train_split, val_split = load_training_data(cfg.processed_dir, device)
    test_split = load_split(cfg.processed_dir, "test")
    spec = recipe.spec_for(cfg, meta)
    hyper = recipe.hyper_for(cfg, EPOCHS, device)
    seed_everything(cfg.seed)
    initial = build(spec).state_dict()
    images = len(train_split) * EPOCHS
    accuracy: dict[str, list[float]] = {"A": [], "B": []}

    def engine() -> float:
        model = build(spec)
        model.load_state_dict(initial)
        started = time.perf_counter()
        fit(model, train_split, val_split, hyper)
        seconds = time.perf_counter() - started
        accuracy["A"].append(evaluate(model, test_split, 512)[1])
        return images / seconds

    def tutorial() -> float:
        model = build(spec)
        model.load_state_dict(initial)
        data = TensorDataset(train_split.x.float(), train_split.y)
        loader = DataLoader(data, batch_size=cfg.train.batch_size, shuffle=True)
        val_loader = DataLoader(TensorDataset(val_split.x.float(), val_split.y), batch_size=512)
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        started = time.perf_counter()
        for _ in range(EPOCHS):
            model.train()
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
            model.eval()
            correct = 0
            with torch.no_grad():
                for xb, yb in val_loader:
                    correct += (model(xb).argmax(1) == yb).sum().item()
        seconds = time.perf_counter() - started
        accuracy["B"].append(evaluate(model, test_split, 512)[1])
        return images / seconds

    # images per second: higher is better, so the speed-up of A is A/B
    samples = alternate(engine, tutorial, rounds=5)
    accuracy["A"], accuracy["B"] = accuracy["A"][1:], accuracy["B"][1:]  # drop the warm-up
    speed = row_from(samples, name=f"training throughput, digits simple_cnn {EPOCHS} epochs",
                     a_label="engine", b_label="tutorial loop", unit="img/s", ratio="A/B",
                     target=">= 1.5")
    acc_a, acc_b = median(accuracy["A"]), median(accuracy["B"])
    speed.met = bool(speed.met and acc_a >= acc_b)
    per_image = training_flops_per_image(build(spec), train_split.x[:64])
    peak = matmul_peak_flops()
    achieved = per_image * speed.a
    speed.note = (
        f"test accuracy: engine {acc_a:.4f}, tutorial loop {acc_b:.4f} (the target also asks "
        f"equal or better); engine at {achieved / 1e9:.2f} GFLOP/s of training = "
        f"{achieved / peak:.1%} of this machine's fp32 matmul peak ({peak / 1e9:.1f} GFLOP/s). "
        "What limits the ratio: both loops spend most of each step in the same convolution "
        "kernels; the engine saves the per-sample indexing and collation (19 batches of 8x8 "
        "images an epoch) and gains channels-last convolutions and a fused Adam step, and a "
        "model this small is bound by per-step work rather than arithmetic"
    )
    accuracy_row = Row(
        name="test accuracy after the same epochs", a_label="engine", b_label="tutorial loop",
        a=acc_a, b=acc_b, unit="", ratio=(acc_a - acc_b) * 100, ratio_label="A-B, points",
        control=None, target=">= 0", met=check((acc_a - acc_b) * 100, ">= 0"),
        rounds=len(accuracy["A"]), samples=accuracy,
    )
    report("throughput", [speed, accuracy_row],
           {"flops_per_image": per_image, "matmul_peak_flops": peak, "achieved_flops": achieved})
    return [speed, accuracy_row]


if __name__ == "__main__":
    main()
