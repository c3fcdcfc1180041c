"""register stage: a registry version with lineage; alias `champion` moves only to a better model.

The aliases are a pure function of the registry's own versions: every version, replayed in version
order through the gate (same test data, better test metric by more than `register.min_delta`),
gives the champion (the last one promoted) and the challenger (the last one not promoted). Each
`register` adds its version, recomputes both from all versions and writes them, and repeats when
the set of versions changed meanwhile. So any number of processes on any number of machines,
interleaved in any order, leave the aliases that registering them one by one would have left.
`reports/register/decision.json` reports that final state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from reprolab.config import Config
from reprolab.errors import ConfigError, DataError
from reprolab.io import read_json, sha256_file, write_json

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
DECISION_FILE = "decision.json"
DATA_TAG = "data.manifest_sha256"
MODEL_TAG = "model.sha256"
# The gate is the registered model's, not one process's: every register of one model must agree.
GATE_METRIC_TAG, GATE_DELTA_TAG = "reprolab.gate.metric", "reprolab.gate.min_delta"


def decide(
    metric: str, value: float, data_hash: str, champion: dict[str, Any] | None, min_delta: float
) -> tuple[bool, str]:
    """-> (promote, reason). Pure: the gate, apart from the registry."""
    if champion is None:
        return True, "no champion yet"
    tags = champion["tags"]
    if tags.get(DATA_TAG) != data_hash:
        return False, (
            f"champion v{champion['version']} was evaluated on other test data "
            f"({tags.get(DATA_TAG, 'unknown')[:12]} vs {data_hash[:12]}); not comparable"
        )
    best = float(tags[f"test/{metric}"])
    if value > best + min_delta:
        return True, f"test/{metric} {value:.4f} beats champion v{champion['version']} {best:.4f}"
    return False, (
        f"test/{metric} {value:.4f} does not beat champion v{champion['version']} {best:.4f} "
        f"by more than min_delta {min_delta:g}"
    )


@dataclass(frozen=True)
class Replay:
    champion: str | None
    challenger: str | None
    verdicts: dict[str, tuple[bool, str]]  # version -> (promoted at its turn, why)


def replay(versions: list[dict[str, Any]], metric: str, min_delta: float) -> Replay:
    """Registering `versions` one by one in version order: who ends champion and challenger.

    Pure. A version without this metric's test tag (not registered by reprolab) takes no part.
    """
    champion: dict[str, Any] | None = None
    challenger: str | None = None
    verdicts: dict[str, tuple[bool, str]] = {}
    for version in sorted(versions, key=lambda v: int(v["version"])):
        tags = version["tags"]
        if f"test/{metric}" not in tags or DATA_TAG not in tags:
            verdicts[version["version"]] = (False, f"no test/{metric} tag; not compared")
            continue
        promote, reason = decide(metric, float(tags[f"test/{metric}"]), tags[DATA_TAG],
                                 champion, min_delta)
        verdicts[version["version"]] = (promote, reason)
        if promote:
            champion = version
        else:
            challenger = version["version"]
    return Replay(champion["version"] if champion else None, challenger, verdicts)


def evaluated_metrics(cfg: Config, run_info: dict[str, Any]) -> dict[str, float]:
    """The test metrics, refused unless evaluate measured the very model in models/."""
    from reprolab.evaluate import EVALUATED_FILE, METRICS_FILE

    folder = cfg.report_dir("evaluate")
    metrics_path, evaluated_path = folder / METRICS_FILE, folder / EVALUATED_FILE
    model_path = cfg.model_file
    for path in (model_path, metrics_path, evaluated_path):
        if not path.is_file():
            raise DataError(f"{path}: not found; run `reprolab train` and `reprolab evaluate` "
                            "(or `dvc repro`) first")
    evaluated = read_json(evaluated_path)
    model_hash = sha256_file(model_path)
    if evaluated.get("model_sha256") != model_hash or \
            evaluated.get("training_run_id") != run_info["run_id"]:
        raise DataError(
            f"{metrics_path}: measures model {str(evaluated.get('model_sha256'))[:12]} of run "
            f"{evaluated.get('training_run_id')}, not {model_path} ({model_hash[:12]}, run "
            f"{run_info['run_id']}); run `reprolab evaluate` (or `dvc repro`) before registering"
        )
    return read_json(metrics_path)


def check_gate(name: str, stored: dict[str, str], metric: str, min_delta: float) -> None:
    """Processes with different gates would undo each other's aliases: refuse a mismatch."""
    want = {GATE_METRIC_TAG: metric, GATE_DELTA_TAG: repr(float(min_delta))}
    for key, value in want.items():
        if key in stored and stored[key] != value:
            raise ConfigError(
                f"register.metric/min_delta = {metric}/{min_delta:g}: registered model {name!r} "
                f"is gated on {stored.get(GATE_METRIC_TAG)}/{stored.get(GATE_DELTA_TAG)} "
                "(its tags); use those, or another register.model_name"
            )


def settle_aliases(name: str, metric: str, min_delta: float) -> tuple[Replay, list[str]]:
    """Write the aliases that the replay of all versions gives; again while versions appear.

    A process that computed from an older set of versions sees the newer one after writing and
    writes again, so the last write to each alias is made from every version there is.
    """
    from reprolab import tracking

    versions = tracking.model_versions(name)
    for _ in range(1000):
        result = replay(versions, metric, min_delta)
        tracking.set_alias(name, CHAMPION, result.champion)
        tracking.set_alias(name, CHALLENGER, result.challenger)
        now = tracking.model_versions(name)
        if [v["version"] for v in now] == [v["version"] for v in versions]:
            return result, [v["version"] for v in now]
        versions = now
    raise AssertionError(f"registry {name}: versions kept changing for 1000 rounds")


def run(cfg: Config) -> dict[str, Any]:
    from reprolab import tracking
    from reprolab.train import training_run

    run_info = training_run(cfg)
    metrics = evaluated_metrics(cfg, run_info)
    name, metric, min_delta = cfg.register.model_name, cfg.register.metric, cfg.register.min_delta
    gate = {GATE_METRIC_TAG: metric, GATE_DELTA_TAG: repr(float(min_delta))}
    check_gate(name, tracking.ensure_registered_model(name, gate), metric, min_delta)

    tags = {
        **run_info["tags"],
        "training_run_id": run_info["run_id"],
        MODEL_TAG: sha256_file(cfg.model_file),
        **{f"test/{k}": f"{v:.6f}" for k, v in metrics.items()},
    }
    version = tracking.register_version(name, run_info["model_uri"], run_info["run_id"], tags)
    result, _ = settle_aliases(name, metric, min_delta)
    promoted, reason = result.verdicts[version]
    alias = {result.champion: CHAMPION, result.challenger: CHALLENGER}.get(version)
    decision = {
        "model_name": name,
        "version": version,
        "alias": alias,
        "promoted": promoted,
        "reason": reason,
        "metric": f"test/{metric}",
        "value": float(metrics[metric]),
        "champion": result.champion,
        "challenger": result.challenger,
        "run_id": run_info["run_id"],
    }
    write_json(cfg.report_dir("register") / DECISION_FILE, decision)
    log.info("register: %s v%s -> %s (%s)", name, version, alias, reason)
    return decision


def main(cfg: Config, args: Any) -> None:
    d = run(cfg)
    where = f"@{d['alias']}" if d["alias"] else f"no alias (champion is v{d['champion']})"
    print(f"register: {d['model_name']} v{d['version']} -> {where}: {d['reason']}")
