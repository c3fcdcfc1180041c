"""Pure metric and gate functions against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reprolab.evaluate import per_class_report, predictions_csv
from reprolab.gate import Gate, decide
from reprolab.metrics import classification_metrics, from_confusion, paired_bootstrap
from reprolab.rescore import tags_to_add
from reprolab.tags import DATA_TEST, MODEL_FILES, paired, rescored


def test_classification_metrics_match_hand_computed_values():
    # class 0: tp=2 fp=1 fn=0; class 1: tp=1 fp=0 fn=1; class 2: tp=1 fp=0 fn=0
    y_true = np.array([0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 0, 1, 2])
    m = classification_metrics(y_true, np.eye(3)[y_pred])
    p = [2 / 3, 1.0, 1.0]
    r = [1.0, 0.5, 1.0]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, r, strict=True)]  # 0.8, 2/3, 1
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["precision_macro"] == pytest.approx(sum(p) / 3)
    assert m["recall_macro"] == pytest.approx(sum(r) / 3)
    assert m["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert m["f1_weighted"] == pytest.approx((2 * f1[0] + 2 * f1[1] + 1 * f1[2]) / 5)
    assert "top5_accuracy" not in m  # only with more than 5 classes


def test_top5_accuracy_by_hand():
    # 7 classes; the true class ranks 1st, 5th and 6th for the three samples.
    probs = np.array([
        [0.70, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05],
        [0.30, 0.25, 0.20, 0.15, 0.06, 0.03, 0.01],
        [0.30, 0.25, 0.20, 0.15, 0.06, 0.03, 0.01],
    ])
    m = classification_metrics(np.array([0, 4, 5]), probs)
    assert m["top5_accuracy"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(1 / 3)


def test_per_class_report_includes_classes_never_predicted():
    report = per_class_report(np.array([0, 1, 2]), np.array([0, 0, 0]), ["a", "b", "c"])
    assert report["a"] == {"precision": pytest.approx(1 / 3), "recall": 1.0,
                           "f1": pytest.approx(0.5), "support": 1}
    assert report["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_predictions_csv_uses_class_names():
    text = predictions_csv(np.array([0, 1]), np.array([1, 1]), ["cat", "dog"])
    assert text == "actual,predicted\ncat,dog\ndog,dog\n"


def _version(number: str, value: float, test: str = "t1", **tags: str) -> dict:
    return {"version": number,
            "tags": {DATA_TEST: test, "test/f1_macro": f"{value:.6f}",
                     MODEL_FILES: '{"MLmodel": "ab12"}', **tags}}


GATE = Gate("f1_macro")


@pytest.mark.parametrize(
    ("value", "champion", "gate", "promote", "reason"),
    [
        (0.90, None, GATE, True, "test/f1_macro 0.9000: the first score, no champion"),
        (0.95, _version("3", 0.90), GATE, True, "beats champion v3 0.9000 (on the same test"),
        (0.90, _version("3", 0.90), GATE, False, "does not beat"),
        (0.92, _version("3", 0.90), Gate("f1_macro", 0.05), False,
         "by more than min_delta 0.05"),
        (0.99, _version("3", 0.90, test="t0"), GATE, None,
         "has no score on this version's test"),
        (0.99, _version("3", 0.90, test="t0", **{rescored("t1", "f1_macro"): "0.995000"}), GATE,
         False, "does not beat champion v3 0.9950 (re-scored on this version's test split"),
        (0.99, _version("3", 0.90, test="t0", **{rescored("t1", "f1_macro"): "0.980000"}), GATE,
         True, "beats champion v3 0.9800 (re-scored"),
        (0.99, _version("3", 0.90, test="t0", **{
            rescored("t1", "f1_macro"): "not comparable: other classes"}), GATE, False,
         "not comparable on this test split: other classes"),
        (0.40, None, Gate("f1_macro", floor=0.5), False, "below the floor min_value 0.5"),
        (0.60, None, Gate("f1_macro", floor=0.5), True,
         "test/f1_macro 0.6000, at or above min_value 0.5: the first score"),
    ],
)
def test_the_gate(value, champion, gate, promote, reason):
    got, why = decide(value, _version("4", value)["tags"], champion, gate)
    assert got is promote
    assert reason in why


def test_with_significance_required_the_paired_interval_must_clear_min_delta():
    gate = Gate("f1_macro", significance=True)
    champion = _version("3", 0.90)
    mine = _version("4", 0.95)["tags"]
    assert decide(0.95, mine, champion, gate)[0] is None  # no paired comparison yet: kept
    assert decide(0.95, {**mine, paired("3", "t1", "low"): "0.010000"}, champion, gate)[0]
    got, why = decide(0.95, {**mine, paired("3", "t1", "low"): "-0.010000"}, champion, gate)
    assert got is False and "not significantly" in why


def test_a_champion_registered_without_file_hashes_never_blocks_the_gate():
    """A champion from before file hashes is never read (its bytes cannot be checked): on a new
    test split it is recorded as not comparable, without a model being loaded, and the reason
    names why; on its own split the difference decides, with no paired comparison to wait for."""
    old = _version("3", 0.90, test="t0")
    del old["tags"][MODEL_FILES]
    new = _version("4", 0.95)

    class Split:  # what a loaded model would be asked to score: never read here
        y = torch.tensor([0, 1])
        x = property(lambda self: pytest.fail("the champion's model was read"))

    written = tags_to_add("m", [old, new], [("3", "4")], "t1", Split(), ["0", "1"], "1x8x8",
                          GATE, {})
    assert written == [("3", rescored("t1", "f1_macro"),
                        "not comparable: registered without file hashes, so its bytes cannot "
                        "be checked")]
    old["tags"].update({k: v for _, k, v in written})
    got, why = decide(0.95, new["tags"], old, GATE)
    assert got is False and "registered without file hashes" in why

    same = _version("3", 0.90)
    del same["tags"][MODEL_FILES]
    assert tags_to_add("m", [same, new], [("3", "4")], "t1", Split(), ["0", "1"], "1x8x8",
                       Gate("f1_macro", significance=True), {}) == []
    got, why = decide(0.95, new["tags"], same, Gate("f1_macro", significance=True))
    assert got is True and "no paired comparison: v3 was registered without file hashes" in why


def test_the_paired_comparison_against_hand_computed_values():
    """30 test images; the new model is right on every one, the old one wrong on one: the
    difference in accuracy is 1/30, and its 95% interval reaches 0 (resamples without that
    image), so the one-image improvement is not significant."""
    y = np.array([0, 1, 2] * 10)
    new = np.eye(3)[y]
    old = new.copy()
    old[0] = [0, 1, 0]
    result = paired_bootstrap(y, new, old, "accuracy")
    assert result["difference"] == pytest.approx(1 / 30) and result["images"] == 30
    assert result["low"] == 0.0 and 1 / 30 <= result["high"] <= 5 / 30
    same = paired_bootstrap(y, new, new, "f1_macro")
    assert (same["difference"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    flipped = paired_bootstrap(y, new, np.roll(new, 1, axis=1), "accuracy")
    assert (flipped["difference"], flipped["low"], flipped["high"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("metric", ["accuracy", "f1_macro", "f1_weighted", "precision_macro",
                                    "recall_macro"])
def test_metrics_from_confusion_matrices_are_scikit_learns(metric):
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 5, 200), rng.integers(0, 4, 200)  # class 4 never predicted
    counts = np.zeros((1, 5, 5))
    np.add.at(counts[0], (y, p), 1)
    assert from_confusion(counts, metric)[0] == pytest.approx(
        classification_metrics(y, np.eye(5)[p])[metric])
