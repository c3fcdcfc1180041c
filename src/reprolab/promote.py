"""`reprolab promote NAME VERSION`: make a registered version the champion by hand, its lineage
checked, recorded as an event that every later replay of the gate applies where it happened."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reprolab.config import Config
from reprolab.errors import DataError
from reprolab.gate import Gate, description, replay
from reprolab.register import settle_aliases
from reprolab.tags import (
    DATA_MANIFEST,
    DATASET,
    GATE_METRIC,
    INPUT_SHAPE,
    MODEL_DATASET,
    MODEL_HASH,
    MODEL_SHAPE,
    PROMOTIONS,
    TRAINING_RUN,
    test_metric,
)


def check_lineage(name: str, version: dict[str, Any], stored: dict[str, str], metric: str
                  ) -> None:
    """The checks register makes, for a version chosen by hand: it carries reprolab's lineage,
    fits the registered model's dataset and shape, and its training run (FINISHED, in this
    store) wrote that very model and holds the test metric the version records."""
    from reprolab import tracking

    number, tags = version["version"], version["tags"]
    where = f"{name} v{number}"
    for key in (MODEL_HASH, DATA_MANIFEST, test_metric(metric), TRAINING_RUN):
        if key not in tags:
            raise DataError(f"{where}: no {key} tag (not registered by `reprolab register`); "
                            "only a version with its lineage can become champion")
    for key, model_key in ((INPUT_SHAPE, MODEL_SHAPE), (DATASET, MODEL_DATASET)):
        if model_key in stored and tags.get(key) != stored[model_key]:
            raise DataError(f"{where}: {key} {tags.get(key)}, but registered model {name!r} "
                            f"holds {stored[model_key]} (its tags); not promoted")
    run_id = tags[TRAINING_RUN]
    record = tracking.run_record(run_id)
    if record is None or record["status"] != "FINISHED":
        state = "not in this MLflow store" if record is None else record["status"]
        raise DataError(f"{where}: its training run {run_id} is {state}; not promoted")
    if record["tags"].get(MODEL_HASH) != tags[MODEL_HASH]:
        raise DataError(f"{where}: its training run {run_id} did not write this model "
                        f"({MODEL_HASH} differs); not promoted")
    logged = record["metrics"].get(test_metric(metric))
    if logged is None or abs(logged - float(tags[test_metric(metric)])) > 1e-6:
        raise DataError(f"{where}: test/{metric} {tags[f'test/{metric}']} is not what evaluate "
                        f"logged on run {run_id} ({logged}); not promoted")


def promote(name: str, number: str) -> dict[str, Any]:
    """Make version `number` of `name` the champion, recorded as a promotion tag that every
    later replay applies where it happened. MLflow must point at the registry's store."""
    from reprolab import registry

    version = registry.registered_version(f"models:/{name}/{number}")  # refuses a missing one
    number = version["version"]
    stored = registry.registered_model_tags(name)
    if GATE_METRIC not in stored:
        raise DataError(f"registered model {name!r}: no {GATE_METRIC} tag (not created by "
                        "`reprolab register`); nothing to promote through")
    gate = Gate.of(stored)
    check_lineage(name, version, stored, gate.metric)
    with tempfile.TemporaryDirectory(prefix="reprolab-promote-") as tmp:
        registry.fetch_checked(version, Path(tmp))  # its bytes are the registered ones
    versions = registry.model_versions(name)
    before = replay(versions, gate).champion
    if before != number:
        after = max(int(v["version"]) for v in versions)
        when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        entries = f"{version['tags'].get(PROMOTIONS, '')} {after}@{when}".strip()
        registry.set_version_tag(name, number, PROMOTIONS, entries)
    result, _ = settle_aliases(name, gate)
    return {"model_name": name, "version": number, "previous": before,
            "champion": result.champion, "challenger": result.challenger,
            "description": description(number, result)}


def main(cfg: Config | None, args: Any) -> int:
    from reprolab import tracking

    tracking.use_store(cfg)
    d = promote(args.name, args.version)
    if d["previous"] == d["version"]:
        print(f"promote: {d['model_name']} v{d['version']} is already @champion")
        return 0
    was = f" (was v{d['previous']})" if d["previous"] else ""
    print(f"promote: {d['model_name']} v{d['version']} -> @champion{was}: {d['description']}")
    return 0
