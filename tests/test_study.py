"""Study mechanics on real storages (the journal file, PostgreSQL): many workers, one budget,
and the faults they meet: a worker killed or stopped inside a trial, every trial diverging,
SIGTERM of the stage, a torn journal. Each ends with exactly the budget, nothing RUNNING in the
study or in MLflow, or one clear error."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from mlflow import MlflowClient

from conftest import TINY, cli_argv
from reprolab import space, storage, tune
from reprolab import study as mechanics
from reprolab.errors import ReprolabError

RUN = mechanics.RUN  # the trial user attribute that holds its MLflow run
# Trials of a second or so: long enough to be killed inside one.
SLOW_TRIALS = ["tune.epochs=2", "train.batch_size=16", "tune.pruner=none", "tune.sampler=random"]


def _storage(cfg):
    """The study's storage, for a test to open once and poll with: each RDBStorage opened holds a
    PostgreSQL connection until the garbage collector frees it (a poll every 0.1 s that opened
    its own ran the server out of connections, "too many clients already"), and each opening of
    the journal takes its lock. Opened before a worker starts, it also creates the database's
    tables first, which a worker creating them at the same time may be refused."""
    return mechanics.open_storage(cfg.tune.storage, cfg.optuna_journal, cfg.tune.heartbeat_s)


def _study(cfg, storage=None):
    import optuna

    from reprolab.data import load_meta

    return optuna.load_study(study_name=space.study_name(cfg, load_meta(cfg.processed_dir)),
                             storage=storage or _storage(cfg))


def _check_exact_budget(cfg, n):
    from optuna.trial import TrialState

    trials = _study(cfg).get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == n
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    points = [(t.params["optimizer"], t.params["lr"]) for t in finished]
    assert len(set(points)) == len(points)  # workers do not repeat each other
    return trials


def _runs(experiment: str) -> list:
    exp = MlflowClient().get_experiment_by_name(experiment)
    return MlflowClient().search_runs([exp.experiment_id], max_results=1000)


def _status(run_id: str) -> str:
    return MlflowClient().get_run(run_id).info.status


def _assert_no_run_left_running(experiment: str) -> None:
    running = [r.info.run_name for r in _runs(experiment) if r.info.status == "RUNNING"]
    assert not running


def _start_worker(forks, cfg, overrides):
    """`reprolab tune --worker` in a process of its own (a fork: tests/forks.py; in a session of
    its own: a test that fails leaves no process behind)."""
    args = [*cli_argv("tune", cfg.base_dir, *TINY, *overrides), "--worker"]
    return forks.reprolab(args, cfg.base_dir, new_session=True)


def _await_trial_of(cfg, proc, storage, patience_s: float = 120) -> int:
    """-> the number of the first trial that `proc` runs, once it is inside it."""
    from optuna.trial import TrialState

    deadline = time.monotonic() + patience_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        try:
            trials = _study(cfg, storage).get_trials(deepcopy=False,
                                                     states=(TrialState.RUNNING,))
        except KeyError:  # the worker has not created the study yet
            trials = []
        mine = [t for t in trials if t.user_attrs.get("worker", "").endswith(f":{proc.pid}")
                and RUN in t.user_attrs]  # its MLflow run started
        if mine:
            return mine[0].number
        time.sleep(0.1)
    raise AssertionError("the worker never started a trial")


def _kill_group(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _workers_test(project, forks, experiment, storage_overrides):
    overrides = [f"tracking.experiment={experiment}", "tune.workers=2", "tune.n_trials=5",
                 *SLOW_TRIALS, *storage_overrides]
    cfg = project(*overrides)
    summary = tune.run(cfg)
    assert summary["trials_complete"] == 5
    trials = _check_exact_budget(cfg, 5)
    # both workers ran trials (a surplus trial, asked for when the other worker had just
    # filled the budget, is failed at once and names no worker)
    assert len({t.user_attrs["worker"] for t in trials
                if t.state.name in ("COMPLETE", "PRUNED")}) == 2
    assert tune.run(cfg)["trials_complete"] == 5  # a rerun adds none

    # A `--worker` killed inside a trial; the stage's process starts at once, while that trial
    # is still RUNNING: it must wait for it to be failed, run what is missing, and end the
    # dead worker's runs.
    more = [*overrides, "tune.n_trials=6", "tune.workers=1"]
    proc = _start_worker(forks, cfg, more)
    try:
        killed = _await_trial_of(cfg, proc, _storage(cfg))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        _kill_group(proc)
    tune.run(project(*more))
    trials = _check_exact_budget(cfg, 6)
    dead = trials[killed]
    assert dead.state.name == "FAIL"
    assert _status(dead.user_attrs[RUN]) == "KILLED"
    assert _status(dead.user_attrs["reprolab.worker_run"]) == "KILLED"  # its parent run
    _assert_no_run_left_running(experiment)
    return trials, killed


def test_two_workers_on_the_journal(project, forks):
    _workers_test(project, forks, "study-journal", [])


@pytest.fixture
def postgres_url():
    import uuid

    import psycopg

    name = f"reprolab_test_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host="127.0.0.1", port=5432, dbname="test", autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        user = admin.info.user
    yield f"postgresql://{user}@127.0.0.1:5432/{name}"
    with psycopg.connect(host="127.0.0.1", port=5432, dbname="test", autocommit=True) as admin:
        admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


def test_two_workers_on_postgresql(project, postgres_url, forks):
    trials, killed = _workers_test(project, forks, "study-postgresql",
                                   [f"tune.storage={postgres_url}", "tune.heartbeat_s=1"])
    # the heartbeat failed the trial and queued it again; the stage's process ran the retry
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state.name == "COMPLETE"
    assert retry.params == trials[killed].params


def _await_training(cfg, number: int, storage, timeout: float = 60) -> None:
    """Until trial `number`'s MLflow run holds its params: its worker has made the run's writes
    and is training (its next write comes at the end of an epoch)."""
    run_id = _study(cfg, storage).get_trials(deepcopy=False)[number].user_attrs[RUN]
    deadline = time.monotonic() + timeout
    while not MlflowClient().get_run(run_id).data.params:
        assert time.monotonic() < deadline, "the trial's run never got its params"
        time.sleep(0.01)


def _stopped(pid: int) -> bool:
    """Whether every thread of `pid` has stopped (SIGSTOP takes them one by one)."""
    tasks = os.listdir(f"/proc/{pid}/task")
    return all(_state(f"/proc/{pid}/task/{tid}/stat") in "tT" for tid in tasks)


def _state(stat: str) -> str:
    with open(stat) as f:
        return f.read().rpartition(")")[2].split()[0]


def _in_no_transaction(mlflow_store: str, postgres_url: str) -> bool:
    """Whether no other process holds a lock of the MLflow store (SQLite: an exclusive lock is
    free at once) or is inside a transaction of the study's database."""
    import sqlite3

    import psycopg

    store = sqlite3.connect(mlflow_store.removeprefix("sqlite:///"), timeout=0,
                            isolation_level=None)
    try:
        store.execute("BEGIN EXCLUSIVE")
        store.execute("ROLLBACK")
    except sqlite3.OperationalError:  # database is locked
        return False
    finally:
        store.close()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        (busy,) = db.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                             "current_database() AND pid <> pg_backend_pid() AND "
                             "backend_type = 'client backend' AND state <> 'idle'").fetchone()
    return busy == 0


