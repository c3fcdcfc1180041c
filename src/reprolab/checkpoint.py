"""Crash-safe resume of `reprolab train`: the checkpoint of the complete training state, when
it may be resumed, and the MLflow run that never holds an epoch twice.

The complete training state goes to an atomic checkpoint outside the DVC outputs every
train.checkpoint_every_s seconds (after the epoch that ends then), at the end and on SIGTERM or
Ctrl-C; `reprolab train` after a crash resumes from it when the config matches, continues the
same MLflow run, and ends with the weights an uninterrupted run would have had.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from reprolab.config import Config
from reprolab.engine import FitResult, Hyper, fit
from reprolab.files import atomic_path

log = logging.getLogger(__name__)

# Part of a checkpoint's identity: bumped when what a checkpoint holds changes.
CHECKPOINT_FORMAT = 2


def checkpoint_identity(cfg: Config, hyper: Hyper, meta: dict[str, Any], ranks: int,
                        spec: dict[str, Any]) -> str:
    """What must match for a checkpoint to be resumed: the resolved config (tuned values
    included), the engine's settings on this device, the data, the model's spec (your network's
    code and the pretrained weights by their sha256), the number of ranks (they sum in another
    order) and the checkpoint's format."""
    tree = cfg.as_dict()
    # knobs that change no result keep a checkpoint good (the ranks are counted apart below)
    tree["train"] = {k: v for k, v in tree["train"].items() if k not in cfg.train.NO_RESULT}
    config = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    model = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    blob = f"{config}|{hyper}|{meta['manifest_sha256']}|{model}|{ranks}|{CHECKPOINT_FORMAT}"
    return hashlib.sha256(blob.encode()).hexdigest()


def read_checkpoint(path: Path) -> dict[str, Any] | None:
    """The resume checkpoint, or None. One that cannot be read (truncated by a full disk,
    flipped bytes) is moved aside with a warning and training starts over: never a traceback,
    never a checkpoint that blocks `train` until someone deletes it."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        if not isinstance(state, dict) or "epoch" not in state:
            raise ValueError("not a reprolab checkpoint")
        return state
    except Exception as exc:  # noqa: BLE001 - zip, unpickling and tensor errors all mean "corrupt"
        aside = next(path.with_name(f"{path.name}.corrupt-{n}") for n in itertools.count(1)
                     if not path.with_name(f"{path.name}.corrupt-{n}").exists())
        path.replace(aside)
        log.warning("checkpoint %s is unreadable (%s); moved to %s, training from the start",
                    path, type(exc).__name__, aside.name)
        return None


def resume_state(path: Path, state: dict[str, Any] | None, identity: str) -> dict[str, Any] | None:
    """-> the checkpoint to resume from, or None. MLflow must be configured: the run of a
    checkpoint discarded for another config can never be resumed, so it ends KILLED."""
    if state is None:
        return None
    if state.get("identity") != identity:
        log.info("ignoring checkpoint %s: it was written by a different config", path)
        from reprolab import tracking  # rank 0 alone imports MLflow

        if state.get("run_id") and tracking.end_run_by_id(state["run_id"], "KILLED"):
            log.info("ended its run %s KILLED", state["run_id"])
        return None
    log.info("found checkpoint %s after epoch %d of run %s", path, state["epoch"],
             state["run_id"])
    return state


# Each epoch's metrics reach MLflow exactly once across kills and resumes. MLflow appends a
# second point when a step is logged again and cannot remove one, so nothing may be logged twice.
# An epoch is logged only after a checkpoint that holds it is on disk (in one batch with the other
# epochs since the last checkpoint): the run then never holds an epoch the checkpoint lacks, and
# the epochs a resume trains again were never logged. The one gap, a kill after a checkpoint and
# before (or during) its log, is filled on resume from the checkpoint's history for the steps
# the run lacks, so MLflow holds the values of history.csv.


def epoch_metrics(row: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in row.items() if k != "epoch"}


def log_missing_epochs(run_id: str, history: list[dict[str, float]]) -> None:
    """Log the checkpoint's metrics (each epoch's, each metric's) that the run lacks."""
    if not history:
        return
    from reprolab import tracking  # rank 0 alone imports MLflow

    have = tracking.logged_steps(run_id, list(epoch_metrics(history[0])))
    missing = [{"epoch": row["epoch"], **{k: v for k, v in epoch_metrics(row).items()
                                          if row["epoch"] not in have[k]}} for row in history]
    tracking.log_epochs([row for row in missing if len(row) > 1])


