"""register stage: a registry version with lineage; alias `champion` moves only to a better model.

One registered model per dataset and input shape (`register.model_name: null` derives the name
from the dataset; the registered model's tags hold its dataset and input shape, and a model of
another shape is refused): champions are compared only where comparing means something.

The aliases are a pure function of the registry's own versions: every version, replayed in version
order through the gate (same test data, better test metric by more than `register.min_delta`),
gives the champion (the last one promoted) and the challenger (the last one not promoted). Each
`register` adds its version, recomputes both from all versions and writes them, and repeats when
the set of versions changed meanwhile. So any number of processes on any number of machines,
interleaved in any order, leave the aliases that registering them one by one would have left.
A model file (its sha256) is registered once, also when two machines register it at once.
`reports/register/decision.json` reports that final state.

`reprolab promote NAME VERSION` moves `champion` by hand. The replay must not undo it, so the
promotion is itself an event of the replay: a tag on the promoted version records after which
version number it happened (and when, to order two promotions between the same registrations).
The replay applies it there (the version becomes champion whatever the gate says) and gates every
later version against it, so the next `register` keeps it unless a later version beats it.
Every version's description says why it holds its alias, from the same replay.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from reprolab.config import Config
from reprolab.errors import ConfigError, DataError
from reprolab.io import read_json, sha256_file, write_json

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
DECISION_FILE = "decision.json"
DATA_TAG = "data.manifest_sha256"
DATASET_TAG = "data.dataset"
# C x H x W that the version's model takes, e.g. "1x8x8"
SHAPE_TAG = "model.input_shape"
# The gate is the registered model's, not one process's: every register of one model must agree.
GATE_METRIC_TAG, GATE_DELTA_TAG = "reprolab.gate.metric", "reprolab.gate.min_delta"
# What the registered model holds: one dataset, one input shape.
MODEL_DATASET_TAG, MODEL_SHAPE_TAG = "reprolab.dataset", "reprolab.input_shape"
# On a version: its promotions by hand, "AFTER@UTC-TIME" separated by spaces (AFTER: the highest
# version number when it was promoted).
PROMOTIONS_TAG = "reprolab.promotions"


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


def decide(
    metric: str, value: float, data_hash: str, champion: dict[str, Any] | None, min_delta: float,
    shape: str | None = None,
) -> tuple[bool, str]:
    """-> (promote, reason). Pure: the gate, apart from the registry."""
    if champion is None:
        return True, "no champion yet"
    tags = champion["tags"]
    if shape and tags.get(SHAPE_TAG, shape) != shape:
        return False, (
            f"champion v{champion['version']} takes {tags[SHAPE_TAG]} images, this one {shape}; "
            "not comparable"
        )
    if tags.get(DATA_TAG) != data_hash:
        return False, (
            f"champion v{champion['version']} was evaluated on other test data "
            f"({tags.get(DATA_TAG, 'unknown')[:12]} vs {data_hash[:12]}); not comparable "
            "(promote it by hand: `reprolab promote NAME VERSION`)"
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
    # version -> why it got its last alias (registration or promotion by hand)
    why: dict[str, str] = field(default_factory=dict)
    replaced_by: dict[str, str] = field(default_factory=dict)  # former champion -> successor


def promotions(tags: dict[str, str]) -> list[tuple[int, str]]:
    """A version's promotions by hand -> [(after version number, UTC time)]."""
    out = []
    for entry in tags.get(PROMOTIONS_TAG, "").split():
        after, _, when = entry.partition("@")
        if after.isdigit():
            out.append((int(after), when))
    return out


def events(versions: list[dict[str, Any]]) -> list[tuple[dict[str, Any], int | None]]:
    """Registrations in version order, each promotion by hand right after the version number it
    followed: -> [(version, None for its registration or the AFTER of a promotion)]."""
    keyed = []
    for version in versions:
        keyed.append(((int(version["version"]), 0, ""), version, None))
        for after, when in promotions(version["tags"]):
            keyed.append(((after, 1, when), version, after))
    return [(version, after) for _, version, after in sorted(keyed, key=lambda e: e[0])]


def replay(versions: list[dict[str, Any]], metric: str, min_delta: float) -> Replay:
    """Registering `versions` one by one in version order, with the promotions by hand where they
    happened: who ends champion and challenger, and why each version holds what it holds.

    Pure. A version without this metric's test tag (not registered by reprolab) takes no part.
    """
    champion: dict[str, Any] | None = None
    challenger: str | None = None
    verdicts: dict[str, tuple[bool, str]] = {}
    why: dict[str, str] = {}
    replaced_by: dict[str, str] = {}
    for version, after in events(versions):
        number, tags = version["version"], version["tags"]
        if after is not None:  # promoted by hand: champion whatever the gate says
            if champion is not None and champion["version"] != number:
                replaced_by[champion["version"]] = number
                why[number] = (f"promoted by hand (`reprolab promote`) after v{after}, "
                               f"replacing v{champion['version']}")
            else:
                why[number] = f"promoted by hand (`reprolab promote`) after v{after}"
            champion = version
            challenger = None if challenger == number else challenger
            continue
        if f"test/{metric}" not in tags or DATA_TAG not in tags:
            verdicts[number] = (False, f"no test/{metric} tag; not compared")
            why[number] = f"at registration: {verdicts[number][1]}"
            continue
        promote, reason = decide(metric, float(tags[f"test/{metric}"]), tags[DATA_TAG],
                                 champion, min_delta, tags.get(SHAPE_TAG))
        verdicts[number] = (promote, reason)
        why[number] = f"at registration: {reason}"
        if promote:
            if champion is not None:
                replaced_by[champion["version"]] = number
            champion = version
        else:
            challenger = number
    return Replay(champion["version"] if champion else None, challenger, verdicts, why,
                  replaced_by)


