"""The search space of `reprolab tune`: what makes a study (its name, the fingerprint of what
makes trials comparable, the attributes optuna-dashboard shows) and how its trials are drawn
(the space in one table, the sampler, the pruner, a trial's point and its MLflow params under
the train run's keys). tune runs the study; this module only describes it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from reprolab import tags as tag
from reprolab.config import Config
from reprolab.study import grid_sampler


def study_name(cfg: Config, meta: dict[str, Any]) -> str:
    """The configured name plus a fingerprint of what makes trials comparable.

    A changed dataset, split, model or search space starts a new study instead of mixing in.
    """
    return f"{cfg.tune.study}-{study_fingerprint(cfg, meta)[:10]}"


def study_fingerprint(cfg: Config, meta: dict[str, Any]) -> str:
    """sha256 of what makes two trials comparable: data, split, model (with your network's code
    and the weights it starts from), search space and the train knobs that trials use."""
    from reprolab.recipe import model_identity

    identity = {
        "data": meta["manifest_sha256"],
        "split": cfg.data.model_dump(mode="json"),
        "seed": cfg.seed,
        "model": model_identity(cfg),
        "search": cfg.tune.model_dump(
            mode="json",
            exclude={"study", "n_trials", "timeout_s", "storage", "workers", "heartbeat_s",
                     "max_failed"},
        ),
        "train": cfg.train.model_dump(mode="json", include=set(cfg.train.trial_knobs())),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Dimension:
    """One dimension of the search space: the train knob it sets and how it is drawn."""

    key: str
    kind: str  # "log" (log-uniform float), "uniform" (float) or "choice"
    values: tuple[Any, ...]  # (low, high) for the floats; the choices


def search_space(t: Any) -> list[Dimension]:
    """The search space of the tune section, in one table: suggest, the grid sampler and the
    study's attributes all read it. lr and optimizer always; weight_decay, momentum and
    batch_size when tune names their ranges."""
    space = [Dimension("lr", "log", (t.lr_low, t.lr_high)),
             Dimension("optimizer", "choice", tuple(t.optimizers))]
    for key, kind, value in (("weight_decay", "log", t.weight_decay),
                             ("momentum", "uniform", t.momentum),
                             ("batch_size", "choice", t.batch_sizes)):
        if value:
            space.append(Dimension(key, kind, tuple(value)))
    return space


def study_attributes(cfg: Config, meta: dict[str, Any]) -> dict[str, Any]:
    """What optuna-dashboard shows about a study (user attributes): where its trials come from."""
    t = cfg.tune
    space = {d.key: list(d.values) if d.kind == "choice" else
             {"low": d.values[0], "high": d.values[1], "log": d.kind == "log"}
             for d in search_space(t)}
    return {
        "dataset": meta["dataset"],
        tag.DATA_MANIFEST: meta["manifest_sha256"],
        "model": cfg.model.model_dump(mode="json"),
        "search_space": space,
        "epochs_per_trial": t.epochs,
        "sampler": t.sampler,
        "pruner": t.pruner,
        tag.PARAMS_HASH: study_fingerprint(cfg, meta),
    }


def make_sampler(cfg: Config, seed: int) -> Any:
    import numpy as np
    import optuna

    t = cfg.tune
    if t.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if t.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    spread = {"log": np.geomspace, "uniform": np.linspace}
    grid = {d.key: list(d.values) if d.kind == "choice" else
            spread[d.kind](*d.values, t.grid_points).tolist() for d in search_space(t)}
    return grid_sampler(grid, seed)


def make_pruner(cfg: Config) -> Any:
    import optuna

    if cfg.tune.pruner == "percentile":  # the default: benchmarks/bench_pruning.py chose it
        return optuna.pruners.PercentilePruner(cfg.tune.percentile, n_startup_trials=1,
                                               n_warmup_steps=0)
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
    """The trial's point in the search space."""
    params = {}
    for d in search_space(cfg.tune):
        if d.kind == "choice":
            params[d.key] = trial.suggest_categorical(d.key, list(d.values))
        else:
            params[d.key] = trial.suggest_float(d.key, *d.values, log=d.kind == "log")
    return params


def searched_params(cfg: Config, point: dict[str, Any]) -> dict[str, Any]:
    """The searched knobs of a trial's point, and `train.epochs` as a trial runs it
    (tune.epochs), under the train run's MLflow param keys."""
    return {**{f"train.{d.key}": point.get(d.key) for d in search_space(cfg.tune)},
            "train.epochs": cfg.tune.epochs}


def trial_params(cfg: Config, point: dict[str, Any]) -> dict[str, Any]:
    """A trial's MLflow params: the config, with what the trial ran (searched_params)."""
    return {**cfg.flat(), **searched_params(cfg, point)}
