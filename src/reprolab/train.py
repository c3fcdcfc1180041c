"""train stage: fit the configured model, track it in MLflow, write models/ and the history.

The complete training state goes to an atomic checkpoint outside the DVC outputs every
train.checkpoint_every_s seconds (after the epoch that ends then), at the end and on SIGTERM or
Ctrl-C; `reprolab train` after a crash resumes from it when the config matches, continues the
same MLflow run, and ends with the weights an uninterrupted run would have had. One trainer at a
time: a lock file beside the checkpoint refuses a second one while the first runs.

Under torchrun every rank runs this module: rank 0 alone talks to MLflow and writes the
checkpoint and the outputs. With train.processes > 1, `reprolab train` itself starts the ranks
with torchrun's launcher (see `launch`).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import itertools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from reprolab import tracking
from reprolab.config import Config, with_tuned
from reprolab.data import load_training_data
from reprolab.engine import (
    FitResult,
    Hyper,
    fit,
    from_rank0,
    same_everywhere,
    seed_everything,
    select_device,
    start_distributed,
    world,
)
from reprolab.errors import ConfigError, ReprolabError
from reprolab.io import (
    LockHeld,
    atomic_dir,
    atomic_path,
    check_replaceable,
    exclusive_lock,
    exit_with_parent,
    interrupt_on_sigterm,
    sha256_file,
    write_text,
    write_yaml,
)
from reprolab.models import build, count_parameters, save_checkpoint, with_probabilities
from reprolab.recipe import hyper_for, run_name, spec_for

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
# Timings vary run to run: MLflow has them; history.csv, a DVC output, does not.
VOLATILE = ("train/epoch_seconds", "train/images_per_second")
# The `reprolab train` that launched torchrun's ranks (its pid) holds the train lock for them.
LAUNCHER_ENV = "REPROLAB_TRAIN_LAUNCHER"
# Part of a checkpoint's identity: bumped when what a checkpoint holds changes.
CHECKPOINT_FORMAT = 2
# Knobs that change no result: a checkpoint stays good across them (the ranks are counted apart).
NOT_IN_IDENTITY = ("checkpoint_every_s", "processes")


class TrainerBusy(ReprolabError):
    """Another `reprolab train` is training the same project. Exit code 2."""

    exit_code = 2


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str
    hyper: Hyper
    fit: FitResult
    model: torch.nn.Module

    @property
    def history(self) -> list[dict[str, float]]:
        return self.fit.history


def history_csv(history: list[dict[str, float]]) -> str:
    out = io.StringIO()
    fields = [k for k in history[0] if k not in VOLATILE]
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    return out.getvalue()


def checkpoint_identity(cfg: Config, hyper: Hyper, meta: dict[str, Any], ranks: int) -> str:
    """What must match for a checkpoint to be resumed: the resolved config (tuned values
    included), the engine's settings on this device, the data, the number of ranks (they sum
    in another order) and the checkpoint's format."""
    tree = cfg.as_dict()
    tree["train"] = {k: v for k, v in tree["train"].items() if k not in NOT_IN_IDENTITY}
    config = json.dumps(tree, sort_keys=True, separators=(",", ":"))
    blob = f"{config}|{hyper}|{meta['manifest_sha256']}|{ranks}|{CHECKPOINT_FORMAT}"
    return hashlib.sha256(blob.encode()).hexdigest()


def lock_file(cfg: Config) -> Path:
    """Beside the checkpoint it guards, outside the DVC outputs (DVC deletes those first)."""
    return cfg.checkpoint_file.with_suffix(".lock")


@contextlib.contextmanager
def one_trainer(path: Path) -> Iterator[None]:
    """Refuse a second trainer of the same project while one runs. After a kill -9 of
    `dvc repro` its `reprolab train` child goes on as an orphan; a second trainer would resume
    the same checkpoint into the same MLflow run and both would log every epoch.

    The ranks that a `reprolab train` launched train under its lock: it holds the lock and
    names itself in LAUNCHER_ENV."""
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(path))
        except LockHeld as held:
            if held.pid is not None and str(held.pid) == os.environ.get(LAUNCHER_ENV):
                yield  # held for this rank by the `reprolab train` that launched it
                return
            pid = held.pid or "unknown"
            raise TrainerBusy(
                f"another `reprolab train` (pid {pid}) is training this project (lock {path}); "
                f"wait for it to finish, or stop it (kill {pid}) and run train again"
            ) from None
        yield


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


