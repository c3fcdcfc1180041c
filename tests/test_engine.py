"""The training loop: sharp numeric checks on real digits."""

from __future__ import annotations

import math

import pytest
import torch

from reprolab.data import Split, load_training_data
from reprolab.engine import evaluate, fit, seed_everything
from reprolab.errors import TrainingDiverged
from reprolab.models import build, count_parameters, model_spec


def _model(meta, seed=0):
    seed_everything(seed)
    spec = model_spec("simple_cnn", meta["shape"], meta["num_classes"], 128, meta["mean"],
                      meta["std"])
    return build(spec)


@pytest.fixture(scope="module")
def digits(processed_once):
    return load_training_data(processed_once / "data" / "processed", "cpu")


def test_initial_loss_is_ln_k(digits):
    meta, train, _ = digits
    loss, _ = evaluate(_model(meta), train, 512)
    assert loss == pytest.approx(math.log(10), abs=0.15)


def test_overfits_one_batch(digits):
    meta, train, _ = digits
    batch = Split(train.x[:32], train.y[:32])
    result = fit(_model(meta), batch, batch, optimizer="adam", lr=3e-3, momentum=0.9, epochs=150,
                 batch_size=32, seed=0)
    assert result.last["train/loss"] < 0.01
    assert result.last["val/accuracy"] == 1.0


def test_two_seeded_runs_give_identical_weights(digits):
    meta, train, val = digits
    states = []
    for _ in range(2):
        model = _model(meta, seed=7)
        fit(model, train, val, optimizer="sgd", lr=0.05, momentum=0.9, epochs=2, batch_size=64,
            seed=7)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_learns_digits(digits):
    meta, train, val = digits
    result = fit(_model(meta), train, val, optimizer="adam", lr=3e-3, momentum=0.9, epochs=5,
                 batch_size=64, seed=0)
    assert result.last["val/accuracy"] > 0.9
    assert result.history[0]["train/loss"] > result.last["train/loss"]
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5]


def test_divergence_is_one_clear_error(digits):
    meta, train, val = digits
    with pytest.raises(TrainingDiverged, match=r"at epoch 1, step \d+: training diverged"):
        fit(_model(meta), train, val, optimizer="sgd", lr=1e6, momentum=0.9, epochs=3,
            batch_size=64, seed=0)


@pytest.mark.parametrize(("shape", "classes"), [((1, 8, 8), 10), ((3, 32, 32), 100),
                                                 ((1, 28, 28), 2), ((3, 5, 7), 4)])
def test_simple_cnn_fits_any_shape(shape, classes):
    spec = model_spec("simple_cnn", shape, classes, 16, [0.0] * shape[0], [1.0] * shape[0])
    model = build(spec)
    out = model(torch.randint(0, 256, (3, *shape)).float())
    assert out.shape == (3, classes)
    assert count_parameters(model) > 0
