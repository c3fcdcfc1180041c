"""How the trials of one Optuna study get run: the storage, the budget, the workers and their
faults. Not a stage: `tune.py` owns the space, the objective and the outputs, this module owns
the rest, and imports no stage module (local workers start a function that `tune` hands in).

The rules it keeps, whatever crashes, stalls or gets killed:
- the study ends with exactly `n_trials` finished trials (complete + pruned) across all workers
  and restarts; retried (WAITING) trials are work still to do;
- a trial whose worker is gone ends FAIL, and its MLflow run (a trial user attribute) ends too;
- failed trials are bounded, so a space where every trial fails ends instead of looping.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprolab.lifecycle import drop_interrupted_frames, pid_alive

log = logging.getLogger(__name__)

FINISHED = ("COMPLETE", "PRUNED")
# A stop (Ctrl-C, SIGTERM) of `reprolab tune` ends within STOP_S seconds, its local workers with
# it, whatever the stores do (lifecycle.bounded_stop): each worker gets half of it to end its
# trial and runs and exit, the stage's process the rest to end its own and its parent run (a
# clean stop takes a second or two). What one that runs out of time leaves, the next `reprolab
# tune` ends: a trial whose process is gone fails, its runs end KILLED (fail_lost_trials).
STOP_S = 10.0
LEFT_RUNNING = ("with writes still waiting on a store that does not answer; the trials and MLflow "
                "runs it had not ended stay RUNNING until the next `reprolab tune` fails them")
# trial user attributes
WORKER = "worker"  # host:pid of the process running the trial
RUN = "mlflow_run_id"  # the trial's MLflow run (the key Optuna's MLflow integration uses)
WORKER_RUN = "reprolab.worker_run"  # the MLflow parent run its process owns (not a spawned one)
SURPLUS = "reprolab.surplus"  # started after the budget was taken; never ran


def open_storage(url: str | None, journal: Path, heartbeat_s: int) -> Any:
    """The study's storage (`reprolab.storage`); on a database a trial whose heartbeat stopped
    is failed, its MLflow runs ended, and it is retried once (EndRunsAndRetry)."""
    from reprolab import storage

    return storage.open_storage(url, journal, heartbeat_s, EndRunsAndRetry())


def open_study(storage: Any, name: str, pruner: Any) -> Any:
    import optuna

    return optuna.create_study(study_name=name, storage=storage, direction="maximize",
                               pruner=pruner, load_if_exists=True)


def describe_study(study: Any, objective: str, attributes: dict[str, Any]) -> None:
    """Name the objective and record where the study's trials come from, for optuna-dashboard
    and `optuna` CLI users; written once, by whichever worker opens the study first."""
    if study.metric_names != [objective]:
        study.set_metric_names([objective])
    for key, value in attributes.items():
        if key not in study.user_attrs:
            study.set_user_attr(key, value)


def worker_seed(study: Any, seed: int, worker_index: int) -> int:
    """A seed of its own for each worker and for each resumption, so that neither two workers
    nor a rerun repeat the points already proposed; a fresh study's worker 0 uses `seed`."""
    existing = len(study.get_trials(deepcopy=False))
    return (seed + 7919 * worker_index + 104729 * existing) % 2**32


def grid_sampler(grid: dict[str, list[Any]], seed: int) -> Any:
    """Optuna's GridSampler, minus its study.stop() once the grid is exhausted: that works only
    inside Study.optimize, and run_trials (ask and tell) checks is_exhausted itself."""
    import optuna

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            pass

    return Grid(grid, seed=seed)


# ---- counting ----


def _states(*names: str) -> tuple[Any, ...]:
    from optuna.trial import TrialState

    return tuple(TrialState[name] for name in names)


def is_surplus(trial: Any) -> bool:
    return bool(trial.user_attrs.get(SURPLUS))


@dataclass(frozen=True)
class Count:
    finished: int  # complete + pruned
    running: int
    waiting: int  # retries of failed trials, queued for whichever worker asks next
    failed: int  # not counting surplus trials, which never ran


def count(study: Any) -> Count:
    trials = study.get_trials(deepcopy=False)
    names = [t.state.name for t in trials]
    return Count(
        finished=sum(names.count(s) for s in FINISHED),
        running=names.count("RUNNING"),
        waiting=names.count("WAITING"),
        failed=sum(1 for t in trials if t.state.name == "FAIL" and not is_surplus(t)),
    )