def description(number: str, result: Replay) -> str:
    """Why version `number` holds its alias (or none), from the replay."""
    why = result.why.get(number, "not replayed")
    if number == result.champion:
        return f"@{CHAMPION}: {why}"
    if number == result.challenger:
        return f"@{CHALLENGER}: {why}"
    if number in result.replaced_by:
        return f"no alias: {why}; replaced as champion by v{result.replaced_by[number]}"
    later = f"; v{result.challenger} is the later challenger" if result.challenger else ""
    return f"no alias: {why}{later}"


def evaluated_metrics(cfg: Config) -> tuple[dict[str, float], str]:
    """-> (the test metrics, the model's sha256), refused unless evaluate measured the very
    model in models/."""
    metrics_path, model_path = cfg.metrics_file, cfg.model_file
    if not model_path.is_file():
        raise DataError(f"{model_path}: not found; run `reprolab train` and `reprolab evaluate` "
                        "(or `dvc repro`) first")
    for path in (metrics_path, cfg.evaluated_file):
        if not path.is_file():
            raise DataError(f"{path}: not found; run `reprolab evaluate` (or `dvc repro`) first")
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


def check_holds(name: str, stored: dict[str, str], dataset: str, shape: str) -> None:
    """One registered model, one dataset and input shape: a champion of 8x8 digits must never be
    compared with, or replaced by, a model of 28x28 MNIST images (nor served in its place)."""
    held = (stored.get(MODEL_DATASET_TAG, dataset), stored.get(MODEL_SHAPE_TAG, shape))
    if held != (dataset, shape):
        raise ConfigError(
            f"register.model_name: registered model {name!r} holds {held[0]} models that take "
            f"{held[1]} images (its tags); this one is {dataset}, {shape}: use another "
            "register.model_name, or null (reprolab-<dataset>)"
        )


def registered_model(name: str, metric: str, min_delta: float, dataset: str, shape: str
                     ) -> None:
    """Create the registered model with its gate, dataset and shape, or check that it has them
    (a model registered before a tag existed adopts it)."""
    from reprolab import tracking

    want = {GATE_METRIC_TAG: metric, GATE_DELTA_TAG: repr(float(min_delta)),
            MODEL_DATASET_TAG: dataset, MODEL_SHAPE_TAG: shape}
    stored = tracking.ensure_registered_model(name, want)
    check_gate(name, stored, metric, min_delta)
    check_holds(name, stored, dataset, shape)
    missing = {k: v for k, v in want.items() if k not in stored}
    if missing:
        tracking.set_registered_model_tags(name, missing)


