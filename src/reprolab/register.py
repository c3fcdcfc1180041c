"""register stage: a registry version with lineage; alias `champion` moves only to a better model.

The new version becomes champion when there is none, or when its test metric beats the
champion's by more than `register.min_delta` on the same test data; otherwise it is `challenger`.
`reports/register/decision.json` says which and why.
"""

from __future__ import annotations

import logging
from typing import Any

from reprolab.config import Config
from reprolab.io import file_lock, read_json, write_json

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
DECISION_FILE = "decision.json"
DATA_TAG = "data.manifest_sha256"


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


def run(cfg: Config) -> dict[str, Any]:
    from reprolab import tracking
    from reprolab.evaluate import METRICS_FILE
    from reprolab.train import training_run

    run_info = training_run(cfg)
    metrics = read_json(cfg.report_dir("evaluate") / METRICS_FILE)
    name, metric = cfg.register.model_name, cfg.register.metric
    value = float(metrics[metric])
    data_hash = run_info["tags"][DATA_TAG]

    tags = {
        **run_info["tags"],
        "training_run_id": run_info["run_id"],
        **{f"test/{k}": f"{v:.6f}" for k, v in metrics.items()},
    }
    # Read-decide-write under one lock, so that two registrations at once cannot both promote
    # against the same old champion.
    with file_lock(cfg.registry_lock_file):
        version = tracking.register_version(
            name, run_info["model_uri"], run_info["run_id"], tags
        )
        champion = tracking.alias_version(name, CHAMPION)
        if champion is not None and champion["version"] == version:
            promote, reason = True, f"v{version} is already the champion"
        else:
            promote, reason = decide(metric, value, data_hash, champion, cfg.register.min_delta)
        alias = CHAMPION if promote else CHALLENGER
        tracking.set_alias(name, alias, version)
    decision = {
        "model_name": name,
        "version": version,
        "alias": alias,
        "promoted": promote,
        "reason": reason,
        "metric": f"test/{metric}",
        "value": value,
        "champion_before": champion["version"] if champion else None,
        "run_id": run_info["run_id"],
    }
    write_json(cfg.report_dir("register") / DECISION_FILE, decision)
    log.info("register: %s v%s -> %s (%s)", name, version, alias, reason)
    return decision


def main(cfg: Config, args: Any) -> None:
    decision = run(cfg)
    print(
        f"register: {decision['model_name']} v{decision['version']} -> @{decision['alias']}: "
        f"{decision['reason']}"
    )
