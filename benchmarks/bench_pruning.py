"""4. Pruning: a pruned study against an unpruned one with the same seeded random sampler, so
both try the same points (12 trials of 6 epochs each, params.yaml's search space), for each of
Optuna's pruners that `tune.pruner` offers, on digits and on a subset of real MNIST (the first
6,000 training and 1,000 test images, when the MNIST files are there: --mnist). Each round is
one seed (5 on digits, 3 on MNIST); on digits a second run of each pruned study with the same
seed is the control. Epochs spent and the best validation accuracy. Target: <= 40% of the
epochs, best accuracy within 0.5 points; params.yaml's default pruner is the one that meets
both on both sets.

    python benchmarks/bench_pruning.py [--mnist DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from harness import QUICK, REPO, Row, check, median, pipeline_project, quiet, report

TRIALS, EPOCHS = (4, 2) if QUICK else (12, 6)
PRUNERS = ("percentile", "median", "successive_halving", "hyperband")
SUBSET = (6_000, 1_000)  # MNIST training and test images


def mnist_subset(raw_dir: Path, mnist: Path) -> None:
    """The first SUBSET images of real MNIST as IDX files, where fetch looks for them."""
    import tta
    from workloads import write_idx

    arrays = tta.mnist_arrays(mnist)
    folder = raw_dir / "mnist" / "MNIST" / "raw"
    folder.mkdir(parents=True)
    for (split, (x, y)), n in zip(arrays.items(), SUBSET, strict=True):
        images, labels = tta.IDX[split]
        write_idx(folder / images, x[:n, 0])
        write_idx(folder / labels, y[:n])


def studies(name: str, seeds: tuple[int, ...], controls: bool, mnist: Path | None
            ) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """-> (runs, controls): {pruner: [tune's summary per seed]}, "none" included."""
    from reprolab import tune

    root = Path(tempfile.mkdtemp(prefix=f"bench-pruning-{name}-"))
    overrides = ["tune.sampler=random", f"tune.n_trials={TRIALS}", f"tune.epochs={EPOCHS}",
                 "train.device=cpu"]
    if mnist is not None:
        (root / "data" / "raw").mkdir(parents=True)
        mnist_subset(root / "data" / "raw", mnist)
        overrides.append("data.dataset=mnist")
    config = pipeline_project(root, *overrides)
    numbers = iter(range(10_000))

    def study(pruner: str, seed: int) -> dict:
        journal = f"study-{next(numbers)}.journal"  # a new study each time, inside the project
        return tune.run(config(f"tune.pruner={pruner}", f"seed={seed}",
                               f"paths.optuna_journal={journal}"))

    study("none", 0)  # warm-up: imports and first MLflow calls
    runs: dict[str, list[dict]] = {"none": []}
    again: dict[str, list[dict]] = {}
    for i, seed in enumerate(seeds):
        order = ("none", *PRUNERS) if i % 2 == 0 else (*PRUNERS, "none")
        for pruner in order:
            runs.setdefault(pruner, []).append(study(pruner, seed))
        for pruner in PRUNERS if controls else ():
            again.setdefault(pruner, []).append(study(pruner, seed))
    return runs, again


def rows_for(name: str, runs: dict[str, list[dict]], again: dict[str, list[dict]]
             ) -> list[Row]:
    rows = []
    unpruned = [r["epochs_spent"] for r in runs["none"]]
    best_none = [r["best_value"] for r in runs["none"]]
    for pruner in PRUNERS:
        epochs = [r["epochs_spent"] for r in runs[pruner]]
        repeat = [r["epochs_spent"] for r in again.get(pruner, [])]
        ratio = median(epochs) / median(unpruned)
        rows.append(Row(
            name=f"{name}, pruning ({pruner}): epochs spent", a_label="pruned",
            b_label="unpruned", a=median(epochs), b=median(unpruned), unit="epochs",
            ratio=ratio, ratio_label="A/B",
            control=median(repeat) / median(epochs) if repeat else None, target="<= 0.40",
            met=check(ratio, "<= 0.40"), rounds=len(epochs),
            samples={"A": epochs, "B": unpruned, "A'": repeat},
            note="what limits it: the first 3 trials run in full (18 of 72 epochs) and every "
                 "trial above the running median goes on" if pruner == "median" else ""))
        best = [r["best_value"] for r in runs[pruner]]
        lost = median([(b - a) * 100 for a, b in zip(best, best_none, strict=True)])
        rows.append(Row(
            name=f"{name}, pruning ({pruner}): best val accuracy", a_label="pruned",
            b_label="unpruned", a=median(best), b=median(best_none), unit="", ratio=lost,
            ratio_label="B-A, points", control=None, target="<= 0.5",
            met=check(lost, "<= 0.5"), rounds=len(best), samples={"A": best, "B": best_none}))
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", type=Path, default=REPO / "data" / "raw" / "mnist")
    args = parser.parse_args(argv)
    quiet()
    import tta

    rows = rows_for("digits", *studies("digits", (1,) if QUICK else (1, 2, 3, 4, 5), True,
                                       None))
    if not QUICK and (args.mnist / "MNIST" / "raw" / tta.IDX["train"][0]).is_file():
        rows += rows_for(f"MNIST {SUBSET[0]:,}", *studies("mnist", (1, 2, 3), False,
                                                          args.mnist))
    met = [p for p in PRUNERS if all(r.met for r in rows if f"({p})" in r.name)]
    report("pruning", rows, {"meets_both_targets": met})
    print(f"pruners that meet both targets on every set: {', '.join(met) or 'none'}")
    return rows


if __name__ == "__main__":
    main()
