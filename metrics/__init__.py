"""Your own test metrics, by name and import path: `evaluate.metrics: {balanced_accuracy:
metrics.example:balanced_accuracy}`."""
