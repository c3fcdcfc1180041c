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
