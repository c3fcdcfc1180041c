"""tune stage: an Optuna study over lr and optimizer; one MLflow parent run, a child per trial.

The study lives in its own storage (a journal file by default, any SQLAlchemy URL via
`tune.storage`), never in the MLflow database and never inside a DVC output, so it survives
reruns: `tune.n_trials` counts finished trials across restarts, and a finished study adds none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
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
        "space": [cfg.tune.lr_low, cfg.tune.lr_high, list(cfg.tune.optimizers)],
        "epochs": cfg.tune.epochs,
        "train": cfg.train.model_dump(mode="json", exclude=NOT_IN_TRIALS),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"{cfg.tune.study}-{digest[:10]}"


def open_storage(cfg: Config) -> Any:
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if cfg.tune.storage:
        return cfg.tune.storage
    cfg.optuna_journal.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(cfg.optuna_journal)))


def finished_trials(study: Any) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run(cfg: Config) -> dict[str, Any]:
    import optuna
    from optuna.trial import TrialState

    from reprolab import tracking
    from reprolab.data import load_training_data
    from reprolab.engine import fit, seed_everything, select_device
    from reprolab.errors import ReprolabError, TrainingDiverged
    from reprolab.models import build
    from reprolab.train import hyper_for, short_lr, spec_for

    device = select_device(cfg.train.device)
    meta, train_split, val_split = load_training_data(cfg.processed_dir, device)
    spec = spec_for(cfg, meta)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
        if cfg.tune.pruner == "median"
        else optuna.pruners.NopPruner()
    )
    name = study_name(cfg, meta)
    study = optuna.create_study(
        study_name=name,
        storage=open_storage(cfg),
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=cfg.seed),
        pruner=pruner,
        load_if_exists=True,
    )
    remaining = cfg.tune.n_trials - finished_trials(study)
    epochs_spent = 0

    def objective(trial: optuna.Trial) -> float:
        nonlocal epochs_spent
        lr = trial.suggest_float("lr", cfg.tune.lr_low, cfg.tune.lr_high, log=True)
        optimizer = trial.suggest_categorical("optimizer", list(cfg.tune.optimizers))
        seed_everything(cfg.seed)
        model = build(spec).to(device)
        hyper = hyper_for(cfg, optimizer, lr, cfg.tune.epochs, device)
        pruned = False
        run_name = f"trial-{trial.number}-{optimizer}-lr{short_lr(lr)}"
        try:
            with tracking.start_run(run_name, {"optuna.trial": str(trial.number)}, nested=True):
                tracking.log_params({"lr": lr, "optimizer": optimizer, "epochs": cfg.tune.epochs})

                def on_epoch(row: dict[str, float]) -> None:
                    nonlocal epochs_spent
                    epochs_spent += 1
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

    started = time.perf_counter()
    tracking.configure(cfg)
    with tracking.start_run(f"tune-{name}", {"optuna.study": name}):
        tracking.log_params({**cfg.flat(), "tune.study_name": name})
        if remaining > 0:
            study.optimize(
                objective,
                n_trials=remaining,
                callbacks=[
                    optuna.study.MaxTrialsCallback(
                        cfg.tune.n_trials, states=(TrialState.COMPLETE, TrialState.PRUNED)
                    )
                ],
            )
        else:
            log.info("tune: study %s already has %d finished trials", name, cfg.tune.n_trials)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        if TrialState.COMPLETE not in states:
            raise ReprolabError(
                f"tune: no trial of study {name} completed ({len(states)} pruned or failed); "
                "widen tune.lr_low..tune.lr_high or raise tune.n_trials"
            )
        best = study.best_trial
        tracking.log_metrics({f"best/{OBJECTIVE}": best.value})
        tracking.log_params({f"best.{k}": v for k, v in best.params.items()})
    summary = {
        "study": name,
        "trials_complete": states.count(TrialState.COMPLETE),
        "trials_pruned": states.count(TrialState.PRUNED),
        "trials_failed": states.count(TrialState.FAIL),
        "best_value": best.value,
        "best_trial": best.number,
        "objective": OBJECTIVE,
        "epochs_spent": epochs_spent,
        "wall_seconds": round(time.perf_counter() - started, 3),
    }
    write_yaml(cfg.best_params_file, {"optimizer": best.params["optimizer"],
                                       "lr": float(best.params["lr"])})
    write_json(cfg.report_dir("tune") / SUMMARY_FILE, summary)
    return summary


def main(cfg: Config, args: Any) -> None:
    summary = run(cfg)
    print(
        f"tune: study {summary['study']}  best {OBJECTIVE} {summary['best_value']:.4f}  "
        f"({summary['trials_complete']} complete, {summary['trials_pruned']} pruned)"
    )
