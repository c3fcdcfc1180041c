"""tune stage: an Optuna study over lr and optimizer; one MLflow parent run, a child per trial.

This module is the objective (one trial, one MLflow run), the parent run and the outputs; the
search space, sampler and pruner are `reprolab.space`'s; how trials get run by many workers on
one storage, and what happens when a worker dies or stalls, lives in `reprolab.study`. The
study lives in its own storage (a journal file by default, any SQLAlchemy URL via
`tune.storage`), never in the MLflow database and never inside a DVC output, so it survives
reruns: `tune.n_trials` counts finished trials across restarts, and a finished study adds none.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reprolab import lineage, notes
from reprolab import tags as tag
from reprolab.config import Config
from reprolab.errors import ReprolabError
from reprolab.files import read_json, write_json, write_yaml
from reprolab.lifecycle import bounded_stop, exit_with_parent, interrupt_on_sigterm
from reprolab.space import (
    make_pruner,
    make_sampler,
    search_space,
    searched_params,
    study_attributes,
    study_name,
    suggest,
    trial_params,
)
from reprolab.study import (
    LEFT_RUNNING,
    RUN,
    STOP_S,
    WORKER,
    WORKER_RUN,
    Budget,
    await_running_trials,
    count,
    describe_study,
    is_surplus,
    open_storage,
    open_study,
    run_trials,
    worker_id,
    worker_seed,
)
from reprolab.workers import dead_workers, local_workers

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"  # numbers only: a DVC metrics file
STUDY_FILE = "study.json"  # which study and trial they come from
OBJECTIVE = "val/accuracy"


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


def make_objective(cfg: Config, meta: dict[str, Any], recipe: Any, splits: tuple[Any, Any],
                   device: Any, parent_run_id: str | None, run_tags: dict[str, str],
                   study: str) -> Callable[[Any], float]:
    """One trial: the model trained for tune.epochs at the trial's point, logged as one MLflow
    run (with `run_tags`: git and source); -> its last val/accuracy. Raises TrialPruned, or
    TrainingDiverged (the trial fails and the study goes on)."""
    import optuna

    from reprolab import tracking
    from reprolab.config import with_train
    from reprolab.device import seed_everything
    from reprolab.engine import fit
    from reprolab.recipe import hyper_for, short_lr

    train_split, val_split = splits

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, cfg)
        seed_everything(cfg.seed)
        model = recipe.build().to(device)
        # the trial's point overrides the train section, validated like params.yaml
        hyper = hyper_for(with_train(cfg, params, f"trial {trial.number}"), cfg.tune.epochs,
                          device, meta["shape"], model)
        pruned = False
        run_name = f"trial-{trial.number}-{params['optimizer']}-lr{short_lr(params['lr'])}"
        tags = {**run_tags, tag.TRIAL: str(trial.number), tag.WORKER: worker_id()}
        if parent_run_id:
            tags[tag.PARENT_RUN] = parent_run_id
        with tracking.start_run(run_name, tags, nested=parent_run_id is None) as run_id:
            trial.set_user_attr(RUN, run_id)  # whoever fails this trial ends this run too
            # the keys the train run uses, with what this trial ran: one column per knob
            tracking.log_params(trial_params(cfg, params))
            tracking.set_tags({tag.NOTE: notes.trial(cfg, meta, study, trial.number, params, tags)})

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
                # the run ends FINISHED (its epochs are valid), named so that the runs table
                # tells it from a complete trial
                pruned = True
                tracking.set_tags({tag.TRIAL_STATE: "PRUNED",
                                   tag.RUN_NAME: f"{run_name}-pruned"})
            else:
                tracking.set_tags({tag.TRIAL_STATE: "COMPLETE"})
        if pruned:
            raise optuna.TrialPruned()
        return result.last[OBJECTIVE]

    return objective


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


def too_many_failures(cfg: Config, name: str, failed: int) -> ReprolabError:
    t = cfg.tune
    return ReprolabError(
        f"tune: study {name} stopped after {failed} failed trials (tune.max_failed = "
        f"{t.failure_limit}) in the space lr {t.lr_low:g}..{t.lr_high:g} with optimizers "
        f"{', '.join(t.optimizers)}; narrow tune.lr_low..tune.lr_high, change tune.optimizers "
        "or raise tune.max_failed"
    )


def _local_worker(params: dict[str, Any], base_dir: str, index: int, parent: str,
                  level: int, stage: int, ready: Any) -> None:
    """Entry point of a local worker process (workers.py: a fork of the forkserver), started by
    the stage's process `stage`, with which it stops."""
    logging.basicConfig(level=level,
                        format=f"%(asctime)s worker {index} %(levelname)s %(name)s: %(message)s")
    # no last garbage collection at exit, as cli.py does for the stage: 1-2 s over objects that
    # die with the process anyway, which a stop of the stage would wait for
    atexit.register(gc.freeze)
    interrupt_on_sigterm(once=True)
    exit_with_parent(stage)
    cfg = Config.model_validate(params)
    cfg._base_dir = Path(base_dir)
    try:
        with bounded_stop(STOP_S / 2, f"tune: worker {index}", LEFT_RUNNING):
            run(cfg, worker_index=index, parent_run_id=parent, ready=ready)
    except KeyboardInterrupt:  # stopped by the stage's process: its trial and run are ended
        sys.exit(130)


