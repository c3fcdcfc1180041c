"""tune stage: an Optuna study over lr and optimizer; one MLflow parent run, a child per trial.

The study lives in its own storage (a journal file by default, any SQLAlchemy URL via
`tune.storage`), never in the MLflow database and never inside a DVC output, so it survives
reruns: `tune.n_trials` counts finished trials across restarts, and a finished study adds none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from reprolab.config import Config
from reprolab.io import write_json, write_yaml

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"
OBJECTIVE = "val/accuracy"
# train knobs that trials do not use or that do not change their results
NOT_IN_TRIALS = {"optimizer", "lr", "epochs", "use_tuned", "device", "compile"}


def study_name(cfg: Config, meta: dict[str, Any]) -> str:
    """The configured name plus a fingerprint of what makes trials comparable.

    A changed dataset, split, model or search space starts a new study instead of mixing in.
    """
    identity = {
        "data": meta["manifest_sha256"],
        "split": cfg.data.model_dump(mode="json"),
        "seed": cfg.seed,
        "model": cfg.model.model_dump(mode="json"),
        "search": cfg.tune.model_dump(
            mode="json",
            exclude={"study", "n_trials", "timeout_s", "storage", "workers", "heartbeat_s"},
        ),
        "train": cfg.train.model_dump(mode="json", exclude=NOT_IN_TRIALS),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{cfg.tune.study}-{digest[:10]}"


def database_url(url: str) -> str:
    """SQLAlchemy's plain `mysql://` and `mariadb://` mean the mysqlclient driver, which needs
    C headers to build; the PyMySQL driver installed with reprolab serves them instead."""
    for scheme in ("mysql", "mariadb"):
        if url.startswith(f"{scheme}://"):
            return f"{scheme}+pymysql://" + url.removeprefix(f"{scheme}://")
    return url


def open_storage(cfg: Config) -> Any:
    """The journal file by default; a database from tune.storage with heartbeats, so that a
    killed worker's trial is failed (and retried once) instead of staying RUNNING forever."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    # heartbeats, fail_stale_trials and the matplotlib plots are marked experimental; Optuna's
    # own log lines follow this command's level (-q: warnings only)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(max(logging.getLogger().getEffectiveLevel(), logging.INFO))
    if cfg.tune.storage:
        return optuna.storages.RDBStorage(
            database_url(cfg.tune.storage),
            heartbeat_interval=cfg.tune.heartbeat_s,
            grace_period=3 * cfg.tune.heartbeat_s,
            heartbeat_stale_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1),
        )
    cfg.optuna_journal.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(cfg.optuna_journal)))


def make_sampler(cfg: Config, seed: int) -> Any:
    import numpy as np
    import optuna

    t = cfg.tune
    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if t.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    grid: dict[str, list[Any]] = {
        "lr": np.geomspace(t.lr_low, t.lr_high, t.grid_points).tolist(),
        "optimizer": list(t.optimizers),
    }
    if t.weight_decay:
        grid["weight_decay"] = np.geomspace(*t.weight_decay, t.grid_points).tolist()
    if t.momentum:
        grid["momentum"] = np.linspace(*t.momentum, t.grid_points).tolist()
    if t.batch_sizes:
        grid["batch_size"] = list(t.batch_sizes)
    return optuna.samplers.GridSampler(grid, seed=seed)


def make_pruner(cfg: Config) -> Any:
    import optuna

    if cfg.tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if cfg.tune.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=4)
    if cfg.tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=1, max_resource=cfg.tune.epochs, reduction_factor=3
        )
    return optuna.pruners.NopPruner()


def suggest(trial: Any, cfg: Config) -> dict[str, Any]:
    """The trial's point in the search space: lr and optimizer, plus the optional dimensions."""
    t = cfg.tune
    params = {
        "lr": trial.suggest_float("lr", t.lr_low, t.lr_high, log=True),
        "optimizer": trial.suggest_categorical("optimizer", list(t.optimizers)),
    }
    if t.weight_decay:
        params["weight_decay"] = trial.suggest_float("weight_decay", *t.weight_decay, log=True)
    if t.momentum:
        params["momentum"] = trial.suggest_float("momentum", *t.momentum)
    if t.batch_sizes:
        params["batch_size"] = trial.suggest_categorical("batch_size", list(t.batch_sizes))
    return params