def _stop_outside_the_stores(proc, mlflow_store: str, postgres_url: str) -> None:
    """SIGSTOP `proc` where it holds no lock of either store: stopped inside a write (an epoch's
    metrics, a heartbeat), it would hold up the stage's writes until it goes on, and the stage
    would never fail its trial. A stop that lands inside one is undone and tried again."""
    while True:
        os.kill(proc.pid, signal.SIGSTOP)
        while not _stopped(proc.pid):
            time.sleep(0.001)
        if _in_no_transaction(mlflow_store, postgres_url):
            return
        os.kill(proc.pid, signal.SIGCONT)
        while not _in_no_transaction(mlflow_store, postgres_url):  # until it is out of it
            time.sleep(0.01)


def _continue_once_failed(cfg, proc, number: int, storage, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if _study(cfg, storage).get_trials(deepcopy=False)[number].state.name == "FAIL":
                break
            time.sleep(0.2)
    finally:
        os.kill(proc.pid, signal.SIGCONT)


@pytest.mark.slow
def test_a_stopped_worker_goes_on_after_its_trial_was_retried(project, postgres_url,
                                                              mlflow_store, forks):
    """SIGSTOP of a `--worker` training a trial, SIGCONT once its heartbeat went stale and the
    trial was failed (heartbeat 1 s, failed after 3 s): the stage's process retries and finishes
    the budget; the resumed worker finds its trial failed, leaves it so and ends cleanly."""
    overrides = [f"tune.storage={postgres_url}", "tune.heartbeat_s=1", "tune.n_trials=4",
                 "tracking.experiment=study-sigstop", *SLOW_TRIALS]
    cfg = project(*overrides)
    storage = _storage(cfg)
    proc = _start_worker(forks, cfg, overrides)
    try:
        stopped = _await_trial_of(cfg, proc, storage)
        _await_training(cfg, stopped, storage)
        _stop_outside_the_stores(proc, mlflow_store, postgres_url)
        # SIGCONT once the trial was failed under it (not after a fixed time: on a loaded
        # machine the stage's process may take longer than the pause to notice)
        threading.Thread(target=_continue_once_failed,
                         args=(cfg, proc, stopped, storage)).start()
        summary = tune.run(cfg)
        _, err = proc.communicate(timeout=120)
    finally:
        _kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert f"trial {stopped} was failed under this worker" in err
    assert summary["trials_complete"] == 4
    trials = _check_exact_budget(cfg, 4)
    assert trials[stopped].state.name == "FAIL"
    _assert_no_run_left_running("study-sigstop")


@pytest.mark.parametrize(("max_failed", "failed"), [("null", 4), ("3", 3)])
def test_a_space_where_every_trial_diverges_ends_with_one_error(project, max_failed, failed):
    experiment = f"study-diverge-{failed}"
    # sgd at lr 1e4 and above: the loss is no longer finite after a few steps, in every trial
    cfg = project(f"tracking.experiment={experiment}", "tune.lr_low=1e4", "tune.lr_high=1e6",
                  "tune.optimizers=[sgd]", "tune.n_trials=2", "tune.epochs=1",
                  f"tune.max_failed={max_failed}")
    with pytest.raises(ReprolabError) as error:
        tune.run(cfg)
    message = str(error.value)
    assert "\n" not in message and error.value.exit_code == 1
    assert f"stopped after {failed} failed trials (tune.max_failed = {failed})" in message
    assert "in the space lr 10000..1e+06 with optimizers sgd;" in message
    states = [t.state.name for t in _study(cfg).get_trials(deepcopy=False)]
    assert states == ["FAIL"] * failed  # null: 2 x tune.n_trials
    assert sorted(r.info.status for r in _runs(experiment)) == ["FAILED"] * (failed + 1)
    assert not cfg.best_params_file.exists()


def _kill_a_local_worker(cfg, killed: list[int]) -> None:
    """Kill -9 the first worker process other than this one seen inside a trial."""
    from optuna.trial import TrialState

    storage, deadline = None, time.monotonic() + 120
    while time.monotonic() < deadline and not killed:
        time.sleep(0.1)
        try:
            storage = storage or mechanics.open_storage(None, cfg.optuna_journal, 1)
            trials = _study(cfg, storage).get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except KeyError:  # no study yet
            continue
        for trial in trials:
            pid = int(trial.user_attrs.get("worker", ":0").rpartition(":")[2])
            if pid and pid != os.getpid() and RUN in trial.user_attrs:
                os.kill(pid, signal.SIGKILL)
                killed.append(trial.number)
                return


def test_a_dead_local_worker_costs_only_its_trial(project, caplog):
    experiment = "study-dead-local"
    cfg = project(f"tracking.experiment={experiment}", "tune.workers=2", "tune.n_trials=5",
                  *SLOW_TRIALS)
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_local_worker, args=(cfg, killed), daemon=True)
    killer.start()
    summary = tune.run(cfg)  # returns: the stage exits 0
    killer.join()
    assert killed
    assert summary["trials_complete"] == 5
    trials = _check_exact_budget(cfg, 5)
    assert trials[killed[0]].state.name == "FAIL"
    warnings = [r.getMessage() for r in caplog.records if "ended early" in r.getMessage()]
    assert warnings == ["tune: 1 worker process(es) ended early (exit codes [-9]); the others "
                        "finished the budget"]
    assert _status(trials[killed[0]].user_attrs[RUN]) == "KILLED"
    _assert_no_run_left_running(experiment)


