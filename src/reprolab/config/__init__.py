"""params.yaml (+ `-S key.path=value` overrides) -> one frozen, typed config.

All validation lives in this package, and it happens before any stage does any work:
`sections.py` holds the sections and the rules of their keys, `load.py` reads params.yaml and
the overrides, and this module the whole config, the rules across sections, and the derived
values (absolute paths, store URIs, the registered model's name) as properties.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from pydantic import Field, PrivateAttr, model_validator

from reprolab.config.sections import (
    METRICS,
    TRACKING_SCHEMES,
    Data,
    Evaluate,
    Int,
    Model,
    Paths,
    Register,
    Tracking,
    Train,
    Tune,
    _scheme,
    _Section,
    sources,
)
from reprolab.errors import ConfigError

with warnings.catch_warnings():
    # `register` is the stage's name; it shadows only ABCMeta.register, which nothing here uses.
    warnings.filterwarnings("ignore", message='Field name "register"', category=UserWarning)

    class Config(_Section):
        seed: Int = Field(ge=0)
        paths: Paths
        data: Data
        model: Model
        train: Train
        tune: Tune
        evaluate: Evaluate
        register: Register = Field()  # a default would be ABCMeta.register: required
        tracking: Tracking

        # Where the params file lives: stage outputs resolve against it. Not a knob.
        _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

        @model_validator(mode="after")
        def _gate_metric_exists(self) -> Config:
            metric = self.register.metric
            if metric not in METRICS and metric not in self.evaluate.metrics:
                own = f", or one of evaluate.metrics ({', '.join(self.evaluate.metrics)})" \
                    if self.evaluate.metrics else ", or a metric of your own in evaluate.metrics"
                raise ValueError(f"register.metric = {metric!r}: not a metric evaluate computes;"
                                 f" allowed: {', '.join(METRICS)}{own}")
            if (self.train.freeze_backbone or self.train.backbone_lr_scale != 1.0) and \
                    not self.model.pretrained:
                raise ValueError(
                    "train.freeze_backbone / train.backbone_lr_scale: fine-tuning knobs, but "
                    "model.pretrained is null (nothing to fine-tune); allowed: false and 1.0, "
                    "or set model.pretrained")
            return self

        # ---- the data source (data/sources.py) ----

        @functools.cached_property
        def source(self) -> Any:
            """The configured data source; your own is imported (from the repository's
            sources/) and checked against the contract here."""
            return sources.make(self.data, self._base_dir)

        @property
        def weights_dir(self) -> Path:
            return self._path(self.paths.weights)

        # ---- derived paths (DVC outputs, relative to the repository) ----

        def _path(self, rel: str) -> Path:
            return self._base_dir / rel

        @property
        def base_dir(self) -> Path:
            return self._base_dir

        @property
        def raw_dir(self) -> Path:
            """<paths.raw>/<the source's name>/: fetch writes it, preprocess reads it."""
            return self._path(self.paths.raw) / self.source.name

        @property
        def processed_dir(self) -> Path:
            return self._path(self.paths.processed)

        @property
        def models_dir(self) -> Path:
            return self._path(self.paths.models)

        @property
        def model_file(self) -> Path:
            """train's checkpoint of the final model: evaluate measures it, register binds to it."""
            return self.models_dir / "model.pt"

        @property
        def metrics_file(self) -> Path:
            """evaluate's test metrics: register reads them."""
            return self.report_dir("evaluate") / "metrics.json"

        @property
        def evaluated_file(self) -> Path:
            """Which model evaluate measured (sha256): register checks it is the one in models/."""
            return self.report_dir("evaluate") / "evaluated.json"

        @property
        def history_file(self) -> Path:
            """train's metrics per epoch: evaluate draws the learning curve from them."""
            return self.report_dir("train") / "history.csv"

        def report_dir(self, stage: str) -> Path:
            return self._path(self.paths.reports) / stage

        @property
        def best_params_file(self) -> Path:
            """tune writes it, train reads it when train.use_tuned."""
            return self.report_dir("tune") / "best_params.yaml"

        @property
        def checkpoint_file(self) -> Path:
            """train's resume checkpoint: not a DVC output, which DVC would delete first."""
            return self._path(self.paths.checkpoints) / "train.pt"

        # ---- stores (never inside a DVC output) ----

        @property
        def store_root(self) -> Path:
            """The real repository root, also from inside `dvc exp run --temp/--queue` copies.

            DVC sets DVC_ROOT for every stage it runs, and points it at the parent repository for
            queued and temporary experiments, so every experiment writes into the same stores.
            """
            return Path(os.environ.get("DVC_ROOT") or self._base_dir).resolve()

        @property
        def mlflow_uri(self) -> str:
            env = os.environ.get("MLFLOW_TRACKING_URI")
            if env:
                # checked before MLflow opens it: a typo would otherwise surface as a traceback
                file_store = os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true"
                if env != "databricks" and _scheme(env) not in TRACKING_SCHEMES and \
                        not file_store:
                    raise ConfigError(
                        f"MLFLOW_TRACKING_URI = {env!r}: not a tracking store MLflow opens; "
                        f"allowed schemes: {', '.join(TRACKING_SCHEMES)} (for a local store: "
                        "sqlite:///path/mlflow.db)"
                    )
                return env
            return f"sqlite:///{self.store_root / self.paths.mlflow_db}"

        @property
        def mlflow_store_dir(self) -> Path | None:
            """The folder of an embedded (sqlite) MLflow store; None for a server."""
            uri = self.mlflow_uri
            if not uri.startswith("sqlite:///"):
                return None
            return Path(uri.removeprefix("sqlite:///")).parent

        @property
        def mlflow_artifact_root(self) -> Path | None:
            """Artifacts of an embedded store live beside its database; a server chooses."""
            store = self.mlflow_store_dir
            return store / "mlartifacts" if store else None

        @property
        def optuna_journal(self) -> Path:
            return self.store_root / self.paths.optuna_journal

        # ---- the registry ----

        @property
        def registered_model_name(self) -> str:
            """register.model_name, or one name per data source (`reprolab-digits`; your own
            images: `reprolab-imagefolder-<folder>`), so that each dataset has its own
            champion. The input shape is checked by register against the registered model's
            tag."""
            return self.register.model_name or f"reprolab-{self.source.name}"

        # ---- identity ----

        def as_dict(self) -> dict[str, Any]:
            return self.model_dump(mode="json")

        def flat(self) -> dict[str, Any]:
            """`train.lr`-style keys, as MLflow params."""
            return _flatten(self.as_dict())

        @property
        def params_hash(self) -> str:
            blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
            return hashlib.sha256(blob.encode()).hexdigest()


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, list | tuple):
            out[name] = ",".join(map(str, value))
        else:
            out[name] = value
    return out


from reprolab.config.load import (  # noqa: E402 - they build on Config, defined above
    apply_overrides,
    load_config,
    parse_override,
    with_train,
    with_tuned,
)

__all__ = ["Config", "apply_overrides", "load_config", "parse_override", "with_train",
           "with_tuned"]
