"""Registered versions scored on this project's test split, for the gate: a champion re-scored
on the test images of a newer version (its data grew or changed), and two versions compared
image by image (a paired bootstrap of the gate's metric). What is computed is recorded as tags
(tags.rescored, tags.paired), so the gate's replay stays a pure function of the registry.

register calls it; the models are read from the registry with their bytes checked
(registry.load_classifier), the metrics are evaluate's (reprolab.metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from reprolab.gate import Gate, test_identity
from reprolab.metrics import BUILTIN, paired_bootstrap, score
from reprolab.tags import INPUT_SHAPE, MODEL_FILES, paired, rescored

log = logging.getLogger(__name__)


def probabilities(name: str, version: str, x: Any, batch_size: int = 512) -> Any:
    """A registered version's class probabilities for images x (a mapped split is read a batch
    at a time), its files checked first; -> (N x K probabilities, its class names)."""
    import torch

    from reprolab import registry

    model, _, classes = registry.load_classifier(f"models:/{name}/{version}")
    with torch.no_grad():
        probs = [model(x[i : i + batch_size].float()).numpy() for i in range(0, len(x),
                                                                            batch_size)]
    return np.concatenate(probs), classes


def comparable(champion: dict[str, Any], shape: str, classes: list[str],
               champion_classes: list[str]) -> str | None:
    """Why a champion cannot be scored on this test split (another input shape, other classes),
    or None."""
    held = champion["tags"].get(INPUT_SHAPE, shape)
    if held != shape:
        return f"it takes {held} images, this split holds {shape}"
    if champion_classes and champion_classes != classes:
        return f"other classes ({', '.join(champion_classes[:5])}, ...)"
    return None


def tags_to_add(name: str, versions: list[dict[str, Any]], pairs: list[tuple[str, str]],
                test: str, split: Any, classes: list[str], shape: str, gate: Gate,
                extra: dict[str, Callable[..., Any]]) -> list[tuple[str, str, str]]:
    """For each (champion, challenger) pair on this project's test split (`test`: its sha256;
    `split`: its images and labels): the champion's scores re-done on it (when it was scored on
    other images) and the paired comparison of the two, unless the registry holds them already.
    -> [(version, tag, value)] to write, in that order: the tag the gate reads of each group
    comes last, so a kill part way leaves the group to be computed again, never half read."""
    by_number = {v["version"]: v for v in versions}
    y = split.y.numpy()
    out: list[tuple[str, str, str]] = []
    cache: dict[str, Any] = {}

    def probs_of(number: str) -> tuple[Any, list[str]]:
        if number not in cache:
            cache[number] = probabilities(name, number, split.x)
        return cache[number]

    for champion, challenger in pairs:
        c, x = by_number[champion], by_number[challenger]
        if test_identity(x["tags"]) != test:
            continue  # another machine's test images: whoever holds them computes it
        unchecked = None if c["tags"].get(MODEL_FILES) else (
            "registered without file hashes, so its bytes cannot be checked")
        if test_identity(c["tags"]) != test and rescored(test, gate.metric) not in c["tags"]:
            why = unchecked
            if not why:
                probs, champion_classes = probs_of(champion)
                why = comparable(c, shape, classes, champion_classes)
            if why:
                out.append((champion, rescored(test, gate.metric), f"not comparable: {why}"))
                continue
            scores = score(y, probs, extra)  # the gate's metric last: written, all are
            for metric in sorted(scores, key=lambda m: m == gate.metric):
                out.append((champion, rescored(test, metric), f"{scores[metric]:.6f}"))
            log.info("register: v%s re-scored on the test split %s", champion, test[:12])
        if paired(champion, test, "low") not in x["tags"] and not unchecked and \
                (gate.metric in BUILTIN or gate.metric in extra):
            old, champion_classes = probs_of(champion)
            if comparable(c, shape, classes, champion_classes):
                continue
            new, _ = probs_of(challenger)
            result = paired_bootstrap(y, new, old, gate.metric, extra)
            for what in ("difference", "high", "low"):  # low last: written, all three are
                out.append((challenger, paired(champion, test, what), f"{result[what]:.6f}"))
    return out