def _process_left(pid: int) -> bool:
    """A process that still runs (a zombie awaiting its reaper does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _await_gone(pids: set[int], patience_s: float = 30) -> None:
    """Until none of `pids` runs: a process killed -9 is gone once the kernel has taken it down,
    which is not at once on a loaded machine."""
    deadline = time.monotonic() + patience_s
    while left := [pid for pid in pids if _process_left(pid)]:
        assert time.monotonic() < deadline, f"worker processes {left} outlived the stage"
        time.sleep(0.05)


def _tune_in_trials(forks, cfg, overrides):
    """`reprolab tune` (2 workers) in a session of its own (a fork: tests/forks.py), once both of
    its processes are inside a trial whose MLflow run has started -> (the process, the pids of
    both)."""
    from optuna.trial import TrialState

    args = cli_argv("tune", cfg.base_dir, *TINY, *overrides)
    storage = _storage(cfg)
    proc = forks.reprolab(args, cfg.base_dir, new_session=True)
    deadline, workers = time.monotonic() + 120, set()
    while len(workers) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, \
            proc.communicate()[1][-3000:]
        time.sleep(0.1)
        try:
            running = _study(cfg, storage).get_trials(deepcopy=False,
                                                      states=(TrialState.RUNNING,))
        except KeyError:
            continue
        workers = {int(t.user_attrs["worker"].rpartition(":")[2]) for t in running
                   if RUN in t.user_attrs}
    return proc, workers


def _waits_on_a_lock(pid: int) -> bool:
    """Whether the main thread of `pid` sleeps. A tuning worker's main thread trains or writes;
    it sleeps only in SQLite's busy handler, between its tries to take a held store's lock."""
    with open(f"/proc/{pid}/wchan") as f:
        return "nanosleep" in f.read()


@contextlib.contextmanager
def _store_locked(mlflow_store: str, pids: set[int]) -> Iterator[None]:
    """The MLflow store (the session's SQLite file) locked for writing, as by a process stopped
    inside a write, from before until after the block; the block begins once each of `pids`
    waits in its next write (an epoch's metrics, a run's start)."""
    import sqlite3

    lock = sqlite3.connect(mlflow_store.removeprefix("sqlite:///"), isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        deadline = time.monotonic() + 60
        while not all(_waits_on_a_lock(pid) for pid in pids):
            assert time.monotonic() < deadline, "the workers never waited on the store"
            time.sleep(0.01)
        yield
    finally:
        lock.close()  # the store answers again


def _await_delivered(pid: int, signum: int) -> None:
    """Until the kernel has handed `signum` to the process (its handler has run; Python acts on
    it once the main thread is back from the C call it is in)."""
    while True:
        with open(f"/proc/{pid}/status") as f:
            pending = dict(line.split(":", 1) for line in f)["ShdPnd"]
        if not int(pending, 16) >> (signum - 1) & 1:
            return
        time.sleep(0.001)


SIGTERM_TUNE = ["tune.workers=2", "tune.n_trials=30", *SLOW_TRIALS]


def _sigterm_in_a_locked_store(project, forks, mlflow_store, experiment: str,
                               held: bool):
    """`reprolab tune` with a local worker, in trials; SIGTERM to the stage while another
    process holds the MLflow store's write lock, released once the signal is delivered (held
    False) or kept until the stage and its worker are gone (held True). -> (config, process,
    its stderr, seconds from the signal to its exit)."""
    overrides = [f"tracking.experiment={experiment}", *SIGTERM_TUNE]
    cfg = project(*overrides)
    proc, workers = _tune_in_trials(forks, cfg, overrides)
    try:
        with _store_locked(mlflow_store, workers):
            started = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            _await_delivered(proc.pid, signal.SIGTERM)
            if held:
                _, err = proc.communicate(timeout=mechanics.STOP_S + 30)
                stopped_in = time.monotonic() - started
                _await_gone(workers)
        if not held:
            _, err = proc.communicate(timeout=mechanics.STOP_S + 30)
            stopped_in = time.monotonic() - started
            _await_gone(workers)  # the spawned worker stopped with the stage
    finally:
        _kill_group(proc)
    return cfg, proc, err, stopped_in


@pytest.mark.slow
def test_sigterm_of_tune_ends_its_runs_killed_and_stops_its_workers(project, mlflow_store,
                                                                   forks):
    """SIGTERM while both processes wait on the MLflow store's lock: each write resumes once the
    lock goes, and the interrupt lands inside it. The stop then ends the runs KILLED and the
    trials FAIL at once: the interrupted write's lock (which the process keeps while its
    interrupt unwinds) is freed first, instead of every write of the stop, in the stage and in
    its worker, waiting MLflow's 20 s busy timeout behind it (a minute in all)."""
    from optuna.trial import TrialState

    experiment = "study-sigterm"
    cfg, proc, err, stopped_in = _sigterm_in_a_locked_store(project, forks, mlflow_store,
                                                            experiment, held=False)
    assert proc.returncode == 130, err[-3000:]
    assert stopped_in < mechanics.STOP_S, err[-3000:]
    assert "database is locked" not in err and "Traceback" not in err, err
    assert "after the signal" not in err  # the stop ended by itself, nothing was cut
    trials = _study(cfg).get_trials(deepcopy=False)
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    _assert_no_run_left_running(experiment)
    (parent,) = [r for r in _runs(experiment) if r.info.run_name.startswith("tune-")]
    assert parent.info.status == "KILLED"
    interrupted = [t for t in trials if t.state == TrialState.FAIL]  # the trials SIGTERM cut
    (own,) = [t for t in interrupted if t.user_attrs["worker"].endswith(f":{proc.pid}")]
    assert _status(own.user_attrs[RUN]) == "KILLED"
    # the worker's trial too, unless SIGTERM came after it had asked for a new one and before
    # that one's run started
    assert {_status(t.user_attrs[RUN]) for t in interrupted if RUN in t.user_attrs} == {"KILLED"}