def log_study_plots(study: Any) -> None:
    """Optimisation history, parameter importances and parallel coordinates on the parent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    from reprolab import tracking

    for name, draw in (("optimization_history", plots.plot_optimization_history),
                       ("param_importances", plots.plot_param_importances),
                       ("parallel_coordinate", plots.plot_parallel_coordinate)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # small studies: "importances will be equal"
                ax = draw(study)
        except (ValueError, RuntimeError) as exc:  # e.g. importances need 2+ complete trials
            log.info("tune: no %s plot: %s", name, exc)
            continue
        figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        figure.set_size_inches(8, 5)
        figure.tight_layout()
        tracking.log_figure(figure, f"plots/{name}.png")
        plt.close(figure)


class SurplusTrial(Exception):
    """A trial started after the budget was already taken by trials ahead of it."""


FINISHED = ("COMPLETE", "PRUNED")


def _states(*names: str) -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return tuple(TrialState[name] for name in names)


def finished_trials(study: Any) -> int:
    return len(study.get_trials(deepcopy=False, states=_states(*FINISHED)))


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_local_trials(study: Any, storage: Any) -> int:
    """The journal has no heartbeats: a RUNNING trial whose worker process on this machine is
    gone is marked FAIL when the study resumes (its budget slot goes to a new trial)."""
    from optuna.trial import TrialState

    me, failed = socket.gethostname(), 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get("worker", "")).rpartition(":")
        if host == me and pid.isdigit() and not _alive(int(pid)):
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            log.warning("tune: trial %d of a dead worker (pid %s) marked FAIL", trial.number, pid)
            failed += 1
    return failed


def open_study(cfg: Config, meta: dict[str, Any], worker_index: int) -> tuple[Any, Any]:
    import optuna

    storage = open_storage(cfg)
    study = optuna.create_study(
        study_name=study_name(cfg, meta), storage=storage, direction="maximize",
        pruner=make_pruner(cfg), load_if_exists=True,
    )
    # A seed of its own for each worker and for each resumption, so that neither two workers
    # nor a rerun repeat the points already proposed; a fresh study's worker 0 uses `seed`.
    existing = len(study.get_trials(deepcopy=False))
    seed = (cfg.seed + 7919 * worker_index + 104729 * existing) % 2**32
    study.sampler = make_sampler(cfg, seed)
    if not cfg.tune.storage:
        fail_dead_local_trials(study, storage)
    return study, storage


def work(cfg: Config, study: Any, meta: dict[str, Any], splits: tuple[Any, Any], device: Any,
         parent_run_id: str | None, progress: bool = False) -> None:
    """Run trials of `study` (from open_study) until it has tune.n_trials finished ones
    (complete + pruned), counted across every worker and every earlier invocation, or until
    tune.timeout_s."""
    import optuna

    from reprolab import tracking
    from reprolab.engine import fit, seed_everything
    from reprolab.errors import TrainingDiverged
    from reprolab.models import build
    from reprolab.train import hyper_for, short_lr, spec_for

    budget = cfg.tune.n_trials
    spec = spec_for(cfg, meta)
    train_split, val_split = splits
    ahead_states = _states(*FINISHED, "RUNNING", "WAITING")

    def objective(trial: optuna.Trial) -> float:
        # Trial numbers are handed out by the storage, once each: a trial with `budget` live
        # or finished trials ahead of it is surplus, whichever worker asked for it.
        ahead = sum(1 for t in study.get_trials(deepcopy=False, states=ahead_states)
                    if t.number < trial.number)
        if ahead >= budget:
            trial.set_user_attr("reprolab.surplus", True)
            raise SurplusTrial
        trial.set_user_attr("worker", _worker_id())
        params = suggest(trial, cfg)
        seed_everything(cfg.seed)
        model = build(spec).to(device)
        hyper = hyper_for(cfg, params, cfg.tune.epochs, device)
        pruned = False
        run_name = f"trial-{trial.number}-{params['optimizer']}-lr{short_lr(params['lr'])}"
        tags = {"optuna.trial": str(trial.number), "optuna.worker": _worker_id()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        try:
            with tracking.start_run(run_name, tags, nested=parent_run_id is None):
                tracking.log_params({**params, "epochs": cfg.tune.epochs})

                def on_epoch(row: dict[str, float]) -> None:
                    trial.set_user_attr("epochs", row["epoch"])
                    tracking.log_metrics(
                        {"val/accuracy": row["val/accuracy"], "val/loss": row["val/loss"],
                         "train/loss": row["train/loss"]},
                        row["epoch"],
                    )
                    trial.report(row["val/accuracy"], row["epoch"])
                    if trial.should_prune():
                        raise optuna.TrialPruned()

                try:
                    result = fit(model, train_split, val_split, hyper, on_epoch=on_epoch)
                except optuna.TrialPruned:
                    pruned = True
                    tracking.set_tags({"optuna.state": "PRUNED"})
                else:
                    tracking.set_tags({"optuna.state": "COMPLETE"})
        except TrainingDiverged as exc:
            # The child run ended FAILED; a NaN objective makes Optuna fail the trial too.
            log.warning("trial %d: %s", trial.number, exc)
            return float("nan")
        if pruned:
            raise optuna.TrialPruned()
        return result.last[OBJECTIVE]

    from tqdm.auto import tqdm

    deadline = time.monotonic() + cfg.tune.timeout_s if cfg.tune.timeout_s else None
    running_states = _states("RUNNING")
    bar = tqdm(total=budget, desc="tune", unit="trial",
               disable=not (progress and sys.stderr.isatty()))
    while True:
        # database storages: fail (and retry) trials whose worker stopped sending heartbeats
        optuna.storages.fail_stale_trials(study)
        finished = finished_trials(study)
        bar.update(finished - bar.n)
        running = len(study.get_trials(deepcopy=False, states=running_states))
        if finished + running >= budget:
            break  # done, or the rest is being run by other workers
        if deadline is not None and time.monotonic() >= deadline:
            log.info("tune: tune.timeout_s reached; no new trials")
            break
        if isinstance(study.sampler, optuna.samplers.GridSampler) and \
                study.sampler.is_exhausted(study):
            log.info("tune: every point of the grid has been tried")
            break
        study.optimize(objective, n_trials=1, catch=(SurplusTrial,))
    bar.close()


def await_running_trials(cfg: Config, study: Any, storage: Any, poll_s: float = 1.0) -> None:
    """The outputs are written from a settled study: wait for trials other workers (on other
    machines) are still running. Database storages fail those whose heartbeat stops; on the
    journal, trials of dead workers on this machine are failed."""
    import optuna

    running_states, said = _states("RUNNING"), 0.0
    while True:
        optuna.storages.fail_stale_trials(study)
        if not cfg.tune.storage:
            fail_dead_local_trials(study, storage)
        running = study.get_trials(deepcopy=False, states=running_states)
        if not running:
            return
        if time.monotonic() - said > 60:
            said = time.monotonic()
            log.info("tune: waiting for %d running trial(s) of other workers: %s", len(running),
                     ", ".join(f"{t.number} ({t.user_attrs.get('worker', '?')})"
                               for t in running))
        time.sleep(poll_s)


def share_machine(device: Any, index: int, workers: int) -> Any:
    """Local workers split the machine: on the CPU each gets its share of the cores (more
    threads than cores slows every worker down); on CUDA, worker i takes GPU i mod count
    unless train.device names one."""
    import torch

    if workers > 1 and device.type == "cpu":
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))
    if workers > 1 and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", index % torch.cuda.device_count())
    return device


def await_workers(processes: list[Any], ready: Any, patience_s: float = 300) -> None:
    """Wait until every spawned worker has its data loaded, so that all start trials together
    (one that dies or stays silent for patience_s is not waited for)."""
    import queue

    waiting, deadline = len(processes), time.monotonic() + patience_s
    while waiting and time.monotonic() < deadline:
        try:
            ready.get(timeout=0.5)
            waiting -= 1
        except queue.Empty:
            if any(p.exitcode is not None for p in processes):
                return
    if waiting:
        log.warning("tune: %d worker(s) not ready after %.0f s; starting without", waiting,
                    patience_s)


def _spawned_worker(params: dict[str, Any], base_dir: str, index: int, parent: str,
                    ready: Any, level: int) -> None:
    """Entry point of a local worker process (multiprocessing, spawn)."""
    logging.basicConfig(level=level,
                        format=f"%(asctime)s worker {index} %(levelname)s %(name)s: %(message)s")
    from reprolab.config import Config

    cfg = Config.model_validate(params)
    cfg._base_dir = Path(base_dir)
    run(cfg, worker_index=index, parent_run_id=parent, ready=ready)


def run(cfg: Config, progress: bool = False, worker_index: int = 0,
        parent_run_id: str | None = None, join: bool = False,
        ready: Any = None) -> dict[str, Any]:
    """The tune stage: with tune.workers > 1 it starts that many workers on this machine (this
    process is worker 0) and writes the outputs when all are done. `parent_run_id` marks a
    spawned worker (no outputs); `join` an extra worker from anywhere (`--worker`)."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(cfg, progress, worker_index, parent_run_id, join, ready)
    finally:
        torch.set_num_threads(threads)  # share_machine's split ends with the stage


