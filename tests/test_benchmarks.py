"""The benchmark harness: what `make bench` reports is computed the way the README says."""

from __future__ import annotations

import json
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
    import run

    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "tracking", "speed"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"benchmarks/run.py: error: unknown ['speed']; allowed: {', '.join(run.ORDER)}"
    )
    assert {"throughput", "tracking", "startup"} <= set(run.ORDER)


def test_more_than_two_sides_rotate_and_a_runs_again_last_in_every_round():
    calls = []

    def side(label):
        def run():
            calls.append(label)
            return float(len(calls))
        return run

    samples = harness.alternate_many({"A": side("A"), "B": side("B"), "C": side("C")}, rounds=3)
    assert calls == ["A", "B", "C", "A", "B", "C", "A", "A", "C", "A", "B", "A"]
    assert samples == {"A": [1.0, 7.0, 10.0], "B": [2.0, 5.0, 11.0], "C": [3.0, 6.0, 9.0],
                       "A'": [4.0, 8.0, 12.0]}
    # the per-round ratio, for targets that must hold in every round
    assert harness.round_ratios(samples, "A/B") == [0.5, 1.4, 10 / 11]
    assert harness.round_ratios(samples, "B/A") == [2.0, 5 / 7, 1.1]


def test_the_performance_page_gets_the_tables_between_its_markers_only(tmp_path):
    import run

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{run.START}\nold tables\n{run.END}\nafter\n")
    assert run.update_page("new tables\n", readme)
    assert readme.read_text() == f"# title\n\nbefore\n{run.START}\nnew tables\n{run.END}\nafter\n"
    readme.write_text("no markers\n")
    assert not run.update_page("new tables\n", readme)
    assert readme.read_text() == "no markers\n"


