"""The note at the top of each run's page in the MLflow UI (`mlflow.note.content`, Markdown):
what was trained on what, the result, and the command that makes it again. Pure functions of
what the stage knows; train and tune write them at the start and again with the result.
"""

from __future__ import annotations

from typing import Any

from reprolab import tags as tag


def _lineage(tags: dict[str, str], meta: dict[str, Any]) -> str:
    """The commit and data a run came from, in one line."""
    from reprolab.data import processed_digest

    commit = tags.get(tag.GIT_COMMIT, "none")
    dirty = " (with uncommitted changes)" if tags.get(tag.GIT_DIRTY) == "true" else ""
    return (f"Code: commit `{commit[:12]}`{dirty}. Data: processed splits "
            f"`{processed_digest(meta)[:12]}` (`{tag.DATA_PROCESSED}`).")


def _again(tags: dict[str, str], stage: str) -> str:
    """The command that runs this stage again from the same code, params and data."""
    if tags.get(tag.DVC_EXP):
        return f"`dvc exp apply {tags[tag.DVC_EXP]}` then `dvc repro {stage}`"
    commit = tags.get(tag.GIT_COMMIT, "none")
    if commit == "none":
        return f"`reprolab {stage}` with the params below"
    return f"`git checkout {commit[:12]}` then `dvc repro {stage}`"


def _shape(meta: dict[str, Any]) -> str:
    return "x".join(str(d) for d in meta["shape"])


def train(cfg: Any, meta: dict[str, Any], tags: dict[str, str],
          result: Any | None = None) -> str:
    """The training run's note; with `result` (the engine's FitResult), its outcome."""
    t = cfg.train
    source = "tuned by `reprolab tune`" if t.use_tuned else "from params.yaml"
    lines = [
        f"**Trains `{cfg.model.name}`** on `{meta['dataset']}` ({meta['sizes']['train']} "
        f"training and {meta['sizes']['val']} validation images of {_shape(meta)}) for up to "
        f"{t.epochs} epochs: {t.optimizer} at learning rate {t.lr:g} ({source}), "
        f"batch {t.batch_size}, seed {cfg.seed}.",
        _lineage(tags, meta),
    ]
    if result is None:
        lines.append("Result: running.")
    else:
        kept = next((r for r in result.history if r["epoch"] == result.best_epoch),
                    result.history[-1])
        lines.append(
            f"Result: val/accuracy {kept['val/accuracy']:.4f} at epoch {result.best_epoch} of "
            f"{result.history[-1]['epoch']}, the epoch whose weights the model holds "
            f"(`{tag.KEPT_EPOCH}`); `reprolab evaluate` adds the test scores to this run.")
    lines.append(f"Again: {_again(tags, 'train')}; once registered, `reprolab verify "
                 "models:/<name>/<version>` rebuilds it and compares.")
    return "\n\n".join(lines)


def tune(cfg: Any, meta: dict[str, Any], tags: dict[str, str], study: str, knobs: list[str],
         best: Any | None = None) -> str:
    """The tuning parent run's note (`knobs`: the searched keys); with `best` (Optuna's best
    trial), the chosen point."""
    space = ", ".join(f"`train.{k}`" for k in knobs)
    lines = [
        f"**Tunes `{cfg.model.name}`** on `{meta['dataset']}` ({meta['sizes']['train']} "
        f"training images, scored on {meta['sizes']['val']} validation images): "
        f"{cfg.tune.n_trials} trials of {cfg.tune.epochs} epochs over {space}, "
        f"{cfg.tune.sampler} sampler, {cfg.tune.pruner} pruner. Optuna study `{study}`; each "
        "trial is a child run.",
        _lineage(tags, meta),
    ]
    if best is None:
        lines.append("Result: running; the searched knobs are logged when it ends, with the "
                     "chosen values.")
    else:
        point = ", ".join(f"`train.{k}` = {v:g}" if isinstance(v, float) else
                          f"`train.{k}` = {v}" for k, v in best.params.items())
        lines.append(f"Result: trial {best.number} is best, val/accuracy {best.value:.4f} at "
                     f"{point}; these are this run's params and `reprolab train` trains with "
                     "them (`train.use_tuned`).")
    lines.append(f"Again: {_again(tags, 'tune')} (the study extends when it exists).")
    return "\n\n".join(lines)


def trial(cfg: Any, meta: dict[str, Any], study: str, number: int, point: dict[str, Any],
          tags: dict[str, str]) -> str:
    """A tuning trial's note: its point and the command that trains it alone."""
    sets = " ".join(f"-S train.{k}={v}" for k, v in point.items())
    at = ", ".join(f"`train.{k}` = {v}" for k, v in point.items())
    return (f"**Trial {number}** of Optuna study `{study}`: `{cfg.model.name}` for "
            f"{cfg.tune.epochs} epochs at {at}, "
            "scored on val/accuracy (the parent run holds the study's result).\n\n"
            f"{_lineage(tags, meta)}\n\n"
            f"Alone: `reprolab train {sets} -S train.epochs={cfg.tune.epochs} "
            "-S train.use_tuned=false` trains this point.")

