"""3. Training throughput: the engine with its default settings (params.yaml's train section,
`train.precision: auto` resolved on this machine) against the classic tutorial loop (a DataLoader
over float tensors, fp32, zero_grad / backward / step, validation every epoch) training the same
simple_cnn from the same initial weights for the same epochs. Images per second (training
images x epochs / wall seconds, the validation included for both) and the final test accuracy of
both; the engine's FLOP/s as a fraction of this machine's measured matrix-multiply peak.
Target: >= 1.5x the tutorial loop in every round, at equal accuracy.

Three workloads: digits (8x8, 15 epochs), and MNIST-shaped (60,000 1x28x28 images) and
CIFAR-shaped (50,000 3x32x32) synthetic data written in the real formats and preprocessed by the
real stages (benchmarks/workloads.py), one epoch each, augmentation off on both sides. On these
two the engine also runs in the other precision (bf16 autocast against fp32), which is the
measurement `train.precision: auto` rests on: bf16 where it is >= 1.3x faster within 0.2 points
of test accuracy.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from harness import (
    QUICK,
    Row,
    alternate_many,
    check,
    median,
    pipeline_project,
    quiet,
    report,
    round_ratios,
    row_from,
    scratch,
)

DIGITS_EPOCHS = 3 if QUICK else 15
REALISTIC_EPOCHS = 1
REALISTIC_ROUNDS = 1 if QUICK else 3
SCALE = 0.02 if QUICK else 1.0  # of the workloads' image counts
TARGET, PRECISION_TARGET, ACCURACY_TOLERANCE = ">= 1.5", ">= 1.3", 0.2  # points


def matmul_peak_flops(dtype: Any = None, n: int = 1024, repeats: int = 20) -> float:
    """The best matrix-multiply rate of this process (FLOP/s), fp32 unless `dtype` says."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
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