@pytest.mark.parametrize("name", ["mnist", "cifar"])
def test_synthetic_workloads_are_learnable_in_the_real_formats(tmp_path, name):
    import numpy as np
    import workloads

    from reprolab.data import torchvision_sets

    def read(raw):  # the stage's reader, its chunks collected
        splits, classes = torchvision_sets.read_chunks(shape.dataset, raw)
        (x, y), (tx, ty) = ([np.concatenate(part) for part in zip(*splits[s](), strict=True)]
                            for s in ("train", "test"))
        return x, y, tx, ty, classes

    shape = workloads.SHAPES[name].scaled(0.004)  # 240 / 200 training images
    workloads.write(tmp_path, shape, seed=3)
    x, y, tx, ty, classes = read(tmp_path)
    assert x.shape == (shape.train, *shape.image) and x.dtype == np.uint8
    assert tx.shape == (shape.test, *shape.image) and len(classes) == 10
    assert np.bincount(y).tolist() == [shape.train // 10] * 10  # balanced
    # the classes are in the pixels, not trivially: the nearest class template (known only to
    # the generator) is right for most images, and the pixel noise still varies within a class
    patterns = workloads.templates(shape.image, np.random.default_rng(3))
    flat = (x.reshape(len(x), -1) / 255.0) - (x.reshape(len(x), -1) / 255.0).mean(1, keepdims=True)
    ref = patterns.reshape(10, -1) - patterns.reshape(10, -1).mean(1, keepdims=True)
    accuracy = ((flat @ ref.T).argmax(1) == y).mean()
    assert 0.8 < accuracy < 1.0
    assert x[y == 0].std(axis=0).mean() > 40  # pixel values 0..255
    again, _, _, _, _ = read(tmp_path)
    workloads.write(tmp_path / "other", shape, seed=4)
    other, _, _, _, _ = read(tmp_path / "other")
    assert np.array_equal(again, x) and not np.array_equal(other, x)


def test_tutorial_loop_trains_the_model_it_is_given():
    import torch
    import workloads
    from bench_throughput import tutorial_fit

    from reprolab.data import Split
    from reprolab.engine import evaluate
    from reprolab.models import build, model_spec

    x, y = workloads.images(400, (1, 28, 28), seed=0)
    split = Split(torch.from_numpy(x), torch.from_numpy(y))
    torch.manual_seed(0)
    model = build(model_spec("simple_cnn", (1, 28, 28), 10, [110.0], [80.0], {"hidden": 32}))
    before = evaluate(model, split, 512)[1]
    tutorial_fit(model, split, split, batch_size=32, lr=3e-3, epochs=2, seed=0)
    assert evaluate(model, split, 512)[1] > max(0.5, before + 0.3)


def test_stage_timer_splits_a_command_and_the_shim_adds_its_wall_time(tmp_path):
    import bench_startup

    log = tmp_path / "stages.jsonl"
    bench_startup.timer_on_path(tmp_path / "bin", log)
    proc = subprocess.run([str(tmp_path / "bin" / "reprolab"), "fetch", "--help"],
                          capture_output=True, text=True, env=bench_startup.environment())
    assert proc.returncode == 0 and "--params" in proc.stdout  # the real CLI answered
    timer_line, wall_line = (json.loads(line) for line in log.read_text().splitlines())
    assert timer_line["stage"] == "fetch" and timer_line["store"] == 0.0
    assert 0 < timer_line["imports"] < timer_line["total"] < wall_line["wall"]
    split = bench_startup.stage_splits(log)["fetch"]
    assert split["wall"] == wall_line["wall"]
    parts = split["start"] + split["imports"] + split["store"] + split["work"] + split["exit"]
    assert parts == pytest.approx(split["wall"])


def test_the_in_run_tracking_target_holds_only_if_every_tracked_run_meets_it():
    import bench_tracking

    samples = {"A": [10.1, 10.1, 10.1], "A work": [10.0, 10.0, 10.0], "B": [9.0, 11.0, 10.0],
               "A'": [10.1, 10.1, 10.5], "A' work": [10.0, 10.0, 10.0]}
    row = bench_tracking.in_run_row(samples, "x", "<= 1.02")
    assert row.ratio == pytest.approx(1.01) and row.control == pytest.approx(1.0)
    assert row.met is False  # one A' run took 1.05x its bare-loop work
    samples["A'"][2] = 10.2
    assert bench_tracking.in_run_row(samples, "x", "<= 1.02").met is True


def test_the_in_run_split_times_the_bare_loops_work_inside_real_tracked_runs(tmp_path,
                                                                             monkeypatch):
    """Two real `reprolab train` runs and a bare loop: one bare-work time per tracked run, less
    than its wall time by what tracking took; train's functions are themselves again after."""
    import bench_tracking

    from reprolab import checkpoint, recipe, train

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # pipeline_project points it at its own store
    config = harness.pipeline_project(tmp_path, "train.use_tuned=false", "train.device=cpu")
    originals = (train.load_training_data, recipe.ModelRecipe.build, checkpoint.fit,
                 train.Checkpointer.__call__)
    with bench_tracking.BareWork() as bare_work:
        samples = bench_tracking.measured(config, 2, 0, 1, bare_work)
    assert (train.load_training_data, recipe.ModelRecipe.build, checkpoint.fit,
            train.Checkpointer.__call__) == originals
    assert len(bare_work.seconds) == 2
    for key in ("A", "A'"):
        (total,), (work,) = samples[key], samples[f"{key} work"]
        assert 0 < work < total  # the run, its model, its outputs took the rest
    assert (config().models_dir / "model.pt").is_file()


def test_the_best_mnist_recipe_is_what_reprolab_train_builds_from_its_file(tmp_path):
    """benchmarks/mnist_best.txt, read by `reprolab train --overrides`, gives the model and
    the engine settings the time-to-accuracy benchmark measures (tta.best_recipe)."""
    import torch
    import tta

    from reprolab.config import load_config
    from reprolab.models import model_spec
    from reprolab.recipe import hyper_for

    tta.tiny_mnist(tmp_path / "MNIST" / "raw")
    arrays = tta.mnist_arrays(tmp_path)
    spec, hyper = tta.best_recipe(arrays, torch.device("cpu"), val_size=100)
    cfg = load_config(BENCH.parent / "params.yaml", tta.best_overrides())
    assert cfg.data.dataset == "mnist" and cfg.train.use_tuned is False
    built = model_spec(cfg.model.name, (1, 28, 28), 10, spec["mean"], spec["std"],
                       dict(cfg.model.kwargs))
    assert built == spec
    made = hyper_for(cfg, cfg.train.epochs, torch.device("cpu"), [1, 28, 28])
    for field in ("optimizer", "lr", "epochs", "batch_size", "weight_decay", "schedule",
                  "warmup_epochs", "label_smoothing", "precision", "momentum", "crop_padding",
                  "flip", "patience", "compile"):
        assert getattr(made, field) == getattr(hyper, field), field


def test_time_to_accuracy_runs_every_setup_in_quick_mode():
    """The benchmark's code paths on tiny IDX files (its figures mean nothing)."""
    import os

    env = {**os.environ, "BENCH_QUICK": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / "bench_time_to_accuracy.py")], cwd=BENCH,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for setup in ("plain", "defaults", "best"):
        assert f"| {setup}: time to 50.0% test accuracy" in proc.stdout
