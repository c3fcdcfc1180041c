"""The champion gate and its replay: pure functions of a registered model's versions (no mlflow).

The aliases are a pure function of the registry's own versions: every version, replayed in version
order through the gate (a better test metric than the champion's on this version's own test
split, by more than `register.min_delta`; never below `register.min_value`; with
`register.require_significance`, a paired interval that clears min_delta), gives the champion
(the last one promoted) and the challenger (the last one not promoted). A champion scored on
other test images is re-scored on the new version's test split by `register`, which records the
score on the champion (a tag keyed by that split's sha256): the replay reads it from there. Each
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
    DATA_TEST,
    GATE_DELTA,
    GATE_FLOOR,
    GATE_METRIC,
    GATE_SIGNIFICANCE,
    INPUT_SHAPE,
    MODEL_DATASET,
    MODEL_FILES,
    MODEL_SHAPE,
    PROMOTIONS,
    paired,
    rescored,
    test_metric,
)

CHAMPION, CHALLENGER = "champion", "challenger"


def shape_text(shape: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(int(n)) for n in shape)


@dataclass(frozen=True)
class Gate:
    """The registered model's gate (its tags): every process applies the same one."""

    metric: str
    min_delta: float = 0.0
    floor: float | None = None  # register.min_value: never champion below it
    significance: bool = False  # register.require_significance: the interval must clear min_delta

    def tags(self) -> dict[str, str]:
        return {GATE_METRIC: self.metric, GATE_DELTA: repr(float(self.min_delta)),
                GATE_FLOOR: "none" if self.floor is None else repr(float(self.floor)),
                GATE_SIGNIFICANCE: str(self.significance).lower()}

    @classmethod
    def of(cls, stored: dict[str, str]) -> Gate:
        """The gate a registered model's tags hold (a tag it lacks: the default)."""
        floor = stored.get(GATE_FLOOR, "none")
        return cls(stored[GATE_METRIC], float(stored.get(GATE_DELTA, "0")),
                   None if floor == "none" else float(floor),
                   stored.get(GATE_SIGNIFICANCE, "false") == "true")


def test_identity(tags: dict[str, str]) -> str | None:
    """Which test images a version was scored on: its test split's sha256. A version registered
    before reprolab recorded it is known by its raw data's manifest (as the gate compared them
    then); None: neither (not registered by reprolab)."""
    if tags.get(DATA_TEST):
        return tags[DATA_TEST]
    return f"manifest:{tags[DATA_MANIFEST]}" if tags.get(DATA_MANIFEST) else None


@dataclass(frozen=True)
class Need:
    """A score the replay needs and the registry does not hold: `champion` scored on the test
    split `test` (and, with significance, compared with `version` image by image). The next
    `register` that holds that test split computes it (register.py)."""

    champion: str
    version: str
    test: str


def decide(value: float, tags: dict[str, str], champion: dict[str, Any] | None, gate: Gate,
           number: str = "") -> tuple[bool | None, str]:
    """-> (promote, reason); promote None: a score it needs is missing (the champion stays).
    Pure: the gate, apart from the registry."""
    metric, shape, test = gate.metric, tags.get(INPUT_SHAPE), test_identity(tags)
    if gate.floor is not None and value < gate.floor:
        return False, f"test/{metric} {value:.4f} is below the floor min_value {gate.floor:g}"
    if champion is None:
        floor = f", at or above min_value {gate.floor:g}" if gate.floor is not None else ""
        return True, f"test/{metric} {value:.4f}{floor}: the first score, no champion to beat"
    held, c = champion["tags"], champion["version"]
    if shape and held.get(INPUT_SHAPE, shape) != shape:
        return False, f"champion v{c} takes {held[INPUT_SHAPE]} images, this one {shape}; " \
            "not comparable"
    if test_identity(held) == test:
        best, where = float(held[test_metric(metric)]), "on the same test split"
    else:
        score = held.get(rescored(test, metric))
        if score is None:
            return None, (f"champion v{c} has no score on this version's test split "
                          f"({test[:12]}) yet: kept; the next `register` with that split "
                          "scores it")
        if not _number(score):
            return False, (f"champion v{c} is not comparable on this test split: "
                           f"{score.removeprefix('not comparable: ')}")
        best, where = float(score), f"re-scored on this version's test split ({test[:12]})"
    if value <= best + gate.min_delta:
        return False, (f"test/{metric} {value:.4f} does not beat champion v{c} {best:.4f} "
                       f"({where}) by more than min_delta {gate.min_delta:g}")
    reason = f"test/{metric} {value:.4f} beats champion v{c} {best:.4f} ({where})"
    if not gate.significance:
        return True, reason
    if not held.get(MODEL_FILES):  # its bytes cannot be checked, so it is never read again
        return True, (f"{reason}; no paired comparison: v{c} was registered without file "
                      "hashes")
    low = tags.get(paired(c, test, "low"))
    if low is None:
        return None, (f"{reason}, but no paired comparison with v{c} is recorded yet: kept; the "
                      "next `register` with that split makes it")
    if float(low) <= gate.min_delta:
        return False, (f"{reason}, but not significantly: the 95% interval of the difference "
                       f"starts at {float(low):.4f}, not above min_delta {gate.min_delta:g}")
    return True, f"{reason}, significantly (95% interval from {float(low):.4f})"


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Replay:
    champion: str | None
    challenger: str | None
    verdicts: dict[str, tuple[bool, str]]  # version -> (promoted at its turn, why)
    needs: list[Need] = field(default_factory=list)  # scores it lacked (the champion stayed)
    compared: dict[str, str] = field(default_factory=dict)  # version -> the champion it met
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


