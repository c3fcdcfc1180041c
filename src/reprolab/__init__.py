"""reprolab: a reproducible training workflow for PyTorch image classifiers."""

__version__ = "0.1.0"
