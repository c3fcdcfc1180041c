"""The sections of params.yaml, one class each, with the rules of their keys. An unknown key,
a wrong type or an out-of-range value is refused with one line that names the key, the value and
what is allowed; the names a key may take come from the tables they name (models, optimizers,
data sources, metrics)."""

from __future__ import annotations

import difflib
import itertools
import re
from pathlib import PurePosixPath
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    model_validator,
)

from reprolab.data import sources
from reprolab.metrics import BUILTIN as METRICS
from reprolab.metrics import NAME as METRIC_NAME
from reprolab.models import name_problem
from reprolab.optim import OPTIMIZERS, SCHEDULES
from reprolab.plugins import is_import_path

# the allowed names come from the tables they name (optim.py, data/sources.py, metrics.py)
Optimizer = Literal[tuple(OPTIMIZERS)]
WEIGHT_SUFFIXES = (".pt", ".pth", ".safetensors")
STORAGE_SCHEMES = ("postgresql", "mysql", "mariadb", "sqlite")
# MLflow 3 refuses file stores (file:// or a plain path) unless MLFLOW_ALLOW_FILE_STORE is set
TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks")


def _scheme(url: str) -> str | None:
    """`postgresql+psycopg://...` -> 'postgresql'; None when `url` has no scheme."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9.-]*)(\+[A-Za-z0-9_]+)?://", url)
    return match.group(1).lower() if match else None


def _numeric_string(value: Any) -> Any:
    # YAML 1.1 reads `1e-3` (no dot) as a string; a float field takes such numeric strings.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


# inf and nan pass `gt=0` and friends, then train nothing: refused everywhere
Float = Annotated[float, BeforeValidator(_numeric_string), Strict(), AllowInfNan(False)]
Int = Annotated[int, Strict()]
Fraction = Annotated[Float, Field(gt=0, lt=1)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# What a path knob may never name: the repository's own files and folders. Stages replace their
# output folders whole, so an output there would delete them.
RESERVED = (".git", ".dvc", ".ci", "src", "tests", "benchmarks", "docs", "nets", "sources",
            "metrics", "params.yaml", "dvc.yaml",
            "dvc.lock", "MLproject", "conda.yaml", "python_env.yaml", "pyproject.toml",
            "Makefile", "README.md", ".gitignore", ".dvcignore")


class Paths(_Section):
    """Relative to the repository root; dvc.yaml uses the same values through ${paths.*}.

    Each must stay inside the repository, have a place of its own (no two equal, none inside
    another: DVC deletes an output before its stage runs, stores included) and keep clear of the
    repository's own files."""

    raw: StrictStr
    processed: StrictStr
    models: StrictStr
    reports: StrictStr
    checkpoints: StrictStr
    mlflow_db: StrictStr
    optuna_journal: StrictStr
    weights: StrictStr  # pretrained weights files (an input, under DVC: `dvc add weights/x.pt`)

    @model_validator(mode="after")
    def _inside_and_apart(self) -> Paths:
        parts = {}
        for key, value in self.model_dump().items():
            path = PurePosixPath(value)
            if path.is_absolute() or value.startswith("~") or ".." in path.parts or \
                    not path.parts:
                raise ValueError(
                    f"paths.{key} = {value!r}: not a folder inside the repository; allowed: a "
                    "relative path without '..', not the repository root itself"
                )
            if path.parts[0] in RESERVED:
                raise ValueError(
                    f"paths.{key} = {value!r}: inside the repository's own {path.parts[0]}; "
                    f"allowed: a place of its own, not any of {', '.join(RESERVED)}"
                )
            parts[key] = path.parts
        for (a, pa), (b, pb) in itertools.combinations(parts.items(), 2):
            shorter = min(len(pa), len(pb))
            if pa[:shorter] == pb[:shorter]:
                raise ValueError(
                    f"paths.{a} = {'/'.join(pa)!r} and paths.{b} = {'/'.join(pb)!r}: one is or "
                    "holds the other; allowed: each path a place of its own"
                )
        return self


