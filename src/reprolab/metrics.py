"""Test metrics: the built-ins (scikit-learn) and your own by import path, computed alike.

BUILTIN names what `evaluate` always computes; `evaluate.metrics` adds your own, each a function
`f(labels, predictions, probabilities) -> float` (metrics/example.py); any of them can gate
`register` (register.metric).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from reprolab.errors import ConfigError, DataError

# what evaluate computes for every model (top5_accuracy too, above 5 classes)
BUILTIN = ("accuracy", "f1_macro", "f1_weighted", "precision_macro", "recall_macro")
NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
ALLOWED = ("package.module:function, a function(labels, predictions, probabilities) -> float "
           "(as metrics/example.py)")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Accuracy, macro and weighted F1, macro precision and recall, and top-5 accuracy when
    there are more than 5 classes (pure, scikit-learn). `probs` is N x K."""
    from sklearn.metrics import (
        accuracy_score,
        f1_score,
        precision_score,
        recall_score,
        top_k_accuracy_score,
    )

    y_pred = probs.argmax(1)
    num_classes = probs.shape[1]
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "f1_weighted": float(f1_score(y_true, y_pred, average="weighted", zero_division=0)),
        "precision_macro": float(
            precision_score(y_true, y_pred, average="macro", zero_division=0)
        ),
        "recall_macro": float(recall_score(y_true, y_pred, average="macro", zero_division=0)),
    }
    if num_classes > 5:
        metrics["top5_accuracy"] = float(
            top_k_accuracy_score(y_true, probs, k=5, labels=list(range(num_classes)))
        )
    return metrics


def user_metrics(specs: dict[str, str], base_dir: Path | None
                 ) -> dict[str, Callable[..., Any]]:
    """evaluate.metrics -> {name: function}, each imported and checked to be callable."""
    from reprolab.plugins import load_object

    out = {}
    for name, path in specs.items():
        fn = load_object(path, base_dir, f"evaluate.metrics.{name}", ALLOWED)
        if not callable(fn):
            raise ConfigError(f"evaluate.metrics.{name} = {path!r}: a {type(fn).__name__}, not "
                              f"a function; allowed: {ALLOWED}")
        out[name] = fn
    return out


def score(y_true: np.ndarray, probs: np.ndarray,
          extra: dict[str, Callable[..., Any]] | None = None) -> dict[str, float]:
    """Every metric of a model's test predictions: the built-ins, then your own."""
    metrics = classification_metrics(y_true, probs)
    y_pred = probs.argmax(1)
    for name, fn in (extra or {}).items():
        try:
            value = fn(y_true, y_pred, probs)
        except Exception as exc:  # noqa: BLE001 - the user's function may fail in any way
            raise DataError(f"evaluate.metrics.{name}: failed on the test split "
                            f"({type(exc).__name__}: {exc})") from None
        if isinstance(value, np.generic):
            value = value.item()
        if not isinstance(value, int | float) or isinstance(value, bool) or \
                not math.isfinite(value):
            raise DataError(f"evaluate.metrics.{name}: returned {value!r}; allowed: a finite "
                            "number")
        metrics[name] = float(value)
    return metrics


# ---- paired comparison of two models on the same test images ----


def from_confusion(counts: np.ndarray, metric: str) -> np.ndarray:
    """A built-in metric from confusion matrices (R x K x K: true x predicted), vectorised over
    the first axis; the same values as scikit-learn's with zero_division=0."""
    tp = np.diagonal(counts, axis1=1, axis2=2).astype(np.float64)
    support, predicted = counts.sum(axis=2), counts.sum(axis=1)
    total = support.sum(axis=1)
    if metric == "accuracy":
        return tp.sum(axis=1) / total
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    # scikit-learn averages over the classes present in either the labels or the predictions
    present = (support + predicted) > 0
    macro = {"f1_macro": f1, "precision_macro": precision, "recall_macro": recall}
    if metric in macro:
        return (macro[metric] * present).sum(axis=1) / present.sum(axis=1)
    if metric == "f1_weighted":
        return (f1 * support).sum(axis=1) / total
    raise KeyError(metric)


def paired_bootstrap(y: np.ndarray, probs_new: np.ndarray, probs_old: np.ndarray, metric: str,
                     extra: dict[str, Callable[..., Any]] | None = None, rounds: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """The new model's `metric` minus the old one's on the same test images, with the 95%
    interval of that difference over `rounds` bootstrap resamples of the images (the same
    resample for both models: a paired comparison). -> {difference, low, high, images}."""
    rng = np.random.default_rng(seed)
    n, k = probs_new.shape
    new, old = probs_new.argmax(1), probs_old.argmax(1)
    index = rng.integers(0, n, size=(rounds, n))
    if metric in BUILTIN:
        def values(pred: np.ndarray, rows: np.ndarray) -> np.ndarray:
            codes = (y * k + pred)[rows]
            counts = np.stack([np.bincount(r, minlength=k * k) for r in codes])
            return from_confusion(counts.reshape(len(rows), k, k), metric)

        whole = np.arange(n)[None]
        difference = float(values(new, whole)[0] - values(old, whole)[0])
        spread = values(new, index) - values(old, index)
    else:
        fn = (extra or {})[metric]
        difference = float(fn(y, new, probs_new) - fn(y, old, probs_old))
        spread = np.array([fn(y[r], new[r], probs_new[r]) - fn(y[r], old[r], probs_old[r])
                           for r in index])
    low, high = np.percentile(spread, [2.5, 97.5])
    return {"difference": difference, "low": float(low), "high": float(high), "images": int(n)}