def run(cfg: Config, progress: bool = False, worker_index: int = 0,
        parent_run_id: str | None = None, join: bool = False,
        ready: Any = None) -> dict[str, Any]:
    """The tune stage: with tune.workers > 1 it starts that many workers on this machine (this
    process is worker 0) and writes the outputs when all are done. `parent_run_id` marks a
    local worker (no outputs); `join` an extra worker from anywhere (`--worker`)."""
    import torch

    threads = torch.get_num_threads()
    try:
        return _run(cfg, progress, worker_index, parent_run_id, join, ready)
    finally:
        torch.set_num_threads(threads)  # share_machine's split ends with the stage


def _run(cfg: Config, progress: bool, worker_index: int, parent_run_id: str | None,
         join: bool, ready: Any) -> dict[str, Any]:
    from reprolab import tracking
    from reprolab.data import load_meta, load_training_data
    from reprolab.device import select_device
    from reprolab.errors import TrainingDiverged
    from reprolab.recipe import model_recipe

    n_local = cfg.tune.workers
    if join and parent_run_id is None:
        # a worker joining from elsewhere: seeds of its own, whatever its machine and start
        worker_index = 1000 + int(hashlib.sha256(worker_id().encode()).hexdigest()[:6], 16)
    device = share_machine(select_device(cfg.train.device), worker_index, n_local)
    # the model first: a net that does not build, or weights that do not fit, is one line
    recipe = model_recipe(cfg, load_meta(cfg.processed_dir))
    recipe.build()
    meta, train_split, val_split = load_training_data(cfg.processed_dir, device,
                                                      cfg.train.memory_budget_mb, n_local)
    name = study_name(cfg, meta)
    tracking.configure(cfg, parent_run=parent_run_id)
    # opened here, before any worker process races to create it
    storage = open_storage(cfg.tune.storage, cfg.optuna_journal, cfg.tune.heartbeat_s)
    study = open_study(storage, name, make_pruner(cfg))
    describe_study(study, OBJECTIVE, study_attributes(cfg, meta))
    study.sampler = make_sampler(cfg, worker_seed(study, cfg.seed, worker_index))
    run_tags = {**lineage.git_state(cfg.base_dir, (cfg.paths.reports,)),
                **lineage.source_tags("tune")}
    objective = make_objective(cfg, meta, recipe, (train_split, val_split), device,
                               parent_run_id, run_tags, name)
    budget = Budget(cfg.tune.n_trials, cfg.tune.failure_limit, cfg.tune.timeout_s)
    knobs = [d.key for d in search_space(cfg.tune)]

    def work(claim: dict[str, str], owner: bool) -> str:
        return run_trials(study, storage, budget, objective, claim, (TrainingDiverged,),
                          owner=owner, progress=progress)

    if parent_run_id is not None:  # a local worker: trials only
        ready.put(worker_index)
        work({WORKER: worker_id()}, owner=False)
        return {}

    started = time.perf_counter()
    if count(study).finished >= cfg.tune.n_trials:
        n_local = 1  # nothing left to run: start no worker process
    with tracking.start_run(f"tune-{name}" + ("-worker" if join else ""),
                            {**run_tags, tag.STUDY: name, tag.WORKER: worker_id()}
                            ) as parent:
        # the searched knobs only at the end, with the chosen values: params never change
        searched = searched_params(cfg, {})
        tracking.log_params({k: v for k, v in cfg.flat().items() if k not in searched}
                            | {"tune.study_name": name})
        tracking.set_tags({tag.NOTE: notes.tune(cfg, meta, run_tags, name, knobs)})
        level = logging.getLogger().getEffectiveLevel()
        args = [(cfg.as_dict(), str(cfg.base_dir), i, parent, level, os.getpid())
                for i in range(worker_index + 1, worker_index + n_local)]
        with local_workers(_local_worker, args) as others:
            stopped = work({WORKER: worker_id(), WORKER_RUN: parent}, owner=not join)
        if stopped == "failures":
            raise too_many_failures(cfg, name, count(study).failed)
        _check_workers(others, study, cfg.tune.n_trials)
        if not join:
            await_running_trials(study, storage)
        trials = study.get_trials(deepcopy=False)
        if not any(t.state.name == "COMPLETE" for t in trials):
            raise ReprolabError(
                f"tune: no trial of study {name} completed ({len(trials)} pruned or failed); "
                "widen tune.lr_low..tune.lr_high or raise tune.n_trials"
            )
        best = study.best_trial
        tracking.log_metrics({f"best/{OBJECTIVE}": best.value})
        tracking.log_params(searched_params(cfg, best.params))
        tracking.set_tags({tag.NOTE: notes.tune(cfg, meta, run_tags, name, knobs, best)})
        log_study_plots(study)
        # timings go to MLflow, never into summary.json (a DVC output: a pure function)
        tracking.log_metrics({"tune/wall_seconds": time.perf_counter() - started})
    summary = _summary(trials, best)
    if not join:  # an extra worker from elsewhere writes no DVC outputs
        write_yaml(cfg.best_params_file, dict(best.params))
        write_json(cfg.report_dir("tune") / SUMMARY_FILE, summary)
        write_json(cfg.report_dir("tune") / STUDY_FILE,
                   {"study": name, "objective": OBJECTIVE, "direction": "maximize",
                    "best_trial": best.number})
    return summary


