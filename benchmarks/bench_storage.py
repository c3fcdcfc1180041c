"""5. Study storage: the journal file (reprolab's default) against SQLite, with 4 worker
processes sharing one study of 100 short trials (an objective that reports 3 intermediate
values and takes no compute, so the storage is all that is measured). Wall time of the study
and worker-seconds per trial; errors raised by the storage are counted. No target: this shows
why SQLite is refused for tune.workers > 1.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time
from pathlib import Path

from harness import QUICK, Row, alternate, quiet, report, row_from

WORKERS, TRIALS = (4, 20) if QUICK else (4, 100)


def _worker(kind: str, path: str, index: int, errors) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = _storage(kind, path)
    study = optuna.load_study(study_name="bench", storage=storage,
                              sampler=optuna.samplers.RandomSampler(seed=index))

    def objective(trial) -> float:
        x = trial.suggest_float("x", -10, 10)
        for step in range(3):
            trial.report(x * x + step, step)
        return x * x

    for _ in range(TRIALS // WORKERS):
        try:
            study.optimize(objective, n_trials=1)
        except Exception:  # noqa: BLE001 - counted: a storage error ends no benchmark
            with errors.get_lock():
                errors.value += 1


def _storage(kind: str, path: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if kind == "journal":
        return JournalStorage(JournalFileBackend(path))
    return optuna.storages.RDBStorage(f"sqlite:///{path}")


def main() -> list[Row]:
    quiet()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    root = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    context = multiprocessing.get_context("fork")
    errors = {"journal": context.Value("i", 0), "sqlite": context.Value("i", 0)}
    counter = iter(range(10_000))

    def study(kind: str) -> float:
        path = str(root / f"{kind}-{next(counter)}.db")
        optuna.create_study(study_name="bench", storage=_storage(kind, path))
        started = time.perf_counter()
        processes = [context.Process(target=_worker, args=(kind, path, i, errors[kind]))
                     for i in range(WORKERS)]
        for p in processes:
            p.start()
        for p in processes:
            p.join()
        return time.perf_counter() - started

    samples = alternate(lambda: study("journal"), lambda: study("sqlite"),
                        rounds=1 if QUICK else 5)
    wall = row_from(samples, name=f"study storage, {WORKERS} workers, {TRIALS} trials: wall",
                    a_label="journal", b_label="SQLite", unit="s", ratio="B/A")
    per_trial = {k: [v * WORKERS / TRIALS * 1000 for v in vs] for k, vs in samples.items()}
    trial = row_from(per_trial, name="study storage: worker time per trial",
                     a_label="journal", b_label="SQLite", unit="ms", ratio="B/A")
    trial.note = (f"storage errors in all rounds: journal {errors['journal'].value}, "
                  f"SQLite {errors['sqlite'].value}")
    report("storage", [wall, trial])
    return [wall, trial]


if __name__ == "__main__":
    main()