class Augment(_Section):
    """null: the dataset's default (random crop with 4 pixels of padding and flips for CIFAR,
    nothing for the digit sets and your own folders)."""

    crop_padding: Int | None = Field(ge=0)
    flip: StrictBool | None


class Data(_Section):
    dataset: StrictStr  # a built-in (sources.BUILTIN) or package.module:Class of your own
    kwargs: dict[StrictStr, Any]  # your own source's constructor keywords
    image_folder: StrictStr | None
    channels: Literal[1, 3] | None
    image_size: Int | None = Field(ge=4)
    skip_bad_images: StrictBool
    # PIL reads the size from the header: a larger image is refused before it is decoded
    max_image_pixels: Int = Field(ge=1)
    # an image folder's own train/, val/ (and test/) folders: null detects them, true requires
    # them, false reads the top level as classes
    folder_splits: StrictBool | None
    val_fraction: Fraction
    test_fraction: Fraction
    augment: Augment

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> Data:
        if self.dataset not in sources.BUILTIN and not is_import_path(self.dataset):
            close = difflib.get_close_matches(self.dataset, list(sources.BUILTIN), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ValueError(f"data.dataset = {self.dataset!r}: not a dataset; {hint}allowed: "
                             f"{sources.ALLOWED}")
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                "data.val_fraction + data.test_fraction = "
                f"{self.val_fraction + self.test_fraction:g}; "
                "allowed: a sum below 1, so that training keeps data"
            )
        if self.dataset == "imagefolder" and not self.image_folder:
            raise ValueError(
                "data.image_folder: required when data.dataset is 'imagefolder' "
                "(a folder with one subfolder of images per class)"
            )
        return self

    @property
    def crop_padding(self) -> int:
        if self.augment.crop_padding is not None:
            return self.augment.crop_padding
        return 4 if self.dataset.startswith("cifar") else 0

    @property
    def flip(self) -> bool:
        if self.augment.flip is not None:
            return self.augment.flip
        return self.dataset.startswith("cifar")


class Model(_Section):
    name: StrictStr  # a built-in (models.BUILTIN), timm/<architecture> or package.module:Callable
    kwargs: dict[StrictStr, Any]  # the constructor's keywords
    pretrained: StrictBool | StrictStr | None  # a weights file under paths.weights, or true: timm's
    allow_download: StrictBool  # pretrained: true may download from the hub (off: cache only)
    input_size: Int | None = Field(ge=4)  # the network's input size; null: see models.spec_for

    @model_validator(mode="after")
    def _names_a_model(self) -> Model:
        problem = name_problem(self.name)
        if problem:
            raise ValueError(problem)
        if self.pretrained is True and not self.name.startswith("timm/"):
            raise ValueError(
                f"model.pretrained = true with model.name = {self.name!r}: only timm/<architecture>"
                " models have pretrained weights of their own; allowed: a weights file under "
                "weights/ (for instance weights/backbone.pt), or null")
        if isinstance(self.pretrained, str):
            path = PurePosixPath(self.pretrained)
            if path.is_absolute() or ".." in path.parts or path.suffix not in WEIGHT_SUFFIXES:
                raise ValueError(
                    f"model.pretrained = {self.pretrained!r}: not a weights file in the "
                    f"repository; allowed: a relative path ending in {', '.join(WEIGHT_SUFFIXES)} "
                    "under paths.weights (a dependency of tune and train), true (timm's own), "
                    "or null")
        return self