def frozen(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of fit()'s state that the next epoch cannot change: tensors cloned, containers
    rebuilt. The history's rows are shared: fit never changes a row once it is in the history.
    (copy.deepcopy of it all, the growing history included, took 3 ms an epoch by the end of 90
    digits epochs: most of what tracking cost per epoch.)"""
    def copied(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {key: copied(item) for key, item in value.items()}
        if type(value) in (list, tuple):  # subclasses (named tuples) go to deepcopy
            return type(value)(copied(item) for item in value)
        if value is None or isinstance(value, int | float | str | bool):
            return value
        return copy.deepcopy(value)

    return {**copied({key: value for key, value in state.items() if key != "history"}),
            "history": list(state.get("history", []))}


class Checkpointer:
    """Rank 0's `save_state` for fit(). An epoch's state goes to the checkpoint file when
    `every_s` seconds have passed since the last write, and always when `flush` is called: at
    the end, and on the way out of a failure or a signal. In between, a copy of the last epoch's
    state waits in memory. After each write, the epochs of the written history that MLflow lacks
    go to it in one call: what it holds never runs ahead of the checkpoint, whenever a signal
    lands."""

    def __init__(self, path: Path, every_s: float, stamp: dict[str, Any], logged: int = 0):
        self.path, self.every_s, self.stamp = path, every_s, stamp  # stamp: identity, run id
        self.logged = logged  # MLflow holds the epochs up to this one
        self.written = time.monotonic()
        self.waiting: dict[str, Any] | None = None  # a state not written yet

    def __call__(self, state: dict[str, Any]) -> None:
        if time.monotonic() - self.written >= self.every_s:
            self.write(state)
        else:  # its tensors are the live ones, which the next epoch changes
            self.waiting = frozen(state)

    def write(self, state: dict[str, Any], log_epochs: bool = True) -> None:
        with atomic_path(self.path) as tmp:
            torch.save({**state, **self.stamp}, tmp)
        self.written, self.waiting = time.monotonic(), None
        if log_epochs:  # after the checkpoint that holds them: see above
            self.log(state.get("history", []))

    def log(self, history: list[dict[str, float]], tags: dict[str, str] | None = None,
            failing: bool = False) -> None:
        """The epochs of `history` that MLflow lacks (the checkpoint on disk holds them all), and
        `tags`, in one call. While another error ends training, a failure here (the store, which
        that error most likely names already) is only logged at INFO; the checkpoint holds the
        epochs and the rerun logs them (log_missing_epochs)."""
        from reprolab import tracking  # rank 0 alone imports MLflow

        try:
            tracking.log_epochs([row for row in history if row["epoch"] > self.logged], tags)
        except Exception as exc:
            if not failing:
                raise
            log.info("could not log the last epochs: %s", str(exc).splitlines()[0])
            return
        self.logged = max([self.logged, *(row["epoch"] for row in history)])

    def flush(self, failing: bool = False, log_epochs: bool = True) -> None:
        """Write the waiting state. While another error ends training, a failure here (the
        disk, the store) is logged and that error stays the one reported. `log_epochs=False`:
        its epochs wait for the caller's `log`."""
        try:
            if self.waiting is not None:
                self.write(self.waiting, log_epochs)
        except Exception as exc:
            if not failing:
                raise
            log.warning("could not write the last checkpoint: %s", str(exc).splitlines()[0])


def fit_saving(model: torch.nn.Module, train: Any, val: Any, hyper: Hyper,
               resume: dict[str, Any] | None, saver: Checkpointer | None, progress: bool
               ) -> FitResult:
    """fit(), resumed from the checkpoint's state if it holds one; on rank 0 with the
    checkpoints: one at the start that names the run (so that a kill before the first timed
    one still resumes the same run), the timed ones, and one at the end or on the way out. The
    epochs of the one at the end go to MLflow with publish's tags, after the model: MLflow's
    log_model reads back every metric the run holds to link some to the model."""
    state = resume if resume and resume["epoch"] else None
    if saver is None:
        return fit(model, train, val, hyper, state=state, progress=progress)
    if resume is None or resume["run_id"] != saver.stamp["run_id"]:
        saver.write(state or {"epoch": 0})
    try:
        result = fit(model, train, val, hyper, state=state, save_state=saver, progress=progress)
    except BaseException:
        saver.flush(failing=True)
        raise
    saver.flush(log_epochs=False)
    return result