def _check_workers(processes: list[Any], study: Any, n_trials: int) -> None:
    """A local worker that died (kill -9, out of memory) costs its trial, which the others
    redo: it fails the stage only when the budget was not finished without it."""
    dead = dead_workers(processes)
    if not dead:
        return
    codes = [p.exitcode for p in dead]
    if count(study).finished < n_trials:
        raise ReprolabError(f"tune: a worker process failed (exit codes {codes})")
    log.warning("tune: %d worker process(es) ended early (exit codes %s); the others finished "
                "the budget", len(dead), codes)


def _summary(trials: list[Any], best: Any) -> dict[str, Any]:
    """The numbers `dvc metrics show` lists (the study's name and best trial: STUDY_FILE)."""
    states = [t.state.name for t in trials]
    return {
        "trials_complete": states.count("COMPLETE"),
        "trials_pruned": states.count("PRUNED"),
        "trials_failed": sum(1 for t in trials if t.state.name == "FAIL" and not is_surplus(t)),
        "best_value": best.value,
        "epochs_spent": sum(int(t.user_attrs.get("epochs", 0)) for t in trials),
    }


def main(cfg: Config, args: Any) -> None:
    from tqdm.contrib.logging import logging_redirect_tqdm

    interrupt_on_sigterm()  # SIGTERM: runs end KILLED and worker processes stop, as on Ctrl-C
    # a line per trial prints above the progress bar
    with logging_redirect_tqdm(), bounded_stop(STOP_S, "tune", LEFT_RUNNING):
        summary = run(cfg, progress=not args.quiet, join=args.worker)
    study = "" if args.worker else \
        f"study {read_json(cfg.report_dir('tune') / STUDY_FILE)['study']}  "
    print(
        f"tune: {study}best {OBJECTIVE} {summary['best_value']:.4f}  "
        f"({summary['trials_complete']} complete, {summary['trials_pruned']} pruned)"
    )
