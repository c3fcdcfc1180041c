"""1. Tracking overhead: `reprolab train` (full MLflow tracking: run, params, datasets, metrics
every epoch, the resume checkpoint, the pt2 model, the DVC outputs) against a bare loop (the
same engine, model, data, seed and epochs, tracking nothing). The learning curve is evaluate's
to draw, from history.csv. Targets: <= 1.10 on 90 digits
epochs, <= 1.02 on the MNIST-shaped run (60,000 synthetic 1x28x28 images in the real format,
benchmarks/workloads.py).

Two lengths of the same digits training tell apart what tracking costs once per run and per
epoch; the MNIST-shaped run is what the costs come to on a workload people train.
"""

from __future__ import annotations

from harness import (
    QUICK,
    Row,
    alternate,
    median,
    pipeline_project,
    quiet,
    report,
    row_from,
    scratch,
    timed,
)

DIGITS = ((2, 1), (4, 0)) if QUICK else ((30, 1), (90, 0))  # (epochs, warm-up rounds)
DIGITS_TARGETS = {DIGITS[0][0]: "", DIGITS[1][0]: "<= 1.10"}
MNIST_EPOCHS, MNIST_TARGET = 2, "<= 1.02"
ROUNDS = 1 if QUICK else 5
MNIST_ROUNDS = 1 if QUICK else 5


def sides(config, epochs: int):
    """(tracked, bare): `reprolab train` in-process, and the same training without tracking."""
    from reprolab import recipe, train
    from reprolab.data import load_training_data
    from reprolab.engine import fit, seed_everything, select_device
    from reprolab.models import build

    cfg = config(f"train.epochs={epochs}")

    def tracked() -> None:
        cfg.checkpoint_file.unlink(missing_ok=True)  # never resume: train from scratch
        train.run(cfg)

    def bare() -> None:
        device = select_device("cpu")
        seed_everything(cfg.seed)
        meta, train_split, val_split = load_training_data(cfg.processed_dir, device)
        model = build(recipe.spec_for(cfg, meta)).to(device)
        fit(model, train_split, val_split, recipe.hyper_for(cfg, epochs, device, meta["shape"]))

    return timed(tracked), timed(bare)


def paired_cost(samples: dict[str, list[float]]) -> float:
    """Median of tracked - bare within each round: A and B of one round ran back to back, so
    their difference is steadier than the difference of the medians when the machine has slow
    spells."""
    return median([a - b for a, b in zip(samples["A"], samples["B"], strict=True)])


def digits_rows() -> tuple[list[Row], dict[str, float]]:
    root = scratch("bench-tracking-")
    config = pipeline_project(root, "train.use_tuned=false", "train.device=cpu")
    rows, cost = [], {}
    for epochs, warmup in DIGITS:
        samples = alternate(*sides(config, epochs), rounds=ROUNDS, warmup=warmup)
        rows.append(row_from(samples, name=f"tracking overhead, digits simple_cnn {epochs} epochs",
                             a_label="reprolab train", b_label="bare loop", unit="s",
                             ratio="A/B", target=DIGITS_TARGETS[epochs]))
        cost[epochs] = paired_cost(samples)
    # tracked - bare = once + per_epoch * epochs, from the paired differences of the two lengths
    (short, _), (long, _) = DIGITS
    per_epoch = (cost[long] - cost[short]) / (long - short)
    once = cost[short] - short * per_epoch
    bare_epoch = rows[1].b / long
    rows[-1].note = (
        f"what limits it: tracking costs {once:.2f} s once per run (run, params, datasets, "
        f"pt2 model, outputs) and {per_epoch * 1000:.1f} ms per epoch (metrics and checkpoints, "
        "and the end-of-run work, which runs slower after a longer training), "
        f"{1 + (once + per_epoch * long) / rows[1].b:.3f}x the bare loop over {long} epochs, "
        "against "
        f"{bare_epoch * 1000:.0f} ms of training per digits epoch; a ratio <= 1.02 needs runs "
        f"of at least {max(once, 0) / 0.01:.0f} s and epochs of at least "
        f"{max(per_epoch, 0) / 0.01:.1f} s (each cost within 1%)"
    )
    return rows, {"once_s": once, "per_epoch_s": per_epoch}


def mnist_row(once: float, per_epoch: float) -> Row:
    import workloads

    shape = workloads.SHAPES["mnist"].scaled(0.02 if QUICK else 1.0)
    root = scratch("bench-tracking-mnist-")
    config = pipeline_project(root, "train.use_tuned=false", "train.device=cpu",
                              workload=shape)
    from reprolab.data import load_meta

    sizes = load_meta(config().processed_dir)["sizes"]
    # one untimed round of each side first: with only a short fit to warm up, the first
    # tracked run of this shape took 20.8 s against 18.2-19.5 s for every other run of it
    samples = alternate(*sides(config, MNIST_EPOCHS), rounds=MNIST_ROUNDS,
                        warmup=0 if QUICK else 1)
    row = row_from(samples, name=f"tracking overhead, MNIST-shaped simple_cnn {MNIST_EPOCHS} "
                   "epochs", a_label="reprolab train", b_label="bare loop", unit="s",
                   ratio="A/B", target=MNIST_TARGET)
    cost = paired_cost(samples)
    expected = once + per_epoch * MNIST_EPOCHS
    row.note = (
        f"{shape.train:,} images ({sizes['train']:,} train, {sizes['val']:,} val after "
        f"preprocess); tracking cost "
        f"{cost:.2f} s per run here, {1 + cost / row.b:.3f}x the bare loop from the rounds' "
        f"paired differences (the digits split predicts {expected:.2f} s; the pt2 export "
        "and the dataset input grow with the model and the data) against "
        f"{row.b:.1f} s of training"
    )
    return row


def main() -> list[Row]:
    quiet()
    rows, split = digits_rows()
    rows.append(mnist_row(split["once_s"], split["per_epoch_s"]))
    report("tracking", rows, split)
    return rows


if __name__ == "__main__":
    main()
