"""The benchmark harness: what `make bench` reports is computed the way the README says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import harness  # noqa: E402


def test_rounds_alternate_and_include_the_a_versus_a_control():
    calls = []
    values = iter(range(1, 100))

    def side(label):
        def run():
            calls.append(label)
            return float(next(values))
        return run

    samples = harness.alternate(side("a"), side("b"), rounds=3, warmup=1)
    # warm-up a, b; then A B A' / B A A' / A B A'
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "a", "a", "b", "a"]
    assert samples == {"A": [3.0, 7.0, 9.0], "B": [4.0, 6.0, 10.0], "A'": [5.0, 8.0, 11.0]}


@pytest.mark.parametrize(("ratio", "target", "value", "met"), [
    ("A/B", "<= 1.02", 1.0 / 4.0, True),   # overhead of A
    ("B/A", ">= 10", 4.0, False),          # speed-up of A
])
def test_rows_take_medians_ratios_and_targets(ratio, target, value, met):
    samples = {"A": [1.0, 9.0, 1.0], "B": [4.0, 4.0, 0.5], "A'": [2.0, 2.0, 2.0]}
    row = harness.row_from(samples, name="x", a_label="a", b_label="b", unit="s", ratio=ratio,
                           target=target)
    assert (row.a, row.b) == (1.0, 4.0)
    assert row.ratio == pytest.approx(value)
    assert row.control == pytest.approx(2.0)
    assert row.met is met
    assert ("met" if met else "**missed**") in harness.table([row])


def test_run_refuses_an_unknown_benchmark_in_one_line():
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "tracking", "speed"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "benchmarks/run.py: error: unknown ['speed']; allowed: tracking, datapath, throughput, "
        "pruning, storage, noop, gpu"
    )