class Train(_Section):
    # What each knob changes, said once. NO_RESULT: how the training runs, not what it
    # computes (a checkpoint resumes across them, a tuning study goes on across them).
    # NOT_IN_TRIALS: what a tuning trial takes from elsewhere (its point in the search space,
    # tune.epochs) or does not use. The rest are the trial knobs (`trial_knobs`): they make
    # trials comparable or not, and dvc.yaml's tune stage depends on exactly them.
    NO_RESULT: ClassVar[tuple[str, ...]] = ("checkpoint_every_s", "processes",
                                            "memory_budget_mb")
    NOT_IN_TRIALS: ClassVar[tuple[str, ...]] = ("optimizer", "lr", "epochs", "use_tuned",
                                                "device", "compile")

    optimizer: Optimizer
    lr: Float = Field(gt=0)
    momentum: Float = Field(ge=0, lt=1)
    nesterov: StrictBool
    weight_decay: Float = Field(ge=0)
    schedule: Literal[SCHEDULES]
    warmup_epochs: Float = Field(ge=0)
    label_smoothing: Float = Field(ge=0, lt=1)
    early_stopping_patience: Int = Field(ge=0)
    epochs: Int = Field(ge=1)
    batch_size: Int = Field(ge=1)
    use_tuned: StrictBool
    device: StrictStr = Field(pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$")
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    compile: StrictBool
    deterministic: StrictBool
    # > 1: `reprolab train` starts this many ranks on this machine with torchrun's launcher
    processes: Int = Field(default=1, ge=1)
    # the resume checkpoint: after the epoch that ends this many seconds after the last one
    # (0: every epoch), at the end, and on SIGTERM / Ctrl-C
    checkpoint_every_s: Float = Field(default=30.0, ge=0)
    # the train and val splits are held whole on the device when they fit this many MiB per
    # process (null: half of the device's free memory, within the process's cgroup limit, shared
    # by the machine's ranks or tuning workers), else read from their mapped files batch by batch
    memory_budget_mb: Float | None = Field(default=None, ge=0)
    # fine-tuning: false, true (the whole training) or the first N epochs with the backbone
    # frozen; the backbone's lr is lr x backbone_lr_scale (the head's is lr)
    freeze_backbone: StrictBool | Annotated[Int, Field(ge=0)] = False
    backbone_lr_scale: Float = Field(default=1.0, gt=0)

    @classmethod
    def trial_knobs(cls) -> tuple[str, ...]:
        return tuple(k for k in cls.model_fields if k not in cls.NO_RESULT + cls.NOT_IN_TRIALS)

    @property
    def freeze_epochs(self) -> int:
        if self.freeze_backbone is True:
            return self.epochs
        return int(self.freeze_backbone or 0)

    @model_validator(mode="after")
    def _warmup_fits(self) -> Train:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs = {self.warmup_epochs:g} is not below train.epochs = "
                f"{self.epochs}; allowed: warmup_epochs < epochs"
            )
        if self.processes > 1 and self.device == "mps":
            raise ValueError(
                f"train.processes = {self.processes} with train.device = 'mps': PyTorch's "
                "distributed training has no MPS backend; allowed: processes 1 on mps, or "
                "device cpu, cuda or auto"
            )
        return self


Range = tuple[Float, Float]


