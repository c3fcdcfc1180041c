"""A test metric of your own: copy this file, change the function, and name it in params.yaml:

    evaluate:
      metrics:
        balanced_accuracy: metrics.example:balanced_accuracy
    register:
      metric: balanced_accuracy      # optional: gate the champion on it

reprolab calls it with the test labels, the predicted classes (both int arrays of length N) and
the predicted probabilities (N x K), and logs the float it returns as `test/<name>` beside the
built-in metrics, in reports/evaluate/metrics.json and on the training run.
"""

from __future__ import annotations

import numpy as np


def balanced_accuracy(labels: np.ndarray, predictions: np.ndarray,
                      probabilities: np.ndarray) -> float:
    """The mean of the recalls of the classes that occur in `labels` (scikit-learn's)."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(labels, predictions))