# ---- workers that are gone ----


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def end_runs_of(trial: Any) -> None:
    """End the MLflow runs a failed trial's worker left RUNNING: the trial's, and the parent run
    its process owned (a `--worker` or the stage's own process). A run that already ended (or
    lives in another MLflow store) is left as it is."""
    run_ids = [trial.user_attrs.get(key) for key in (RUN, WORKER_RUN)]
    if not any(run_ids):
        return
    from reprolab import tracking

    for run_id in filter(None, run_ids):
        if tracking.end_run_by_id(run_id, "KILLED"):
            log.warning("tune: MLflow run %s of failed trial %d ended KILLED", run_id,
                        trial.number)


class EndRunsAndRetry:
    """Optuna's heartbeat-stale callback: the stale trial's MLflow runs end KILLED, then the
    trial is queued once more as WAITING (Optuna's RetryHeartbeatStaleTrialCallback), without
    the attributes of the worker and runs that are gone."""

    def __call__(self, study: Any, trial: Any) -> None:
        import optuna

        log.warning("tune: trial %d (worker %s) sent no heartbeat; failed, retried once",
                    trial.number, trial.user_attrs.get(WORKER, "?"))
        end_runs_of(trial)
        trial.user_attrs = {}
        optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)(study, trial)


def fail_dead_local_trials(study: Any, storage: Any) -> int:
    """The journal has no heartbeats: a RUNNING trial whose worker process on this machine is
    gone is marked FAIL (its budget slot goes to a new trial) and its MLflow runs end KILLED."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    me, failed = socket.gethostname(), 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        host, _, pid = str(trial.user_attrs.get(WORKER, "")).rpartition(":")
        if host != me or not pid.isdigit() or pid_alive(int(pid)):
            continue
        try:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            continue  # another worker of this machine failed it first
        log.warning("tune: trial %d of a dead worker (pid %s) marked FAIL", trial.number, pid)
        end_runs_of(trial)
        failed += 1
    return failed


def fail_lost_trials(study: Any, storage: Any) -> None:
    """Fail the trials whose worker is gone: on a database, those whose heartbeat stopped
    (EndRunsAndRetry runs for each); on the journal, those of dead processes on this machine."""
    import optuna

    if isinstance(storage, optuna.storages.RDBStorage):
        optuna.storages.fail_stale_trials(study)
    else:
        fail_dead_local_trials(study, storage)


def await_running_trials(study: Any, storage: Any, poll_s: float = 1.0) -> None:
    """The outputs are written from a settled study: wait for trials that other workers (on
    other machines) are still running, failing those whose worker is gone."""
    said = 0.0
    while True:
        fail_lost_trials(study, storage)
        running = study.get_trials(deepcopy=False, states=_states("RUNNING"))
        if not running:
            return
        if time.monotonic() - said > 60:
            said = time.monotonic()
            log.info("tune: waiting for %d running trial(s) of other workers: %s", len(running),
                     ", ".join(f"{t.number} ({t.user_attrs.get(WORKER, '?')})"
                               for t in running))
        time.sleep(poll_s)


# ---- one trial ----


@contextlib.contextmanager
def heartbeat(storage: Any, trial_id: int) -> Iterator[None]:
    """Database storages: record the trial's heartbeat every heartbeat_interval seconds while it
    runs (what Study.optimize does; `run_trial` uses ask and tell to survive a trial failed
    under it)."""
    interval = getattr(storage, "heartbeat_interval", None)
    if not interval:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _surplus(study: Any, trial: Any, n_trials: int) -> bool:
    """Trial numbers are handed out by the storage, once each: a trial with `n_trials` live,
    queued or finished trials ahead of it is surplus, whichever worker asked for it."""
    ahead = study.get_trials(deepcopy=False, states=_states(*FINISHED, "RUNNING", "WAITING"))
    return sum(1 for t in ahead if t.number < trial.number) >= n_trials


def run_trial(study: Any, storage: Any, objective: Callable[[Any], float], n_trials: int,
              claim: dict[str, str], catch: tuple[type[BaseException], ...]) -> None:
    """Ask for a trial (a queued retry first), run `objective` on it and tell the result.

    `claim` goes onto the trial first (who runs it); an exception in `catch` fails the trial
    and the study goes on. A trial that was failed under this worker while it stalled (its
    heartbeat went stale) is left as the others decided: this worker goes on with a new one.
    """
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    with warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for Study.optimize; heartbeat() below beats
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        trial = study.ask()
    if _surplus(study, trial, n_trials):
        trial.set_user_attr(SURPLUS, True)
        study.tell(trial, state=TrialState.FAIL)
        return
    value, state, reason = None, TrialState.COMPLETE, None
    try:
        for key, attr in claim.items():
            trial.set_user_attr(key, attr)
        with heartbeat(storage, trial._trial_id):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                value, state = None, TrialState.PRUNED
            except catch as exc:
                value, state, reason = None, TrialState.FAIL, str(exc)
    except UpdateFinishedTrialError:
        pass  # it was failed under us: see below
    except BaseException as exc:  # Ctrl-C, SIGTERM, a bug: the trial must not stay RUNNING
        drop_interrupted_frames(exc)  # a store write it cut holds that store's lock
        study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    if storage.get_trial(trial._trial_id).state.is_finished():
        log.warning("tune: trial %d was failed under this worker (it stalled longer than the "
                    "heartbeat grace period); going on with new trials", trial.number)
        return
    study.tell(trial, value, state=state, skip_if_finished=True)
    report_trial(study, trial.number, state.name, value, reason)


def report_trial(study: Any, number: int, state: str, value: float | None,
                 reason: str | None = None) -> None:
    """One line per finished trial (number, state, value, params): what a log without a
    progress bar (DVC's queue, CI, `mlflow run`) shows of the search."""
    frozen = study.get_trials(deepcopy=False)[number]
    name = (study.metric_names or ["value"])[0]
    if state == "PRUNED" and frozen.intermediate_values:  # the last value it reported
        step = max(frozen.intermediate_values)
        value, name = frozen.intermediate_values[step], f"{name} at epoch {step}"
    shown = f"{name} {value:.4f}" if value is not None else f"({reason})"
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in frozen.params.items())
    level = logging.WARNING if state == "FAIL" else logging.INFO
    log.log(level, "tune: trial %d %s  %s  %s", number, state, shown, params)


