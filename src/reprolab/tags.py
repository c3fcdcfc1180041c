"""The names of what reprolab writes into MLflow beside params and metrics: run tags, registered
version tags, registered model tags, trial attributes. Every module reads them from here
(tests/test_facts.py finds no other module that spells one), and the docs list them.

Stores outlive code: a name here is never renamed in place. A new name comes with a rule, beside
it, for what the stores already hold under the old one.
"""

from __future__ import annotations

# ---- lineage: where a model came from (training run tags, copied onto its registered version)
GIT_COMMIT = "git.commit"  # the commit the code came from ("none" outside git)
GIT_DIRTY = "git.dirty"  # "true" when tracked files differed from that commit
PARAMS_HASH = "params_hash"  # sha256 of the resolved config (models/config.yaml)
DATA_MANIFEST = "data.manifest_sha256"  # sha256 of the raw data's manifest
DATA_PROCESSED = "data.processed_sha256"  # one hash of the processed splits
DATA_TEST = "data.test_sha256"  # the test split's own hash: the images the gate compares on
DATASET = "data.dataset"  # the data source's name
TORCH_VERSION = "torch.version"
CPU_CAPABILITY = "torch.cpu_capability"  # AVX2, AVX512, ...: bitwise results depend on it
DEVICE = "device"
PRECISION = "precision"
WORLD_SIZE = "distributed.world_size"
BACKEND = "distributed.backend"
DVC_LOCK = "dvc.lock_sha256"  # dvc.lock as DVC had written it when the stage started
DVC_STAGE = "dvc.stage"
DVC_EXP = "dvc.exp_name"
MODEL_CODE = "model.code_sha256"  # your network's code (nets/)
PRETRAINED = "model.pretrained"  # the weights it was fine-tuned from ...
PRETRAINED_SHA = "model.pretrained_sha256"  # ... and their sha256

# ---- the training run's result
MODEL_HASH = "model.sha256"  # sha256 of models/model.pt: DVC outputs and runs meet by it
MODEL_URI = "reprolab.model_uri"  # the logged model's models:/m-... URI
MODEL_FILES = "model.files_sha256"  # {file of the logged model: sha256}, JSON; also on versions
# the epoch whose weights the model holds (the best val/accuracy under early stopping, else the
# last). Runs before this name hold it as "best_epoch", read by nothing: they keep it as written.
KEPT_EPOCH = "model.kept_epoch"

# ---- tuning runs
STUDY = "optuna.study"
TRIAL = "optuna.trial"
WORKER = "optuna.worker"
TRIAL_STATE = "optuna.state"

# ---- registry: a version's own tags (beside its lineage)
TRAINING_RUN = "training_run_id"
INPUT_SHAPE = "model.input_shape"  # C x H x W, e.g. "1x8x8"
PROMOTIONS = "reprolab.promotions"  # promotions by hand: "AFTER@UTC-TIME ..."

# ---- registry: the registered model's tags (one gate, one dataset, one input shape)
GATE_METRIC = "reprolab.gate.metric"
GATE_DELTA = "reprolab.gate.min_delta"
GATE_FLOOR = "reprolab.gate.min_value"  # "none", or the floor no champion may be below
GATE_SIGNIFICANCE = "reprolab.gate.require_significance"  # "true" or "false"
MODEL_DATASET = "reprolab.dataset"
MODEL_SHAPE = "reprolab.input_shape"

# ---- MLflow's own names that reprolab sets
PARENT_RUN = "mlflow.parentRunId"
RUN_NAME = "mlflow.runName"
NOTE = "mlflow.note.content"  # the run's description, shown at the top of its page
SOURCE_NAME = "mlflow.source.name"
SOURCE_TYPE = "mlflow.source.type"
SOURCE_GIT_COMMIT = "mlflow.source.git.commit"
EXPERIMENT_KIND = "mlflow.experimentKind"


def test_metric(metric: str) -> str:
    """A test metric's name on runs and versions: `test/<metric>`."""
    return f"test/{metric}"


def rescored(test: str, metric: str) -> str:
    """On a version: its `metric` re-scored on another version's test split (`test`, that split's
    sha256): `rescored/<first 16 of it>/<metric>`."""
    return f"rescored/{test.removeprefix('manifest:')[:16]}/{metric}"


def paired(champion: str, test: str, what: str) -> str:
    """On a version: its paired comparison with the champion `champion` on its own test split,
    image by image (`what`: difference, low, high of the 95% bootstrap interval)."""
    return f"paired/v{champion}/{test.removeprefix('manifest:')[:16]}/{what}"