@pytest.mark.slow
def test_a_stop_of_tune_ends_in_time_when_the_store_does_not_answer(project, mlflow_store,
                                                                   forks):
    """SIGTERM while the MLflow store stays locked (a process stopped inside a write): the stage
    and its worker exit within STOP_S, saying what they leave in one line; what they left
    RUNNING is what the next `reprolab tune` fails first (fail_lost_trials)."""
    from optuna.trial import TrialState

    experiment = "study-sigterm-locked"
    cfg, proc, err, stopped_in = _sigterm_in_a_locked_store(project, forks, mlflow_store,
                                                            experiment, held=True)
    assert proc.returncode == 130, err[-3000:]
    assert stopped_in < mechanics.STOP_S + 5  # the bound, and the kills and exit after it
    (line,) = [line for line in err.splitlines() if "after the signal" in line]
    assert line.endswith(f"tune: stopped {mechanics.STOP_S:g} s after the signal, "
                         f"{tune.LEFT_RUNNING}")

    journal = mechanics.open_storage(None, cfg.optuna_journal, 1)
    study = _study(cfg, journal)
    assert len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))) == 2
    mechanics.fail_lost_trials(study, journal)  # what the next `reprolab tune` does first
    assert not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    _assert_no_run_left_running(experiment)  # the trials' runs and the stage's parent run


