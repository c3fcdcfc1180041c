"""Pure metric and gate functions against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from reprolab.evaluate import per_class_report, predictions_csv
from reprolab.gate import decide
from reprolab.metrics import classification_metrics
from reprolab.tags import DATA_MANIFEST


def test_classification_metrics_match_hand_computed_values():
    # class 0: tp=2 fp=1 fn=0; class 1: tp=1 fp=0 fn=1; class 2: tp=1 fp=0 fn=0
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 1, 2])
    m = classification_metrics(y_true, np.eye(3)[y_pred])
    p = [2 / 3, 1.0, 1.0]
    r = [1.0, 0.5, 1.0]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, r, strict=True)]  # 0.8, 2/3, 1
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["precision_macro"] == pytest.approx(sum(p) / 3)
    assert m["recall_macro"] == pytest.approx(sum(r) / 3)
    assert m["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert m["f1_weighted"] == pytest.approx((2 * f1[0] + 2 * f1[1] + 1 * f1[2]) / 5)
    assert "top5_accuracy" not in m  # only with more than 5 classes


def test_top5_accuracy_by_hand():
    # 7 classes; the true class ranks 1st, 5th and 6th for the three samples.
    probs = np.array([
        [0.70, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05],
        [0.30, 0.25, 0.20, 0.15, 0.06, 0.03, 0.01],
        [0.30, 0.25, 0.20, 0.15, 0.06, 0.03, 0.01],
    ])
    m = classification_metrics(np.array([0, 4, 5]), probs)
    assert m["top5_accuracy"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)


def test_per_class_report_includes_classes_never_predicted():
    report = per_class_report(np.array([0, 1, 2]), np.array([0, 0, 0]), ["a", "b", "c"])
    assert report["a"] == {"precision": pytest.approx(1 / 3), "recall": 1.0,
                           "f1": pytest.approx(0.5), "support": 1}
    assert report["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_predictions_csv_uses_class_names():
    text = predictions_csv(np.array([0, 1]), np.array([1, 1]), ["cat", "dog"])
    assert text == "actual,predicted\ncat,dog\ndog,dog\n"


def _champion(value: float, data: str = "d1") -> dict:
    return {"version": "3", "tags": {DATA_MANIFEST: data, "test/f1_macro": f"{value:.6f}"}}


@pytest.mark.parametrize(
    ("value", "champion", "min_delta", "promote", "reason"),
    [
        (0.90, None, 0.0, True, "no champion yet"),
        (0.95, _champion(0.90), 0.0, True, "beats champion v3"),
        (0.90, _champion(0.90), 0.0, False, "does not beat"),
        (0.92, _champion(0.90), 0.05, False, "by more than min_delta 0.05"),
        (0.99, _champion(0.90, data="other"), 0.0, False, "other test data"),
    ],
)
def test_promotion_gate(value, champion, min_delta, promote, reason):
    got, why = decide("f1_macro", value, "d1", champion, min_delta)
    assert got is promote
    assert reason in why