def replay_state(versions: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """What the replay reads: the versions and their promotions by hand."""
    return [(v["version"], v["tags"].get(PROMOTIONS_TAG, "")) for v in versions]


def settle_aliases(name: str, metric: str, min_delta: float) -> tuple[Replay, list[str]]:
    """Write the aliases and descriptions that the replay of all versions gives; again while
    versions (or promotions) appear.

    A process that computed from an older set of versions sees the newer one after writing and
    writes again, so the last write to each alias is made from every version there is.
    """
    from reprolab import tracking

    versions = tracking.model_versions(name)
    while True:
        result = replay(versions, metric, min_delta)
        written = [tracking.set_alias(name, CHAMPION, result.champion),
                   tracking.set_alias(name, CHALLENGER, result.challenger)]
        for version in versions:
            text = description(version["version"], result)
            if text != version["description"]:
                written.append(tracking.set_description(name, version["version"], text))
        now = tracking.model_versions(name)
        if all(written) and replay_state(now) == replay_state(versions):
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


def skipped(cfg: Config, metrics: dict[str, float]) -> dict[str, Any]:
    """register.enabled: false (an experiment): decision.json says so; the registry is not
    touched."""
    metric = cfg.register.metric
    decision = {
        "model_name": cfg.registered_model_name, "version": None, "alias": None,
        "promoted": False, "skipped": True,
        "reason": "register.enabled is false: not registered",
        "metric": f"test/{metric}", "value": float(metrics[metric]),
        "champion": None, "challenger": None,
    }
    write_json(cfg.report_dir("register") / DECISION_FILE, decision)
    return decision


def run(cfg: Config) -> dict[str, Any]:
    from reprolab import tracking

    metrics, model_hash = evaluated_metrics(cfg)
    if not cfg.register.enabled:
        return skipped(cfg, metrics)
    tracking.configure(cfg)
    run_info = tracking.training_run_for(cfg.model_file, model_hash, cfg.tracking.experiment)
    name, metric, min_delta = cfg.registered_model_name, cfg.register.metric, \
        cfg.register.min_delta
    # the shape the logged model takes (its signature), the dataset its run trained on
    shape = shape_text(tracking.model_input_shape(run_info["model_uri"]))
    dataset = run_info["tags"].get(DATASET_TAG, cfg.data.dataset)
    registered_model(name, metric, min_delta, dataset, shape)

    tags = {
        **run_info["tags"],
        "training_run_id": run_info["run_id"],
        SHAPE_TAG: shape,
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
        "skipped": False,
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
    if d["skipped"]:
        print(f"register: skipped ({d['reason']}); {d['metric']} {d['value']:.4f}")
        return
    where = f"@{d['alias']}" if d["alias"] else f"no alias (champion is v{d['champion']})"
    print(f"register: {d['model_name']} v{d['version']} -> {where}: {d['reason']}")


# ---- `reprolab promote NAME VERSION`: champion by hand ----


def check_lineage(name: str, version: dict[str, Any], stored: dict[str, str], metric: str
                  ) -> None:
    """The checks register makes, for a version chosen by hand: it carries reprolab's lineage,
    fits the registered model's dataset and shape, and its training run (FINISHED, in this
    store) wrote that very model and holds the test metric the version records."""
    from reprolab import tracking

    number, tags = version["version"], version["tags"]
    where = f"{name} v{number}"
    for key in (tracking.MODEL_HASH_TAG, DATA_TAG, f"test/{metric}", "training_run_id"):
        if key not in tags:
            raise DataError(f"{where}: no {key} tag (not registered by `reprolab register`); "
                            "only a version with its lineage can become champion")
    for key, model_key in ((SHAPE_TAG, MODEL_SHAPE_TAG), (DATASET_TAG, MODEL_DATASET_TAG)):
        if model_key in stored and tags.get(key) != stored[model_key]:
            raise DataError(f"{where}: {key} {tags.get(key)}, but registered model {name!r} "
                            f"holds {stored[model_key]} (its tags); not promoted")
    run_id = tags["training_run_id"]
    record = tracking.run_record(run_id)
    if record is None or record["status"] != "FINISHED":
        state = "not in this MLflow store" if record is None else record["status"]
        raise DataError(f"{where}: its training run {run_id} is {state}; not promoted")
    if record["tags"].get(tracking.MODEL_HASH_TAG) != tags[tracking.MODEL_HASH_TAG]:
        raise DataError(f"{where}: its training run {run_id} did not write this model "
                        f"({tracking.MODEL_HASH_TAG} differs); not promoted")
    logged = record["metrics"].get(f"test/{metric}")
    if logged is None or abs(logged - float(tags[f"test/{metric}"])) > 1e-6:
        raise DataError(f"{where}: test/{metric} {tags[f'test/{metric}']} is not what evaluate "
                        f"logged on run {run_id} ({logged}); not promoted")


def promote(name: str, number: str) -> dict[str, Any]:
    """Make version `number` of `name` the champion, recorded as a promotion tag that every
    later replay applies where it happened. MLflow must point at the registry's store."""
    from reprolab import tracking

    version = tracking.registered_version(f"models:/{name}/{number}")  # refuses a missing one
    number = version["version"]
    stored = tracking.registered_model_tags(name)
    metric = stored.get(GATE_METRIC_TAG)
    if metric is None:
        raise DataError(f"registered model {name!r}: no {GATE_METRIC_TAG} tag (not created by "
                        "`reprolab register`); nothing to promote through")
    min_delta = float(stored.get(GATE_DELTA_TAG, "0"))
    check_lineage(name, version, stored, metric)
    versions = tracking.model_versions(name)
    before = replay(versions, metric, min_delta).champion
    if before != number:
        after = max(int(v["version"]) for v in versions)
        when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        entries = f"{version['tags'].get(PROMOTIONS_TAG, '')} {after}@{when}".strip()
        tracking.set_version_tag(name, number, PROMOTIONS_TAG, entries)
    result, _ = settle_aliases(name, metric, min_delta)
    return {"model_name": name, "version": number, "previous": before,
            "champion": result.champion, "challenger": result.challenger,
            "description": description(number, result)}


def promote_main(cfg: Config | None, args: Any) -> int:
    from reprolab import tracking

    tracking.use_store(cfg)
    d = promote(args.name, args.version)
    if d["previous"] == d["version"]:
        print(f"promote: {d['model_name']} v{d['version']} is already @champion")
        return 0
    was = f" (was v{d['previous']})" if d["previous"] else ""
    print(f"promote: {d['model_name']} v{d['version']} -> @champion{was}: {d['description']}")
    return 0