def run(cfg: Config, progress: bool = False) -> TrainResult:
    """Train in this process: alone, or as one of torchrun's ranks (see `launch`)."""
    with ranks(cfg) as device:
        # rank 0 holds the lock from reading the checkpoint to deleting it
        lock = one_trainer(lock_file(cfg)) if world()[0] == 0 else contextlib.nullcontext()
        with lock:
            return train_locked(cfg, device, progress)


@contextlib.contextmanager
def ranks(cfg: Config) -> Iterator[torch.device]:
    """Under torchrun (its environment names WORLD_SIZE): this process joins the other ranks for
    the run, and stops when its launcher is gone. -> the device to train on."""
    device = select_device(cfg.train.device)
    if "WORLD_SIZE" not in os.environ:
        yield device
        return
    exit_with_parent()
    device = start_distributed(device)
    try:
        yield device
    except BaseException as exc:
        if getattr(exc, "all_ranks", False):
            # every rank raised it at the same point (a diverged loss, rank 0's error): rank 0
            # ends its run and writes its checkpoint before the others exit and the launcher
            # stops whoever is left
            with contextlib.suppress(Exception):
                dist.barrier()
            raise
        # a rank that died leaves the others in a collective, which gloo ends with a plain
        # RuntimeError ("Connection reset by peer"), NCCL with a DistBackendError
        if isinstance(exc, dist.DistError) or (isinstance(exc, RuntimeError) and
                                               "gloo" in str(exc)):
            raise ReprolabError(
                "another rank stopped answering (it failed or was killed; its own error says "
                f"why): {str(exc).strip().splitlines()[0][:300]}"
            ) from None
        raise
    finally:
        dist.destroy_process_group()


def train_locked(cfg: Config, device: torch.device, progress: bool) -> TrainResult:
    rank, size = world()
    # before any work, not after it; rank 0 writes the outputs
    from_rank0(lambda: check_replaceable(cfg.models_dir, model_files(cfg)))
    cfg = with_tuned(cfg)  # the config that trains, written to models/config.yaml
    seed_everything(cfg.seed, cfg.train.deterministic)
    meta, train_split, val_split = load_training_data(cfg.processed_dir, device)
    spec = spec_for(cfg, meta)
    model = build(spec).to(device)
    hyper = hyper_for(cfg, cfg.train.epochs, device, meta["shape"])
    identity = checkpoint_identity(cfg, hyper, meta, size)
    same_everywhere(identity, "config, data or number of ranks")
    resume = from_rank0(lambda: find_resume(cfg, identity))
    log.info("train: %s on %s (%s%s), %s lr=%.3g (from %s)", cfg.model.name, device,
             hyper.precision, f", {size} ranks" if size > 1 else "", cfg.train.optimizer,
             cfg.train.lr, "tune" if cfg.train.use_tuned else "params")
    with recorded(cfg, meta, model, (train_split, val_split), device, hyper, resume) as run_id:
        run_id = from_rank0(lambda: run_id)
        saver = None
        if rank == 0:  # the run holds the resumed epochs (log_missing_epochs)
            saver = Checkpointer(cfg.checkpoint_file, cfg.train.checkpoint_every_s,
                                 {"identity": identity, "run_id": run_id},
                                 logged=resume["epoch"] if resume else 0)
        result = fit_saving(model, train_split, val_split, hyper, resume, saver, progress)
        model = model.cpu().eval()
        model_uri = ""
        if rank == 0:
            example = val_split.x[:4].cpu().numpy().astype(np.float32)
            try:
                model_uri = publish(cfg, spec, model, result, example, meta["classes"], run_id,
                                    reuse=resume is not None and resume["run_id"] == run_id,
                                    saver=saver)
            except BaseException:  # the run ends FAILED or KILLED with every epoch in it
                saver.log(result.history, failing=True)
                raise
    if rank == 0:
        cfg.checkpoint_file.unlink(missing_ok=True)  # finished: models/ holds the result
    return TrainResult(run_id, model_uri, hyper, result, model)


