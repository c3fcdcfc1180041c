"""register stage: a registry version with lineage; alias `champion` moves only to a better model.

The aliases are a pure function of the registry's own versions: every version, replayed in version
order through the gate (same test data, better test metric by more than `register.min_delta`),
gives the champion (the last one promoted) and the challenger (the last one not promoted). Each
`register` adds its version, recomputes both from all versions and writes them, and repeats when
the set of versions changed meanwhile. So any number of processes on any number of machines,
interleaved in any order, leave the aliases that registering them one by one would have left.
A model file (its sha256) is registered once, also when two machines register it at once.
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


def evaluated_metrics(cfg: Config) -> tuple[dict[str, float], str]:
    """-> (the test metrics, the model's sha256), refused unless evaluate measured the very
    model in models/."""
    metrics_path, model_path = cfg.metrics_file, cfg.model_file
    for path in (model_path, metrics_path, cfg.evaluated_file):
        if not path.is_file():
            raise DataError(f"{path}: not found; run `reprolab train` and `reprolab evaluate` "
                            "(or `dvc repro`) first")
    measured = str(read_json(cfg.evaluated_file).get("model_sha256"))
    model_hash = sha256_file(model_path)
    if measured != model_hash:
        raise DataError(
            f"{metrics_path}: measures model {measured[:12]}, not {model_path} "
            f"({model_hash[:12]}); run `reprolab evaluate` (or `dvc repro`) before registering"
        )
    return read_json(metrics_path), model_hash


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
    while True:
        result = replay(versions, metric, min_delta)
        written = [tracking.set_alias(name, CHAMPION, result.champion),
                   tracking.set_alias(name, CHALLENGER, result.challenger)]
        now = tracking.model_versions(name)
        if all(written) and [v["version"] for v in now] == [v["version"] for v in versions]:
            return result, [v["version"] for v in now]
        versions = now


def one_version_per_model(name: str, version: str, model_hash: str) -> str:
    """Two machines registering the same model file at the same instant both create a version;
    the one with the higher number deletes its own, so each model is registered once."""
    from reprolab import tracking

    same = [v["version"] for v in tracking.model_versions(name)
            if v["tags"].get(tracking.MODEL_HASH_TAG) == model_hash]
    first = min(same, key=int, default=version)
    if first != version:
        tracking.delete_version(name, version)
    return first


def run(cfg: Config) -> dict[str, Any]:
    from reprolab import tracking

    metrics, model_hash = evaluated_metrics(cfg)
    tracking.configure(cfg)
    run_info = tracking.training_run_for(cfg.model_file, model_hash, cfg.tracking.experiment)
    name, metric, min_delta = cfg.register.model_name, cfg.register.metric, cfg.register.min_delta
    gate = {GATE_METRIC_TAG: metric, GATE_DELTA_TAG: repr(float(min_delta))}
    check_gate(name, tracking.ensure_registered_model(name, gate), metric, min_delta)

    tags = {
        **run_info["tags"],
        "training_run_id": run_info["run_id"],
        **{f"test/{k}": f"{v:.6f}" for k, v in metrics.items()},
    }
    version = tracking.register_version(name, run_info["model_uri"], run_info["run_id"], tags)
    version = one_version_per_model(name, version, tags[tracking.MODEL_HASH_TAG])
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
    }
    write_json(cfg.report_dir("register") / DECISION_FILE, decision)
    log.info("register: %s v%s -> %s (%s)", name, version, alias, reason)
    return decision


def main(cfg: Config, args: Any) -> None:
    d = run(cfg)
    where = f"@{d['alias']}" if d["alias"] else f"no alias (champion is v{d['champion']})"
    print(f"register: {d['model_name']} v{d['version']} -> {where}: {d['reason']}")