def _run(cfg: Config, progress: bool, worker_index: int, parent_run_id: str | None,
         join: bool, ready: Any) -> dict[str, Any]:
    import multiprocessing

    from optuna.trial import TrialState

    from reprolab import tracking
    from reprolab.data import load_training_data
    from reprolab.engine import select_device
    from reprolab.errors import ReprolabError

    local_workers = cfg.tune.workers
    if join and parent_run_id is None:
        # a worker joining from elsewhere: seeds of its own, whatever its machine and start
        worker_index = 1000 + int(hashlib.sha256(_worker_id().encode()).hexdigest()[:6], 16)
    device = share_machine(select_device(cfg.train.device), worker_index, local_workers)
    meta, train_split, val_split = load_training_data(cfg.processed_dir, device)
    name = study_name(cfg, meta)
    tracking.configure(cfg)
    splits = (train_split, val_split)
    if parent_run_id is not None:  # a spawned worker: trials only
        study, _ = open_study(cfg, meta, worker_index)
        ready.put(worker_index)
        work(cfg, study, meta, splits, device, parent_run_id)
        return {}

    started = time.perf_counter()
    study, storage = open_study(cfg, meta, worker_index)  # before any worker races to
    if finished_trials(study) >= cfg.tune.n_trials:
        local_workers = 1  # nothing left to run: start no worker process
    with tracking.start_run(f"tune-{name}" + ("-worker" if join else ""),
                            {"optuna.study": name, "optuna.worker": _worker_id()}) as parent:
        tracking.log_params({**cfg.flat(), "tune.study_name": name})
        context = multiprocessing.get_context("spawn")
        ready = context.Queue()
        others = [context.Process(target=_spawned_worker,
                                  args=(cfg.as_dict(), str(cfg.base_dir), i, parent, ready,
                                        logging.getLogger().getEffectiveLevel()))
                  for i in range(worker_index + 1, worker_index + local_workers)]
        for process in others:
            process.start()
        try:
            await_workers(others, ready)
            work(cfg, study, meta, splits, device, None, progress)
        finally:
            for process in others:
                process.join()
        if any(process.exitcode for process in others):
            codes = [process.exitcode for process in others]
            raise ReprolabError(f"tune: a worker process failed (exit codes {codes})")
        if not join:
            await_running_trials(cfg, study, storage)
        trials = study.get_trials(deepcopy=False)
        if not any(t.state == TrialState.COMPLETE for t in trials):
            raise ReprolabError(
                f"tune: no trial of study {name} completed ({len(trials)} pruned or failed); "
                "widen tune.lr_low..tune.lr_high or raise tune.n_trials"
            )
        best = study.best_trial
        tracking.log_metrics({f"best/{OBJECTIVE}": best.value})
        tracking.log_params({f"best.{k}": v for k, v in best.params.items()})
        log_study_plots(study)
    states = [t.state for t in trials]
    summary = {
        "study": name,
        "trials_complete": states.count(TrialState.COMPLETE),
        "trials_pruned": states.count(TrialState.PRUNED),
        "trials_failed": sum(1 for t in trials if t.state == TrialState.FAIL
                             and not t.user_attrs.get("reprolab.surplus")),
        "best_value": best.value,
        "best_trial": best.number,
        "objective": OBJECTIVE,
        "epochs_spent": sum(int(t.user_attrs.get("epochs", 0)) for t in trials),
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    if not join:  # an extra worker from elsewhere writes no DVC outputs
        write_yaml(cfg.best_params_file, dict(best.params))
        write_json(cfg.report_dir("tune") / SUMMARY_FILE, summary)
    return summary


def main(cfg: Config, args: Any) -> None:
    summary = run(cfg, progress=not args.quiet, join=args.worker)
    print(
        f"tune: study {summary['study']}  best {OBJECTIVE} {summary['best_value']:.4f}  "
        f"({summary['trials_complete']} complete, {summary['trials_pruned']} pruned)"
    )