def find_resume(cfg: Config, identity: str) -> dict[str, Any] | None:
    """Rank 0: the checkpoint to resume (MLflow configured), None to start afresh."""
    tracking.configure(cfg)
    return resume_state(cfg.checkpoint_file, read_checkpoint(cfg.checkpoint_file), identity)


@contextlib.contextmanager
def recorded(cfg: Config, meta: dict[str, Any], model: torch.nn.Module, splits: tuple[Any, Any],
             device: torch.device, hyper: Hyper, resume: dict[str, Any] | None
             ) -> Iterator[str | None]:
    """Rank 0: the MLflow run of this training (the checkpoint's, when the store has it), with
    its params, tags and datasets. The other ranks log nothing (-> None)."""
    if world()[0] != 0:
        yield None
        return
    resume_run = resume["run_id"] if resume and tracking.run_exists(resume["run_id"]) else None
    if resume and not resume_run:
        log.info("run %s is not in this MLflow store; starting a new run", resume["run_id"])
    size, backend = world()[1], dist.get_backend() if dist.is_initialized() else "none"
    ranks_tags = {"distributed.world_size": str(size), "distributed.backend": backend}
    tags = {**tracking.lineage_tags(cfg, meta), **tracking.source_tags("train"),
            "device": str(device), "precision": hyper.precision, **ranks_tags}
    with tracking.start_run(run_name(cfg.model.name, cfg.train.optimizer, cfg.train.lr), tags,
                            run_id=resume_run) as run_id:
        if resume_run is None:
            tracking.log_params({**cfg.flat(), **ranks_tags,
                                 "train.hparams_source": "tune" if cfg.train.use_tuned else
                                 "params", "model.parameters": count_parameters(model)})
            tracking.log_datasets([
                (data.x.cpu().numpy(), data.y.cpu().numpy(), f"{meta['dataset']}-{split}",
                 cfg.paths.processed, meta["split_sha256"][split], context)
                for (split, context), data in zip((("train", "training"), ("val", "validation")),
                                                  splits, strict=True)])
            if (cfg.base_dir / "dvc.lock").is_file():  # the pipeline state the run belongs to
                tracking.log_artifact(cfg.base_dir / "dvc.lock")
        if resume:  # also into a new run when the checkpoint's run is not in this store
            log_missing_epochs(run_id, resume.get("history", []))
        yield run_id


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


def publish(cfg: Config, spec: dict[str, Any], model: torch.nn.Module, result: FitResult,
            example: np.ndarray, classes: list[str], run_id: str, reuse: bool,
            saver: Checkpointer) -> str:
    """Rank 0, after training: the logged model (the plain module, probabilities out), the DVC
    outputs, and the tags and artifacts that tie them to the run, with the last epochs'
    metrics; -> the model's URI."""
    # A rerun after a kill between logging the model and finishing finds it logged already.
    model_uri = tracking.logged_model_uri(run_id) if reuse else None
    if model_uri is None:
        model_uri = tracking.log_model(with_probabilities(model), example, classes)
    model_hash = write_outputs(cfg, spec, model, result.history)
    # the DVC outputs name no run: evaluate and register find it by the model's content
    saver.log(result.history, tags={"best_epoch": str(result.best_epoch),
                                    tracking.MODEL_HASH_TAG: model_hash,
                                    tracking.MODEL_URI_TAG: model_uri})
    for path in (cfg.history_file, cfg.models_dir / CONFIG_FILE):
        tracking.log_artifact(path)
    return model_uri


def model_files(cfg: Config) -> tuple[str, ...]:
    """What train writes into models/ ("run.json": what it held before outputs named no run)."""
    return (cfg.model_file.name, CONFIG_FILE, "run.json")


def write_outputs(
    cfg: Config, spec: dict[str, Any], model: torch.nn.Module, history: list[dict[str, float]],
) -> str:
    """models/ (the model and the resolved config) and the history; -> the model's sha256.

    All pure functions of code, params and data: no run id, path, time or timing inside.
    """
    with atomic_dir(cfg.models_dir, model_files(cfg)) as tmp:
        save_checkpoint(tmp / cfg.model_file.name, spec, model)
        model_hash = sha256_file(tmp / cfg.model_file.name)
        write_yaml(tmp / CONFIG_FILE, cfg.as_dict())
    write_text(cfg.history_file, history_csv(history))
    return model_hash