class EngineOrder:
    """A DataLoader sampler giving the engine's order: each epoch a permutation drawn from a
    generator seeded like fit()'s (without augmentation nothing else draws from it). Both loops
    then train on the same batches, and their accuracies differ by arithmetic, not by luck."""

    def __init__(self, n: int, seed: int):
        import torch

        self.n, self.generator = n, torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        import torch

        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def tutorial_fit(model, train, val, batch_size: int, lr: float, epochs: int, seed: int) -> None:
    """The loop of the PyTorch tutorials: per-sample DataLoader, fp32, Adam, val every epoch."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    data = TensorDataset(train.x.float(), train.y)
    loader = DataLoader(data, batch_size=batch_size, sampler=EngineOrder(len(data), seed))
    val_loader = DataLoader(TensorDataset(val.x.float(), val.y), batch_size=512)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
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


@dataclass
class Workload:
    """One prepared training problem; each side trains it from the same initial weights."""

    label: str
    cfg: Any
    train: Any
    val: Any
    test: Any
    spec: dict[str, Any]
    initial: dict[str, Any]
    epochs: int
    accuracy: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    def slice(self, subset: int) -> Any:
        from reprolab.data import Split

        return Split(self.train.x[:subset], self.train.y[:subset]) if subset else self.train

    def engine(self, precision: str | None = None, label: str = "engine", subset: int = 0):
        """A side: fit() with the config's settings (precision overridden if given); returns
        images per second and records the test accuracy under `label`. `subset` > 0 trains
        on that many images only (a warm-up, not recorded)."""
        from reprolab import recipe
        from reprolab.device import select_device
        from reprolab.engine import evaluate, fit
        from reprolab.models import build

        hyper = recipe.hyper_for(self.cfg, self.epochs, select_device("cpu"),
                                 list(self.train.x.shape[1:]))
        if precision:
            hyper = dataclasses.replace(hyper, precision=precision)
        train = self.slice(subset)

        def side() -> float:
            model = build(self.spec)
            model.load_state_dict(self.initial)
            started = time.perf_counter()
            fit(model, train, self.val, hyper)
            seconds = time.perf_counter() - started
            if not subset:
                self.accuracy.setdefault(label, []).append(evaluate(model, self.test, 512)[1])
            return len(train) * self.epochs / seconds

        return side

    def tutorial(self, subset: int = 0):
        from reprolab.engine import evaluate
        from reprolab.models import build

        train = self.slice(subset)

        def side() -> float:
            model = build(self.spec)
            model.load_state_dict(self.initial)
            started = time.perf_counter()
            tutorial_fit(model, train, self.val, self.cfg.train.batch_size, self.cfg.train.lr,
                         self.epochs, self.cfg.seed)  # fit() seeds its order with it too
            seconds = time.perf_counter() - started
            if not subset:
                self.accuracy.setdefault("tutorial", []).append(
                    evaluate(model, self.test, 512)[1])
            return len(train) * self.epochs / seconds

        return side


def prepare(label: str, epochs: int, workload: Any = None) -> Workload:
    from reprolab import recipe
    from reprolab.data import load_split, load_training_data
    from reprolab.device import seed_everything, select_device
    from reprolab.models import build

    root = scratch(f"bench-throughput-{label}-")
    # augmentation off: the tutorial loop has none, and both sides must do the same work
    cfg = pipeline_project(root, "train.use_tuned=false", "train.device=cpu",
                           f"train.epochs={epochs}", "data.augment.crop_padding=0",
                           "data.augment.flip=false", workload=workload)()
    meta, train, val = load_training_data(cfg.processed_dir, select_device("cpu"))
    spec = recipe.model_recipe(cfg, meta).spec
    seed_everything(cfg.seed)
    initial = build(spec).state_dict()
    return Workload(label, cfg, train, val, load_split(cfg.processed_dir, "test"), spec,
                    initial, epochs)


def compute_note(w: Workload, images_per_second: float, precision: str) -> str:
    import torch

    from reprolab.models import build

    per_image = training_flops_per_image(build(w.spec), w.train.x[:64])
    peak = matmul_peak_flops(torch.bfloat16 if precision == "bf16" else None)
    achieved = per_image * images_per_second
    return (f"engine at {achieved / 1e9:.1f} GFLOP/s of training = {achieved / peak:.0%} of this "
            f"machine's {precision} matmul peak ({peak / 1e9:.0f} GFLOP/s)")


def digits_rows() -> list[Row]:
    w = prepare("digits", DIGITS_EPOCHS)
    warmup = 0 if QUICK else 1
    precision = precision_in_use(w)
    other = "fp32" if precision == "bf16" else "bf16"
    samples = alternate_many({"A": w.engine(), "B": w.tutorial(),
                              "C": w.engine(other, label=other)},
                             rounds=1 if QUICK else 5, warmup=warmup)
    w.accuracy = {side: values[warmup:] for side, values in w.accuracy.items()}
    acc_a, acc_b = median(w.accuracy["engine"]), median(w.accuracy["tutorial"])
    speed = row_from(samples, name=f"training throughput, digits simple_cnn {DIGITS_EPOCHS} "
                     "epochs", a_label=f"engine ({precision})", b_label="tutorial loop",
                     unit="img/s", ratio="A/B", target=TARGET)
    rounds = round_ratios(samples, "A/B")
    speed.met = bool(min(rounds) >= 1.5 and acc_a >= acc_b)
    speed.note = (
        f"slowest round {min(rounds):.2f}x; test accuracy: engine {acc_a:.4f}, tutorial loop "
        f"{acc_b:.4f} (the target also asks equal or better); "
        f"{compute_note(w, speed.a, precision)}. What limits the ratio: both loops spend most "
        "of each step in the same convolution kernels; the engine saves the per-sample indexing "
        "and collation (19 batches of 8x8 images an epoch) and gains channels-last convolutions "
        "and a fused Adam step, and a model this small is bound by per-step work rather than "
        "arithmetic"
    )
    accuracy = accuracy_row("test accuracy after the same epochs (digits)", "engine",
                            "tutorial loop", w.accuracy["engine"], w.accuracy["tutorial"], 0.0)
    prec, _ = precision_row(samples, precision, f"digits simple_cnn {DIGITS_EPOCHS} epochs", "")
    accuracies = {precision: acc_a, other: median(w.accuracy[other])}
    diff = (accuracies["bf16"] - accuracies["fp32"]) * 100
    prec.note = (
        f"test accuracy: bf16 {accuracies['bf16']:.4f}, fp32 {accuracies['fp32']:.4f} "
        f"({diff:+.2f} points); A vs A is the engine's default ({precision}) run twice. Why "
        "`train.precision: auto` keeps fp32 for images under 16x16 pixels: on 8x8 images the "
        "convolutions are small beside the casts at every layer, and bf16 stays below the 1.3x "
        "within 0.2 points of accuracy that it asks"
    )
    return [speed, accuracy, prec]


def precision_row(samples: dict[str, list[float]], default: str, what: str, target: str
                  ) -> tuple[Row, list[float]]:
    """bf16 against fp32 from the samples of alternate_many (A: the engine in its default
    precision, C: in the other one); A vs A is the default run twice. -> (row, each round's
    ratio)."""
    by_precision = {default: samples["A"], "fp32" if default == "bf16" else "bf16": samples["C"]}
    pair = {"A": by_precision["bf16"], "B": by_precision["fp32"]}
    row = row_from({**pair, "A'": samples["A'"]}, name=f"bf16 autocast vs fp32, {what}",
                   a_label="engine bf16", b_label="engine fp32", unit="img/s", ratio="A/B",
                   target=target)
    row.control = median(samples["A'"]) / median(samples["A"])
    return row, round_ratios(pair, "A/B")


def precision_in_use(w: Workload) -> str:
    from reprolab import recipe
    from reprolab.device import select_device

    return recipe.hyper_for(w.cfg, w.epochs, select_device("cpu"),
                            list(w.train.x.shape[1:])).precision


def accuracy_row(name: str, a_label: str, b_label: str, a: list[float], b: list[float],
                 tolerance: float) -> Row:
    """A-B in points; met when A is no more than `tolerance` points below B."""
    acc_a, acc_b = median(a), median(b)
    diff = (acc_a - acc_b) * 100
    target = f">= {-tolerance:g}" if tolerance else ">= 0"
    return Row(name=name, a_label=a_label, b_label=b_label, a=acc_a, b=acc_b, unit="",
               ratio=diff, ratio_label="A-B, points", control=None, target=target,
               met=check(diff, target), rounds=len(a), samples={"A": a, "B": b})


def realistic_rows(name: str) -> list[Row]:
    """Engine (default precision), tutorial loop and engine in the other precision, in
    rotating order every round; -> the speed and accuracy rows of both comparisons."""
    import workloads

    from reprolab.device import cpu_has_native_bf16

    shape = workloads.SHAPES[name].scaled(SCALE)
    w = prepare(name, REALISTIC_EPOCHS, shape)
    default = precision_in_use(w)
    other = "fp32" if default == "bf16" else "bf16"
    # warm-up on a slice: the first optimizer of a process imports torch._dynamo, the first
    # convolution of each shape and precision builds its kernels
    for side in (w.engine(subset=2000), w.tutorial(subset=2000), w.engine(other, subset=2000)):
        if not QUICK:
            side()
    samples = alternate_many({"A": w.engine(), "B": w.tutorial(),
                              "C": w.engine(other, label=other)}, rounds=REALISTIC_ROUNDS)
    what = f"{name.upper()}-shaped simple_cnn {REALISTIC_EPOCHS} epoch"
    images = f"{len(w.train):,} training images"
    speed = row_from(samples, name=f"training throughput, {what}", a_label=f"engine ({default})",
                     b_label="tutorial loop", unit="img/s", ratio="A/B", target=TARGET)
    rounds = round_ratios(samples, "A/B")
    acc = accuracy_row(f"test accuracy, {what}", f"engine ({default})", "tutorial loop",
                       w.accuracy["engine"], w.accuracy["tutorial"], ACCURACY_TOLERANCE)
    speed.met = bool(min(rounds) >= 1.5 and acc.met)
    fp32_side = samples["A"] if default == "fp32" else samples["C"]
    fp32_ratio = median(fp32_side) / median(samples["B"])
    speed.note = (
        f"{images}; slowest round {min(rounds):.2f}x (the target asks it of every round); "
        f"the engine in fp32 would be {fp32_ratio:.2f}x; {compute_note(w, speed.a, default)}. "
        "What limits it: the convolutions' forward and backward kernels, the same in both loops "
        "in fp32; the engine gains channels-last convolutions and pooling (the tutorial's "
        "NCHW max-pool is several times slower), no per-sample collation, a fused Adam step"
        + (", and bf16 autocast (this CPU has native bf16)" if default == "bf16" else "")
    )
    prec, prec_rounds = precision_row(samples, default, what, PRECISION_TARGET)
    prec_acc = accuracy_row(f"test accuracy, bf16 vs fp32, {what}", "engine bf16",
                            "engine fp32", w.accuracy["engine" if default == "bf16" else "bf16"],
                            w.accuracy["engine" if default == "fp32" else "fp32"],
                            ACCURACY_TOLERANCE)
    native = "has" if cpu_has_native_bf16() else "lacks"
    prec.note = (
        f"slowest round {min(prec_rounds):.2f}x; A vs A is the engine's default ({default}) run "
        "twice. `train.precision: auto` takes bf16 on CPUs with native bf16 (this one "
        f"{native} it) on the strength of this row and its MNIST/CIFAR twin: >= 1.3x within "
        f"{ACCURACY_TOLERANCE:g} points of test accuracy. What limits it: the convolutions and "
        "matrix multiplies run in bf16 (oneDNN's AVX512-BF16 kernels), while the casts at "
        "every layer, the fp32 loss, pooling, ReLU and the optimizer step do not get faster"
    )
    return [speed, acc, prec, prec_acc]


def main() -> list[Row]:
    quiet()
    rows = digits_rows()
    for name in ("mnist", "cifar"):
        rows += realistic_rows(name)
    report("throughput", rows)
    return rows


if __name__ == "__main__":
    main()
