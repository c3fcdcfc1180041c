"""register stage: a registry version with lineage; alias `champion` moves only to a better model
(the gate: `reprolab.gate`).

One registered model per dataset and input shape (`register.model_name: null` derives the name
from the dataset; the registered model's tags hold its dataset and input shape, and a model of
another shape is refused): champions are compared only where comparing means something.
A model file (its sha256) is registered once, also when two machines register it at once.
`reports/register/decision.json` reports the final state of the aliases.
"""

from __future__ import annotations

import logging
from typing import Any

from reprolab.config import Config
from reprolab.data import load_meta
from reprolab.errors import DataError
from reprolab.files import read_json, sha256_file, write_json
from reprolab.gate import (
    CHALLENGER,
    CHAMPION,
    Gate,
    Replay,
    check_gate,
    check_holds,
    description,
    model_description,
    replay,
    replay_state,
    shape_text,
)
from reprolab.tags import (
    DATA_TEST,
    DATASET,
    INPUT_SHAPE,
    MODEL_DATASET,
    MODEL_HASH,
    MODEL_SHAPE,
    TRAINING_RUN,
    paired,
    test_metric,
)

log = logging.getLogger(__name__)

DECISION_FILE = "decision.json"

def evaluated_metrics(cfg: Config) -> tuple[dict[str, float], str, str]:
    """-> (the test metrics, the model's sha256, the test split's sha256), refused unless
    evaluate measured the very model in models/ on the test split in processed/."""
    metrics_path, model_path = cfg.metrics_file, cfg.model_file
    if not model_path.is_file():
        raise DataError(f"{model_path}: not found; run `reprolab train` and `reprolab evaluate` "
                        "(or `dvc repro`) first")
    for path in (metrics_path, cfg.evaluated_file):
        if not path.is_file():
            raise DataError(f"{path}: not found; run `reprolab evaluate` (or `dvc repro`) first")
    evaluated = read_json(cfg.evaluated_file)
    measured, model_hash = str(evaluated.get("model_sha256")), sha256_file(model_path)
    if measured != model_hash:
        raise DataError(
            f"{metrics_path}: measures model {measured[:12]}, not {model_path} "
            f"({model_hash[:12]}); run `reprolab evaluate` (or `dvc repro`) before registering"
        )
    test = load_meta(cfg.processed_dir)["split_sha256"]["test"]
    if evaluated.get("test_sha256") != test:
        raise DataError(f"{metrics_path}: measures another test split than the one in "
                        f"{cfg.processed_dir}; run `reprolab evaluate` (or `dvc repro`) before "
                        "registering")
    return read_json(metrics_path), model_hash, test


def gate_of(cfg: Config) -> Gate:
    r = cfg.register
    return Gate(r.metric, r.min_delta, r.min_value, r.require_significance)


def registered_model(name: str, gate: Gate, dataset: str, shape: str, classes: list[str]
                     ) -> None:
    """Create the registered model with its gate, dataset, shape and description, or check that
    it has them (a model registered before a tag existed adopts it)."""
    from reprolab import registry

    want = {**gate.tags(), MODEL_DATASET: dataset, MODEL_SHAPE: shape}
    stored = registry.ensure_registered_model(
        name, want, model_description(gate, dataset, shape, classes))
    check_gate(name, stored, gate)
    check_holds(name, stored, dataset, shape)
    missing = {k: v for k, v in want.items() if k not in stored}
    if missing:
        registry.set_registered_model_tags(name, missing)


def settle_aliases(name: str, gate: Gate) -> tuple[Replay, list[str]]:
    """Write the aliases and descriptions that the replay of all versions gives; again while
    versions (or promotions) appear.

    A process that computed from an older set of versions sees the newer one after writing and
    writes again, so the last write to each alias is made from every version there is.
    """
    from reprolab import registry

    def describe(version: dict[str, Any], result: Replay) -> bool:
        text = description(version["version"], result)
        return text == version["description"] or \
            registry.set_description(name, version["version"], text)

    versions = registry.model_versions(name)
    while True:
        result = replay(versions, gate)
        # A version is described before an alias moves to it, the others after: a kill in
        # between leaves a complete version that no alias points to (the next run adopts it)
        # or a former champion whose description lags by one step (the next run mends it).
        holders = {result.champion, result.challenger}
        written = [describe(v, result) for v in versions if v["version"] in holders]
        written += [registry.set_alias(name, CHAMPION, result.champion),
                    registry.set_alias(name, CHALLENGER, result.challenger)]
        written += [describe(v, result) for v in versions if v["version"] not in holders]
        now = registry.model_versions(name)
        if all(written) and replay_state(now) == replay_state(versions):
            return result, [v["version"] for v in now]
        versions = now


def one_version_per_model(name: str, version: str, model_hash: str) -> str:
    """Two machines registering the same model file at the same instant both create a version;
    the one with the higher number deletes its own, so each model is registered once."""
    from reprolab import registry

    same = [v["version"] for v in registry.model_versions(name)
            if v["tags"].get(MODEL_HASH) == model_hash]
    first = min(same, key=int, default=version)
    if first != version:
        registry.delete_version(name, version)
    return first


