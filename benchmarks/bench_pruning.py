"""4. Pruning: a pruned study against an unpruned one with the same seeded random sampler, so
both try the same points (12 trials of 6 epochs each, params.yaml's search space, digits). Each
round is one seed; a second run of the pruned study with the same seed is the control. Epochs
spent and the best validation accuracy. Target: <= 40% of the epochs, best accuracy within 0.5
points.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from harness import QUICK, Row, check, median, pipeline_project, quiet, report

SEEDS = (1,) if QUICK else (1, 2, 3, 4, 5)
TRIALS, EPOCHS = (4, 2) if QUICK else (12, 6)
PRUNERS = ("median", "successive_halving")


def main() -> list[Row]:
    quiet()
    from reprolab import tune

    root = Path(tempfile.mkdtemp(prefix="bench-pruning-"))
    config = pipeline_project(root, "tune.sampler=random", f"tune.n_trials={TRIALS}",
                              f"tune.epochs={EPOCHS}", "train.device=cpu")
    studies = iter(range(10_000))

    def study(pruner: str, seed: int) -> dict:
        journal = f"study-{next(studies)}.journal"  # a new study each time, inside the project
        return tune.run(config(f"tune.pruner={pruner}", f"seed={seed}",
                               f"paths.optuna_journal={journal}"))

    study("none", 0)  # warm-up: imports and first MLflow calls
    runs: dict[str, list[dict]] = {"none": []}
    control: dict[str, list[dict]] = {}
    for i, seed in enumerate(SEEDS):
        order = ("none", *PRUNERS) if i % 2 == 0 else (*PRUNERS, "none")
        for pruner in order:
            runs.setdefault(pruner, []).append(study(pruner, seed))
        for pruner in PRUNERS:
            control.setdefault(pruner, []).append(study(pruner, seed))

    rows = []
    unpruned = [r["epochs_spent"] for r in runs["none"]]
    for pruner in PRUNERS:
        epochs = [r["epochs_spent"] for r in runs[pruner]]
        again = [r["epochs_spent"] for r in control[pruner]]
        ratio = median(epochs) / median(unpruned)
        note = ("what limits it: the median pruner runs its first 3 trials in full (18 of 72 "
                "epochs) and lets every trial above the running median go on, about half of "
                "them at each epoch" if pruner == "median" else "")
        rows.append(Row(
            name=f"pruning ({pruner}): epochs spent", note=note, a_label="pruned",
            b_label="unpruned",
            a=median(epochs), b=median(unpruned), unit="epochs", ratio=ratio, ratio_label="A/B",
            control=median(again) / median(epochs), target="<= 0.40",
            met=check(ratio, "<= 0.40"), rounds=len(SEEDS),
            samples={"A": epochs, "B": unpruned, "A'": again},
        ))
        best = [r["best_value"] for r in runs[pruner]]
        best_none = [r["best_value"] for r in runs["none"]]
        lost = median([(b - a) * 100 for a, b in zip(best, best_none, strict=True)])
        rows.append(Row(
            name=f"pruning ({pruner}): best val accuracy", a_label="pruned",
            b_label="unpruned", a=median(best), b=median(best_none), unit="", ratio=lost,
            ratio_label="B-A, points", control=None, target="<= 0.5",
            met=check(lost, "<= 0.5"), rounds=len(SEEDS), samples={"A": best, "B": best_none},
            note="" if pruner != PRUNERS[-1] else
            "A vs A: the same seed twice gives the same trials, hence 1.0 exactly when the "
            "study is deterministic (it is on the CPU)",
        ))
    report("pruning", rows)
    return rows


if __name__ == "__main__":
    main()