def main(cfg: Config, args: Any) -> int:
    if cfg.train.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device = {cfg.train.device!r}: CUDA is not available here")
    if cfg.train.device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("train.device = 'mps': MPS is not available here")
    # SIGTERM ends the run KILLED like Ctrl-C, with a checkpoint of the last finished epoch.
    interrupt_on_sigterm()
    if cfg.train.processes > 1 and "WORLD_SIZE" not in os.environ:  # not under torchrun yet
        return launch(cfg, args)
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():  # log lines print above the progress bar, not through it
        result = run(cfg, progress=not args.quiet)
    if os.environ.get("RANK", "0") == "0":
        last = result.history[-1]
        print(f"train: run {result.run_id}  val/accuracy {last['val/accuracy']:.4f}  "
              f"model {result.model_uri}")
    return 0


# ---- train.processes > 1: torchrun's launcher, in this process ----


def launch(cfg: Config, args: Any) -> int:
    """Start train.processes ranks on this machine with torchrun's own launcher (what
    `torchrun --standalone --nproc-per-node N -m reprolab train` runs), each one
    `python -m reprolab train` with this command's arguments. This process holds the train lock
    while they run, and they stop if it goes (kill -9 included). Rank 0 prints here; the others
    write to files beside the checkpoint, kept when a rank fails. -> the exit code."""
    # what the ranks would each refuse: one line, before any starts
    check_replaceable(cfg.models_dir, model_files(cfg))
    with_tuned(cfg)
    with one_trainer(lock_file(cfg)):
        logs = Path(tempfile.mkdtemp(prefix=".ranks-", dir=cfg.checkpoint_file.parent))
        code = _elastic_launch(cfg.train.processes, worker_args(args), logs)
    if code == 0:
        shutil.rmtree(logs, ignore_errors=True)
    return code


def worker_args(args: Any) -> list[str]:
    """This command's arguments for its ranks, the params file made absolute."""
    out = ["train", "--params", str(Path(args.params).resolve())]
    for item in args.overrides:
        out += ["-S", item]
    if args.override_list:
        out += ["--overrides", args.override_list]
    return out + (["-q"] if args.quiet else [])


def _elastic_launch(processes: int, argv: list[str], logs: Path) -> int:
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # a rendezvous on a free local port, as torchrun --standalone; no restarts: a rerun resumes
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"reprolab-{os.getpid()}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
        logs_specs=DefaultLogsSpecs(str(logs), {r: Std.ALL for r in range(1, processes)}),
    )
    # the launcher's own lines (rendezvous, worker start and stop) are not the stage's
    logging.getLogger("torch.distributed").setLevel(logging.CRITICAL)
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:
        elastic_launch(config, sys.executable)("-m", "reprolab", *argv)
    except ChildFailedError as failed:
        return _failure(failed, logs)
    except SignalException:  # Ctrl-C or SIGTERM: the ranks got it too, and stopped
        raise KeyboardInterrupt from None
    finally:
        os.environ.pop(LAUNCHER_ENV, None)
    return 0


def _failure(failed: Any, logs: Path) -> int:
    """The first rank that failed: rank 0 printed its own error line here; for another rank,
    one line with the last line of its log. -> the exit code for the stage."""
    def cause(item: tuple[int, Any]) -> tuple[int, int]:
        # killed from outside first, then a rank's own error; last a rank that the launcher
        # stopped (SIGTERM) because another had failed
        code = item[1].exitcode
        return (0 if code < 0 and code != -signal.SIGTERM else 1 if code > 0 else 2), item[0]

    rank, failure = min(failed.failures.items(), key=cause)
    code = failure.exitcode
    if rank != 0 or code < 0:
        log_file = next(logs.glob(f"*/attempt_*/{rank}/stderr.log"), None)
        lines = log_file.read_text().strip().splitlines() if log_file else []
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        last = f": {lines[-1]}" if lines and code >= 0 else ""
        where = f" (log: {log_file})" if log_file else ""
        print(f"reprolab train: error: rank {rank} failed, {why}{last}{where}; run "
              "`reprolab train` again to resume", file=sys.stderr)
    return code if code in (1, 2, 130) else 1