def skipped(cfg: Config, metrics: dict[str, float]) -> dict[str, Any]:
    """register.enabled: false (an experiment): decision.json says so; the registry is not
    touched."""
    metric = cfg.register.metric
    decision = {
        "model_name": cfg.registered_model_name, "version": None, "alias": None,
        "promoted": False, "skipped": True,
        "reason": "register.enabled is false: not registered",
        "metric": test_metric(metric), "value": float(metrics[metric]),
        "champion": None, "challenger": None,
    }
    write_json(cfg.report_dir("register") / DECISION_FILE, decision)
    return decision


def run(cfg: Config) -> dict[str, Any]:
    from reprolab import registry, tracking

    metrics, model_hash, test = evaluated_metrics(cfg)
    if not cfg.register.enabled:
        return skipped(cfg, metrics)
    tracking.configure(cfg)
    run_info = tracking.training_run_for(cfg.model_file, model_hash, cfg.tracking.experiment)
    name, gate = cfg.registered_model_name, gate_of(cfg)
    # the shape the logged model takes (its signature), the dataset its run trained on
    shape = shape_text(tracking.model_input_shape(run_info["model_uri"]))
    dataset = run_info["tags"].get(DATASET, cfg.data.dataset)
    registered_model(name, gate, dataset, shape, load_meta(cfg.processed_dir)["classes"])
    # the logged model's bytes are the ones its run recorded (none swapped since training)
    what = f"the model of training run {run_info['run_id']}"
    recorded = registry.recorded_files(run_info["tags"], what, made="trained")
    registry.check_logged(run_info["model_uri"], recorded, what)

    tags = {
        **run_info["tags"],
        TRAINING_RUN: run_info["run_id"],
        INPUT_SHAPE: shape,
        DATA_TEST: test,
        **{test_metric(k): f"{v:.6f}" for k, v in metrics.items()},
    }
    version = registry.register_version(name, run_info["model_uri"], run_info["run_id"], tags)
    version = one_version_per_model(name, version, tags[MODEL_HASH])
    registry.link_logged_model(run_info["model_uri"], name, version)
    score_what_the_gate_needs(cfg, name, gate, version, test, shape)
    result, _ = settle_aliases(name, gate)
    promoted, reason = result.verdicts[version]
    alias = {result.champion: CHAMPION, result.challenger: CHALLENGER}.get(version)
    decision = {
        "model_name": name,
        "version": version,
        "alias": alias,
        "promoted": promoted,
        "skipped": False,
        "reason": reason,
        "metric": test_metric(gate.metric),
        "value": float(metrics[gate.metric]),
        "min_value": gate.floor,
        "champion": result.champion,
        "challenger": result.challenger,
        "paired": paired_comparison(name, version, result.compared.get(version), test, gate),
    }
    write_json(cfg.report_dir("register") / DECISION_FILE, decision)
    log.info("register: %s v%s -> %s (%s)", name, version, alias, reason)
    return decision


def score_what_the_gate_needs(cfg: Config, name: str, gate: Gate, version: str, test: str,
                              shape: str) -> None:
    """The scores the gate needs on this project's test split and the registry lacks (the
    champion re-scored on it; the paired comparison of this version with the champion it
    meets), computed and recorded on the versions; again while the replay asks for more."""
    from reprolab import registry, rescore
    from reprolab.data import load_meta, load_split
    from reprolab.metrics import user_metrics

    extra = user_metrics(cfg.evaluate.metrics, cfg.base_dir)
    meta, split = load_meta(cfg.processed_dir), None
    for _ in range(3):  # each round's scores may move the champion another version meets
        versions = registry.model_versions(name)
        result = replay(versions, gate)
        pairs = [(need.champion, need.version) for need in result.needs]
        if version in result.compared:
            pairs.append((result.compared[version], version))
        if not pairs:  # no champion met: nothing to score (and no test split to read)
            return
        if split is None:
            split = load_split(cfg.processed_dir, "test")
        adds = rescore.tags_to_add(name, versions, pairs, test, split, meta["classes"], shape,
                                   gate, extra)
        if not adds:
            return
        for number, key, value in adds:
            registry.set_version_tag(name, number, key, value)


def paired_comparison(name: str, version: str, champion: str | None, test: str, gate: Gate
                      ) -> dict[str, Any] | None:
    """The paired comparison of `version` with the champion it met, as recorded on it."""
    from reprolab import registry

    if champion is None:
        return None
    held = registry.registered_version(f"models:/{name}/{version}")["tags"]
    if paired(champion, test, "difference") not in held:
        return None
    return {"against": champion, "metric": test_metric(gate.metric),
            "difference": float(held[paired(champion, test, "difference")]),
            "interval_95": [float(held[paired(champion, test, "low")]),
                            float(held[paired(champion, test, "high")])],
            "require_significance": gate.significance}


def main(cfg: Config, args: Any) -> None:
    d = run(cfg)
    if d["skipped"]:
        print(f"register: skipped ({d['reason']}); {d['metric']} {d['value']:.4f}")
        return
    where = f"@{d['alias']}" if d["alias"] else f"no alias (champion is v{d['champion']})"
    print(f"register: {d['model_name']} v{d['version']} -> {where}: {d['reason']}")