@pytest.mark.slow
def test_a_kill_9_of_tune_stops_its_local_worker_by_itself(project, forks):
    """docs/tuning.md: a local worker whose stage process is killed -9 stops by itself, as on
    SIGTERM: its trial FAIL, its run KILLED. Its parent is multiprocessing's forkserver, which
    outlives the stage while a worker holds it, so the worker watches the stage itself; then the
    server ends too, and nothing of the stage's session is left running."""
    from optuna.trial import TrialState

    experiment = "study-kill-9-stage"
    overrides = [f"tracking.experiment={experiment}", *SIGTERM_TUNE]
    cfg = project(*overrides)
    proc, workers = _tune_in_trials(forks, cfg, overrides)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        (worker,) = workers - {proc.pid}
        _await_gone({worker})
        deadline = time.monotonic() + 30
        while True:  # the forkserver and the resource tracker too: the session is empty
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() < deadline, "processes of the stage's session outlived it"
            time.sleep(0.05)
    finally:
        _kill_group(proc)
    trials = _study(cfg).get_trials(deepcopy=False)
    (its,) = [t for t in trials if t.user_attrs["worker"].endswith(f":{worker}")
              and t.state != TrialState.COMPLETE and t.state != TrialState.PRUNED]
    assert its.state == TrialState.FAIL and _status(its.user_attrs[RUN]) == "KILLED"


