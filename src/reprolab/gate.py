"""The champion gate and its replay: pure functions of a registered model's versions (no mlflow).

The aliases are a pure function of the registry's own versions: every version, replayed in version
order through the gate (same test data, better test metric by more than `register.min_delta`),
gives the champion (the last one promoted) and the challenger (the last one not promoted). Each
`register` adds its version, recomputes both from all versions and writes them, and repeats when
the set of versions changed meanwhile. So any number of processes on any number of machines,
interleaved in any order, leave the aliases that registering them one by one would have left.

`reprolab promote NAME VERSION` moves `champion` by hand. The replay must not undo it, so the
promotion is itself an event of the replay: a tag on the promoted version records after which
version number it happened (and when, to order two promotions between the same registrations).
The replay applies it there (the version becomes champion whatever the gate says) and gates every
later version against it, so the next `register` keeps it unless a later version beats it.
Every version's description says why it holds its alias, from the same replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from reprolab.errors import ConfigError
from reprolab.tags import (
    DATA_MANIFEST,
    GATE_DELTA,
    GATE_METRIC,
    INPUT_SHAPE,
    MODEL_DATASET,
    MODEL_SHAPE,
    PROMOTIONS,
    test_metric,
)

CHAMPION, CHALLENGER = "champion", "challenger"


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
    if shape and tags.get(INPUT_SHAPE, shape) != shape:
        return False, (
            f"champion v{champion['version']} takes {tags[INPUT_SHAPE]} images, this one {shape}; "
            "not comparable"
        )
    if tags.get(DATA_MANIFEST) != data_hash:
        return False, (
            f"champion v{champion['version']} was evaluated on other test data "
            f"({tags.get(DATA_MANIFEST, 'unknown')[:12]} vs {data_hash[:12]}); not comparable "
            "(promote it by hand: `reprolab promote NAME VERSION`)"
        )
    best = float(tags[test_metric(metric)])
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
    for entry in tags.get(PROMOTIONS, "").split():
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
        if test_metric(metric) not in tags or DATA_MANIFEST not in tags:
            verdicts[number] = (False, f"no test/{metric} tag; not compared")
            why[number] = f"at registration: {verdicts[number][1]}"
            continue
        promote, reason = decide(metric, float(tags[test_metric(metric)]), tags[DATA_MANIFEST],
                                 champion, min_delta, tags.get(INPUT_SHAPE))
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


def check_gate(name: str, stored: dict[str, str], metric: str, min_delta: float) -> None:
    """Processes with different gates would undo each other's aliases: refuse a mismatch."""
    want = {GATE_METRIC: metric, GATE_DELTA: repr(float(min_delta))}
    for key, value in want.items():
        if key in stored and stored[key] != value:
            raise ConfigError(
                f"register.metric/min_delta = {metric}/{min_delta:g}: registered model {name!r} "
                f"is gated on {stored.get(GATE_METRIC)}/{stored.get(GATE_DELTA)} "
                "(its tags); use those, or another register.model_name"
            )


def check_holds(name: str, stored: dict[str, str], dataset: str, shape: str) -> None:
    """One registered model, one dataset and input shape: a champion of 8x8 digits must never be
    compared with, or replaced by, a model of 28x28 MNIST images (nor served in its place)."""
    held = (stored.get(MODEL_DATASET, dataset), stored.get(MODEL_SHAPE, shape))
    if held[0] == "imagefolder" and dataset.startswith("imagefolder-"):
        # registered before each folder's source had a name of its own: the model's name
        # (reprolab-imagefolder-<folder>) tied it to one folder then too
        held = (dataset, held[1])
    if held != (dataset, shape):
        raise ConfigError(
            f"register.model_name: registered model {name!r} holds {held[0]} models that take "
            f"{held[1]} images (its tags); this one is {dataset}, {shape}: use another "
            "register.model_name, or null (reprolab-<dataset>)"
        )


def replay_state(versions: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """What the replay reads: the versions and their promotions by hand."""
    return [(v["version"], v["tags"].get(PROMOTIONS, "")) for v in versions]