def replay(versions: list[dict[str, Any]], gate: Gate) -> Replay:
    """Registering `versions` one by one in version order, with the promotions by hand where they
    happened: who ends champion and challenger, and why each version holds what it holds.

    Pure: the scores it compares are the versions' tags, a champion's re-scores on other test
    splits and the paired comparisons included. Where one it needs is missing, the champion
    stays and `needs` says which. A version without this metric's test tag (not registered by
    reprolab) takes no part, and its description says so.
    """
    champion: dict[str, Any] | None = None
    challenger: str | None = None
    verdicts: dict[str, tuple[bool, str]] = {}
    why: dict[str, str] = {}
    replaced_by: dict[str, str] = {}
    needs: list[Need] = []
    compared: dict[str, str] = {}
    for version, after in events(versions):
        number, tags = version["version"], version["tags"]
        if after is not None:  # promoted by hand: champion whatever the gate says
            why[number] = f"promoted by hand (`reprolab promote`) after v{after} was registered"
            if champion is not None and champion["version"] != number:
                replaced_by[champion["version"]] = number
                why[number] += f", replacing v{champion['version']}"
            champion = version
            challenger = None if challenger == number else challenger
            continue
        if test_metric(gate.metric) not in tags or test_identity(tags) is None:
            verdicts[number] = (False, f"no test/{gate.metric} tag; not compared")
            why[number] = f"not compared when registered: it has no test/{gate.metric} tag"
            continue
        promote, reason = decide(float(tags[test_metric(gate.metric)]), tags, champion, gate)
        if champion is not None:
            compared[number] = champion["version"]
        if promote is None:
            needs.append(Need(champion["version"], number, test_identity(tags)))
        verdicts[number] = (bool(promote), reason)
        why[number] = f"{'promoted' if promote else 'not promoted'} when registered: {reason}"
        if promote:
            if champion is not None:
                replaced_by[champion["version"]] = number
            champion = version
        else:
            challenger = number
    return Replay(champion["version"] if champion else None, challenger, verdicts, needs,
                  compared, why, replaced_by)


def description(number: str, result: Replay) -> str:
    """Why version `number` holds its alias (or none), from the replay: one paragraph for the
    version's page."""
    why = result.why.get(number, "not replayed")
    if number == result.champion:
        return f"Holds @{CHAMPION}: {why}."
    if number == result.challenger:
        return f"Holds @{CHALLENGER} (the latest version not promoted): {why}."
    if number in result.replaced_by:
        return f"No alias: a former champion, replaced by v{result.replaced_by[number]}; {why}."
    later = f"; v{result.challenger} is a later challenger" if result.challenger else ""
    return f"No alias: {why}{later}."


def model_description(gate: Gate, dataset: str, shape: str, classes: list[str]) -> str:
    """The registered model's description: what it holds and how its aliases move."""
    names = ", ".join(classes[:12]) + (f", ... ({len(classes)} in all)" if len(classes) > 12
                                       else "")
    rules = [f"its test/{gate.metric} beats the champion's by more than min_delta "
             f"{gate.min_delta:g}, on the new version's test split"]
    if gate.floor is not None:
        rules.append(f"it is at least min_value {gate.floor:g}")
    if gate.significance:
        rules.append("the 95% interval of the paired difference clears min_delta")
    return (f"Image classifiers of the {dataset} data ({shape} uint8 images, classes {names}), "
            f"registered by reprolab's register stage. A new version becomes @{CHAMPION} when "
            f"{' and '.join(rules)}; otherwise it becomes @{CHALLENGER}. `reprolab promote` "
            "moves @champion by hand. Each version's description says why it holds its alias, "
            "or none; its tags hold its lineage (git.commit, data.manifest_sha256, "
            "params_hash) and its test metrics.")


def check_gate(name: str, stored: dict[str, str], gate: Gate) -> None:
    """Processes with different gates would undo each other's aliases: refuse a mismatch."""
    for key, value in gate.tags().items():
        if key in stored and stored[key] != value:
            held = Gate.of({**gate.tags(), **stored})
            raise ConfigError(
                f"register: registered model {name!r} is gated on {held.metric}, min_delta "
                f"{held.min_delta:g}, min_value {held.floor}, require_significance "
                f"{str(held.significance).lower()} (its tags); this config says "
                f"{gate.metric}, {gate.min_delta:g}, {gate.floor}, "
                f"{str(gate.significance).lower()}: use its, or another register.model_name"
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
    """What the replay reads: the versions, their promotions by hand, their scores."""
    return [(v["version"], repr(sorted(v["tags"].items()))) for v in versions]