# ---- the budget ----


@dataclass(frozen=True)
class Budget:
    n_trials: int  # finished trials the study ends with
    max_failed: int  # the study stops after this many failed trials
    timeout_s: float | None  # no new trials after this many seconds


def run_trials(study: Any, storage: Any, budget: Budget, objective: Callable[[Any], float],
               claim: dict[str, str], catch: tuple[type[BaseException], ...], owner: bool,
               progress: bool = False, poll_s: float = 0.5) -> str:
    """Run trials until the study has budget.n_trials finished ones, counted across every
    worker and every earlier invocation. -> why it stopped: "budget", "timeout", "grid"
    (every grid point tried) or "failures" (budget.max_failed failed trials).

    The owner (the process that writes the outputs) does not stop while the budget is still
    open: it waits for the trials of other workers and runs the retries of those that failed;
    other workers stop as soon as nothing is left for them to start.
    """
    import optuna
    from tqdm.auto import tqdm

    deadline = time.monotonic() + budget.timeout_s if budget.timeout_s else None
    bar = tqdm(total=budget.n_trials, desc="tune", unit="trial",
               disable=not (progress and sys.stderr.isatty()))
    try:
        while True:
            fail_lost_trials(study, storage)
            now = count(study)
            bar.update(now.finished - bar.n)
            if now.finished >= budget.n_trials:
                return "budget"
            if now.failed >= budget.max_failed:
                return "failures"
            if deadline is not None and time.monotonic() >= deadline:
                log.info("tune: tune.timeout_s reached; no new trials")
                return "timeout"
            if isinstance(study.sampler, optuna.samplers.GridSampler) and \
                    study.sampler.is_exhausted(study):
                log.info("tune: every point of the grid has been tried")
                return "grid"
            if now.finished + now.running >= budget.n_trials and not now.waiting:
                if not owner:
                    return "budget"  # the rest is being run by other workers
                time.sleep(poll_s)  # one of them may fail and come back as a retry
                continue
            run_trial(study, storage, objective, budget.n_trials, claim, catch)
    finally:
        bar.close()
