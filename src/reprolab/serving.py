"""The MLflow flavour of reprolab's logged models: MLflow's own pytorch flavour (pt2, no pickled
code) whose python_function loader is this module of the installed package, so that `mlflow
models serve` (`make serve`) checks before it answers:

- the files it serves are the ones recorded when the model was logged (their sha256, the logged
  model's tags.MODEL_FILES tag in the tracking store): a swapped or damaged file stops the server
  at start-up with one line;
- every request holds pixel values, numbers within 0..255 (what the model was trained on):
  anything else (1e30, -5, NaN) is refused with a 400 that says why, never answered.

`mlflow.pytorch.load_model` and `reprolab predict` read the same files as MLflow's pytorch
flavour. The tracking layer (tracking.py, registry.py, this module) alone imports mlflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

PIXELS = (0.0, 255.0)


def save_model(pytorch_model: Any, path: str, mlflow_model: Any = None, **kwargs: Any) -> None:
    """mlflow.pytorch.save_model, with this module as the python_function loader (Model.log
    calls it as a flavour's save_model)."""
    import mlflow.pytorch

    mlflow.pytorch.save_model(pytorch_model, path, mlflow_model=mlflow_model, **kwargs)
    mlflow_model.flavors["python_function"]["loader_module"] = __name__
    mlflow_model.save(str(Path(path) / "MLmodel"))


def check_served_files(root: Path) -> None:
    """The model folder's files against the hashes its logged model recorded; raises with one
    line when they differ or when there is nothing to check against."""
    import yaml
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from reprolab.errors import DataError
    from reprolab.registry import check_files
    from reprolab.tags import MODEL_FILES

    model_id = (yaml.safe_load((root / "MLmodel").read_text()) or {}).get("model_id")
    try:
        recorded = MlflowClient().get_logged_model(model_id).tags.get(MODEL_FILES)
    except MlflowException as exc:
        raise MlflowException(f"reprolab: cannot check the served model {model_id}: "
                              f"{str(exc).splitlines()[0]}; serve it where MLFLOW_TRACKING_URI "
                              "names its store") from None
    if not recorded:
        raise MlflowException(f"reprolab: the served model {model_id} recorded no file hashes "
                              f"(no {MODEL_FILES} tag): nothing can check its bytes; refused")
    try:
        check_files(root, json.loads(recorded), f"the served model {model_id}")
    except DataError as exc:  # the server stops with that line
        raise MlflowException(f"reprolab: {exc}") from None


class CheckedModel:
    """The pyfunc model that the scoring server calls: pixels checked, then MLflow's own."""

    def __init__(self, inner: Any):
        self.inner = inner

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        values = data.to_numpy() if hasattr(data, "to_numpy") else np.asarray(data)
        if values.dtype.kind not in "biuf" or not np.isfinite(values).all() or \
                values.size and (values.min() < PIXELS[0] or values.max() > PIXELS[1]):
            raise MlflowException(
                "reprolab: the inputs are not pixel values: the model takes numbers within "
                f"{PIXELS[0]:g}..{PIXELS[1]:g} (uint8 images as floats), got "
                f"{_range(values)}", error_code=INVALID_PARAMETER_VALUE)
        return self.inner.predict(data, params)


def _range(values: np.ndarray) -> str:
    if values.dtype.kind not in "biuf":
        return f"values of type {values.dtype}"
    finite = values[np.isfinite(values)]
    bad = values.size - finite.size
    shown = f"{finite.min():g}..{finite.max():g}" if finite.size else "no finite value"
    return shown + (f" and {bad} values that are not finite" if bad else "")


def _load_pyfunc(path: str, model_config: Any = None) -> CheckedModel:
    """MLflow calls it with the model's data folder (`<model>/data`) to serve the model."""
    import mlflow.pytorch

    check_served_files(Path(path).parent)
    return CheckedModel(mlflow.pytorch._load_pyfunc(path, model_config))
