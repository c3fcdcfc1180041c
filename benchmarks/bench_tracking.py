"""1. Tracking overhead: `reprolab train` (full MLflow tracking: run, params, dataset, metrics
every epoch, resume checkpoint every epoch, the pt2 model, the learning curve) against a bare
loop (the same engine, model, data, seed and epochs, tracking nothing). Target: ratio <= 1.02.

Two lengths of the same training tell apart what tracking costs once per run and per epoch.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from harness import Row, alternate, median, pipeline_project, quiet, report, row_from, timed

TARGET = "<= 1.02"


def main() -> list[Row]:
    quiet()
    from reprolab import recipe, train
    from reprolab.data import load_training_data
    from reprolab.engine import fit, seed_everything, select_device
    from reprolab.models import build

    root = Path(tempfile.mkdtemp(prefix="bench-tracking-"))
    config = pipeline_project(root, "train.use_tuned=false", "train.device=cpu")
    rows, cost = [], {}
    for epochs, warmup in ((30, 1), (90, 0)):
        cfg = config(f"train.epochs={epochs}")

        def tracked(cfg=cfg) -> None:
            cfg.checkpoint_file.unlink(missing_ok=True)  # never resume: train from scratch
            train.run(cfg)

        def bare(cfg=cfg, epochs: int = epochs) -> None:
            device = select_device("cpu")
            seed_everything(cfg.seed)
            meta, train_split, val_split = load_training_data(cfg.processed_dir, device)
            model = build(recipe.spec_for(cfg, meta)).to(device)
            fit(model, train_split, val_split, recipe.hyper_for(cfg, epochs, device))

        samples = alternate(timed(tracked), timed(bare), rounds=7, warmup=warmup)
        row = row_from(samples, name=f"tracking overhead, digits simple_cnn {epochs} epochs",
                       a_label="reprolab train", b_label="bare loop", unit="s", ratio="A/B",
                       target=TARGET)
        # A and B of one round ran back to back: their difference is steadier than the
        # difference of the medians when the machine has slow spells
        cost[epochs] = median([a - b for a, b in zip(samples["A"], samples["B"], strict=True)])
        rows.append(row)
    # tracked - bare = once + per_epoch * epochs, from the paired differences of the two lengths
    per_epoch = (cost[90] - cost[30]) / 60
    once = cost[30] - 30 * per_epoch
    bare_epoch = rows[1].b / 90
    rows[-1].note = (
        f"what limits it: tracking costs {once:.2f} s once per run (run, params, pt2 model, "
        f"plots) and {per_epoch * 1000:.1f} ms per epoch (one metrics call to the SQLite store, "
        f"the checkpoint), against {bare_epoch * 1000:.0f} ms of training per digits epoch; "
        f"a ratio <= 1.02 needs epochs of at least {per_epoch / 0.01:.1f} s and runs of at "
        f"least {once / 0.01:.0f} s (each cost within 1%)"
    )
    report("tracking", rows, {"once_s": once, "per_epoch_s": per_epoch})
    return rows


if __name__ == "__main__":
    main()