class Tune(_Section):
    study: StrictStr = Field(min_length=1)
    n_trials: Int = Field(ge=1)
    epochs: Int = Field(ge=1)
    timeout_s: Float | None = Field(gt=0)
    lr_low: Float = Field(gt=0)
    lr_high: Float = Field(gt=0)
    optimizers: tuple[Optimizer, ...] = Field(min_length=1)
    weight_decay: Range | None  # log-uniform [low, high]; null: train.weight_decay
    momentum: Range | None  # uniform [low, high]; null: train.momentum
    batch_sizes: tuple[Annotated[Int, Field(ge=1)], ...] | None = Field(min_length=1)
    sampler: Literal["tpe", "random", "grid"]
    grid_points: Int = Field(ge=2)  # grid: values per continuous dimension
    storage: StrictStr | None
    workers: Int = Field(ge=1)
    heartbeat_s: Int = Field(ge=1)
    max_failed: Int | None = Field(ge=1)  # null: 2 x n_trials
    pruner: Literal["percentile", "median", "successive_halving", "hyperband", "none"]
    # percentile: after each epoch, a trial goes on only while its best val/accuracy is in the
    # top `percentile` percent of the trials at that epoch (the first trial runs in full)
    percentile: Float = Field(gt=0, lt=100)

    @property
    def failure_limit(self) -> int:
        """Failed trials after which the study stops: a space where every trial diverges ends
        with an error instead of failing trials forever."""
        return self.max_failed or 2 * self.n_trials

    @model_validator(mode="after")
    def _ranges(self) -> Tune:
        if self.lr_low >= self.lr_high:
            raise ValueError(
                f"tune.lr_low = {self.lr_low:g} is not below tune.lr_high = {self.lr_high:g}; "
                "allowed: tune.lr_low < tune.lr_high"
            )
        for key, bounds, lowest, highest in (("weight_decay", self.weight_decay, 0, None),
                                             ("momentum", self.momentum, 0, 1)):
            if bounds is None:
                continue
            low, high = bounds
            if not (lowest < low < high) or (highest is not None and high >= highest):
                allowed = f"{lowest} < low < high" + (f" < {highest}" if highest else "")
                raise ValueError(
                    f"tune.{key} = [{low:g}, {high:g}]: not a range; allowed: [low, high] with "
                    f"{allowed}, or null"
                )
        if self.storage is not None and _scheme(self.storage) not in STORAGE_SCHEMES:
            raise ValueError(
                f"tune.storage = {self.storage!r}: not a database URL that Optuna can open; "
                "allowed: null (the journal file), postgresql://user@host/db, "
                "mysql://user@host/db or sqlite:///path"
            )
        if self.workers > 1 and (self.storage or "").startswith("sqlite"):
            raise ValueError(
                f"tune.workers = {self.workers} with tune.storage = {self.storage!r}: SQLite "
                "cannot serve several writers; use tune.storage: null (the journal file) or a "
                "postgresql:// URL"
            )
        if len(set(self.optimizers)) != len(self.optimizers):
            raise ValueError(f"tune.optimizers = {list(self.optimizers)}: names repeat")
        return self


class Evaluate(_Section):
    batch_size: Int = Field(ge=1)
    metrics: dict[StrictStr, StrictStr]  # name -> package.module:function, beside the built-ins

    @model_validator(mode="after")
    def _metric_names(self) -> Evaluate:
        for name, path in self.metrics.items():
            if not METRIC_NAME.match(name) or name in METRICS or name == "top5_accuracy":
                raise ValueError(f"evaluate.metrics.{name}: not a name of its own; allowed: "
                                 "lowercase letters, digits and _, none of the built-ins ("
                                 f"{', '.join(METRICS)}, top5_accuracy)")
            if not is_import_path(path):
                raise ValueError(f"evaluate.metrics.{name} = {path!r}: not an import path; "
                                 "allowed: package.module:function (as metrics/example.py)")
        return self


class Register(_Section):
    enabled: StrictBool  # false: the stage writes decision.json saying so, registers nothing
    model_name: StrictStr | None = Field(min_length=1)  # null: derived from the dataset
    metric: StrictStr  # a built-in metric or one of evaluate.metrics (checked by Config)
    min_delta: Float = Field(ge=0)
    min_value: Float | None  # the floor: a version below it never becomes champion
    # promote only when the paired 95% interval of the difference clears min_delta
    require_significance: StrictBool

    @model_validator(mode="after")
    def _name_fits_a_model_uri(self) -> Register:
        # models:/NAME@ALIAS and models:/NAME/VERSION: these characters would split the name
        if self.model_name is not None and (set(self.model_name) & set("/@:") or
                                            self.model_name != self.model_name.strip()):
            raise ValueError(
                f"register.model_name = {self.model_name!r}: not usable in models:/NAME@ALIAS; "
                "allowed: a name without '/', '@' or ':' and no surrounding spaces, or null "
                "(reprolab-<dataset>)"
            )
        return self


class Tracking(_Section):
    experiment: StrictStr = Field(min_length=1)