# ---- the journal ----


def test_a_torn_journal_tail_is_cut_off_and_kept(project, caplog):
    cfg = project("tracking.experiment=study-torn", "tune.n_trials=2", "tune.epochs=1")
    tune.run(cfg)
    journal = cfg.optuna_journal
    whole = journal.read_bytes()
    last = whole.splitlines(keepends=True)[-1]
    journal.write_bytes(whole + last[: len(last) // 2])  # a record cut off mid-write

    summary = tune.run(project("tracking.experiment=study-torn", "tune.n_trials=3",
                               "tune.epochs=1"))  # the same study goes on: it appends
    assert summary["trials_complete"] + summary["trials_pruned"] == 3
    backup = journal.with_name(journal.name + ".torn-1")
    assert backup.read_bytes() == whole + last[: len(last) // 2]
    repaired = journal.read_bytes()
    assert repaired.startswith(whole)
    for line in repaired.splitlines():  # every record whole: the next load works too
        json.loads(line)
    assert len(_study(cfg).trials) == 3
    (warning,) = [r.getMessage() for r in caplog.records if "torn" in r.getMessage()]
    assert f"cut off, the original is kept as {backup.name}" in warning


@pytest.mark.parametrize("tail", [
    b'{"op_code":4,"worker_id":"a","study_id":0,"datetime_st',  # no newline
    b'{"op_code":4,"worker_id":"a"\n',  # a newline, but not a whole record
    b"\n",
])
def test_repair_journal_cuts_only_a_torn_last_record(tmp_path, tail):
    records = b'{"op_code":0,"study_name":"s"}\n{"op_code":4,"study_id":0}\n'
    journal = tmp_path / "optuna.journal"
    journal.write_bytes(records)
    assert storage.repair_journal(journal) is None  # whole: untouched, no backup
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.journal"]

    journal.write_bytes(records + tail)
    backup = storage.repair_journal(journal)
    assert journal.read_bytes() == records
    assert backup == tmp_path / "optuna.journal.torn-1"
    assert backup.read_bytes() == records + tail
    journal.write_bytes(records + tail)
    assert storage.repair_journal(journal).name == "optuna.journal.torn-2"  # never overwritten


def test_outputs_wait_for_trials_running_elsewhere(make_config):
    """The owner of a study writes its outputs only once no trial is running: a trial of a live
    worker is waited for, one of a dead worker on this machine is failed."""
    import optuna

    cfg = make_config()
    storage = mechanics.open_storage(None, cfg.optuna_journal, 1)
    study = optuna.create_study(study_name="s", storage=storage, direction="maximize")
    dead = subprocess.Popen(["true"])
    dead.wait()
    gone, live = study.ask(), study.ask()
    gone.set_user_attr("worker", f"{mechanics.socket.gethostname()}:{dead.pid}")
    live.set_user_attr("worker", mechanics.worker_id())

    def finish_live() -> None:  # once the waiting has begun: the dead worker's trial failed
        deadline = time.monotonic() + 60
        while study.get_trials(deepcopy=False)[0].state.name != "FAIL":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        study.tell(live, 0.5)

    threading.Thread(target=finish_live, daemon=True).start()
    mechanics.await_running_trials(study, storage, poll_s=0.1)
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states == ["FAIL", "COMPLETE"]
