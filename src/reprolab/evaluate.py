"""evaluate stage: test-split metrics (scikit-learn's and your own, reprolab.metrics), the
confusion matrix and the learning curve, all on the training run."""

from __future__ import annotations

import csv
import io
import logging
import time
from typing import Any

import numpy as np

from reprolab.config import Config
from reprolab.files import atomic_path, sha256_file, write_json, write_text

log = logging.getLogger(__name__)

PER_CLASS_FILE = "per_class.json"
PREDICTIONS_FILE = "predictions.csv"
CONFUSION_PNG = "confusion_matrix.png"
MISCLASSIFIED_PNG = "misclassified.png"
CURVE_PNG = "learning_curve.png"


def per_class_report(
    y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]
) -> dict[str, dict[str, float]]:
    from sklearn.metrics import precision_recall_fscore_support

    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    return {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
    }


def predictions_csv(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> str:
    """Rows of (actual, predicted) class names: the input of DVC's confusion template."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["actual", "predicted"])
    writer.writerows((classes[t], classes[p]) for t, p in zip(y_true, y_pred, strict=True))
    return out.getvalue()


def write_confusion_png(path: Any, y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    size = max(4.0, 0.45 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=list(range(len(classes))), display_labels=classes, ax=ax,
        colorbar=False,
    )
    ax.set_title("test split")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_misclassified_png(
    path: Any, images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, classes: list[str],
    limit: int = 36,
) -> int:
    """A grid of misclassified test images titled `true -> predicted`; -> how many shown.

    The tiles form one image on one axes: 36 axes of their own, laid out by tight_layout, took
    about a second of the stage (benchmarks/bench_startup.py)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    wrong = np.flatnonzero(y_true != y_pred)[:limit]
    cols = max(1, min(6, len(wrong)))
    rows = max(1, -(-len(wrong) // cols))
    channels, h, w = images.shape[1:]
    top, gap = max(2, -(-h // 4)), max(1, -(-w // 8))  # a band for each title, a gap between
    grid = np.full((rows * (top + h), cols * (w + gap), channels), 255, dtype=np.uint8)
    width = 1.6 * cols if len(wrong) else 3.2  # inches; the height keeps each tile's aspect
    fig = Figure(figsize=(width, width * grid.shape[0] / grid.shape[1]))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.axis("off")
    for n, i in enumerate(wrong):
        y, x = (n // cols) * (top + h) + top, (n % cols) * (w + gap) + gap // 2
        grid[y : y + h, x : x + w] = images[i].transpose(1, 2, 0)  # C x H x W -> H x W x C
        ax.text(x + w / 2, y - 0.5, f"{classes[y_true[i]]} -> {classes[y_pred[i]]}",
                fontsize=8, ha="center", va="bottom")
    ax.imshow(grid[..., 0] if channels == 1 else grid, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    if not len(wrong):
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center",
                transform=ax.transAxes)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return len(wrong)


CURVE_COLUMNS = ("epoch", "train/loss", "val/loss", "train/accuracy", "val/accuracy")


def read_history(path: Any) -> list[dict[str, float]]:
    """train's history.csv: one row of numbers per epoch, with the learning curve's columns."""
    from reprolab.errors import DataError

    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [key for key in CURVE_COLUMNS if key not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: not train's history: no column {', '.join(missing)}; "
                                "train again: `reprolab train`")
            rows = [{key: float(value) for key, value in row.items()} for row in reader]
    except FileNotFoundError:
        raise DataError(f"{path}: missing; train writes it with the model: `reprolab train` (or "
                        "`dvc repro`)") from None
    except (ValueError, TypeError, csv.Error) as exc:
        raise DataError(f"{path}: not train's history (a row of numbers per epoch): "
                        f"{str(exc).splitlines()[0]}") from None
    if not rows:
        raise DataError(f"{path}: no epochs in it; train again: `reprolab train`")
    return rows


def write_learning_curve(path: Any, history: list[dict[str, float]]) -> None:
    """Loss and accuracy per epoch, side by side. Drawn here, not by train: restyling it reruns
    no training, and `reprolab train` neither imports matplotlib nor pays for the drawing. A
    Figure of its own (no pyplot), a fixed layout and fixed legend corners: tight_layout and the
    search for the best legend spot took 40% of the plot's time."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(9, 3.5))
    left, right = fig.subplots(1, 2)
    for ax, title, corner in ((left, "loss", "upper right"), (right, "accuracy", "lower right")):
        for split in ("train", "val"):
            ax.plot(epochs, [row[f"{split}/{title}"] for row in history], label=f"{split}/{title}")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.legend(loc=corner)
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.14, top=0.91, wspace=0.2)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def run(cfg: Config) -> dict[str, float]:
    from reprolab import tracking
    from reprolab.data import load_meta, load_split
    from reprolab.engine import predict_proba
    from reprolab.metrics import score, user_metrics
    from reprolab.models import check_fits, load_checkpoint

    extra = user_metrics(cfg.evaluate.metrics, cfg.base_dir)  # one line if one does not import
    meta = load_meta(cfg.processed_dir)
    test = load_split(cfg.processed_dir, "test")
    model, spec = load_checkpoint(cfg.model_file, cfg.base_dir)  # one line if it is missing
    check_fits(spec["shape"], test.x.shape[1:], str(cfg.model_file),
               f"the {meta['dataset']} test split", "train on this data first: `reprolab train` "
               "(or `dvc repro`)")
    model_hash = sha256_file(cfg.model_file)
    history = read_history(cfg.history_file)  # before any output: a missing one is one line
    tracking.configure(cfg)
    run_info = tracking.training_run_for(cfg.model_file, model_hash, cfg.tracking.experiment)
    started = time.perf_counter()
    probs = predict_proba(model, test.x, cfg.evaluate.batch_size).numpy()
    throughput = len(test) / (time.perf_counter() - started)
    y_true, y_pred = test.y.numpy(), probs.argmax(1)
    classes = meta["classes"]

    metrics = score(y_true, probs, extra)
    out = cfg.report_dir("evaluate")
    write_json(cfg.metrics_file, metrics)
    # which model these metrics measure; its training run is the one with this hash
    write_json(cfg.evaluated_file, {"model_sha256": model_hash,
                                    "test_sha256": meta["split_sha256"]["test"]})
    write_json(out / PER_CLASS_FILE, per_class_report(y_true, y_pred, classes))
    write_text(out / PREDICTIONS_FILE, predictions_csv(y_true, y_pred, classes))
    write_confusion_png(out / CONFUSION_PNG, y_true, y_pred, classes)
    write_misclassified_png(out / MISCLASSIFIED_PNG, test.x.numpy(), y_true, y_pred, classes)
    write_learning_curve(out / CURVE_PNG, history)

    # Throughput is logged, not put in metrics.json: it is noise in `dvc metrics diff`.
    tracking.log_evaluation(
        run_info["run_id"], run_info["model_uri"],
        {**{f"test/{k}": v for k, v in metrics.items()}, "test/images_per_second": throughput},
        (test.x.numpy(), y_true, f"{meta['dataset']}-test", cfg.paths.processed,
         meta["split_sha256"]["test"]),
        [cfg.metrics_file, *(out / name for name in (PER_CLASS_FILE, CONFUSION_PNG,
                                                     MISCLASSIFIED_PNG, CURVE_PNG))],
        artifact_path="evaluate",
    )
    log.info("evaluate: %s", metrics)
    return metrics


def main(cfg: Config, args: Any) -> None:
    metrics = run(cfg)
    print("evaluate: " + "  ".join(f"test/{k} {v:.4f}" for k, v in metrics.items()))
