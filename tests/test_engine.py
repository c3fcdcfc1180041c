"""The training loop: sharp numeric checks on real digits."""

from __future__ import annotations

import copy
import io
import logging
import math

import pytest
import torch

from reprolab import progress
from reprolab.data import Split, load_training_data
from reprolab.data.batches import augment, batches_of
from reprolab.ddp import share
from reprolab.device import seed_everything
from reprolab.engine import Hyper, evaluate, fit
from reprolab.errors import TrainingDiverged
from reprolab.models import BUILTIN, build, count_parameters, model_spec
from reprolab.optim import make_schedule


def _model(meta, seed=0, name="simple_cnn"):
    seed_everything(seed)
    kwargs = {"width": 16} if name == "fast_cnn" else {}
    return build(model_spec(name, meta["shape"], meta["num_classes"], meta["mean"], meta["std"],
                            kwargs))


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
    hp = Hyper(optimizer="adam", lr=3e-3, epochs=150, batch_size=32)
    result = fit(_model(meta), batch, batch, hp)
    assert result.last["train/loss"] < 0.01
    assert result.last["val/accuracy"] == 1.0


@pytest.mark.parametrize("hp", [
    Hyper(optimizer="sgd", lr=0.05, epochs=2, batch_size=64, seed=7),
    Hyper(optimizer="adamw", lr=3e-3, epochs=2, batch_size=64, seed=7, schedule="onecycle",
          crop_padding=1, flip=True, label_smoothing=0.1, weight_decay=5e-4),
], ids=["sgd", "adamw-onecycle-augment"])
def test_two_seeded_runs_give_identical_weights(digits, hp):
    meta, train, val = digits
    states = []
    for _ in range(2):
        model = _model(meta, seed=7)
        fit(model, train, val, hp)
        states.append(model.state_dict())
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_resuming_from_a_saved_state_gives_identical_weights(digits):
    meta, train, val = digits
    hp = Hyper(optimizer="sgd", lr=0.05, epochs=4, batch_size=64, seed=3, schedule="cosine",
               warmup_epochs=1, crop_padding=1, patience=3)
    straight = _model(meta, seed=3)
    expected = fit(straight, train, val, hp)

    saved: list[dict] = []

    def save(state):  # as `reprolab train` does: serialise now, load with weights_only
        buffer = io.BytesIO()
        torch.save(state, buffer)
        buffer.seek(0)
        saved.append(torch.load(buffer, weights_only=True))

    first = _model(meta, seed=3)
    with pytest.raises(KeyboardInterrupt):
        def stop_after_two(row):
            if row["epoch"] == 2:
                raise KeyboardInterrupt

        fit(first, train, val, hp, on_epoch=stop_after_two, save_state=save)
    assert [s["epoch"] for s in saved] == [1]  # epoch 2's callback stopped before its save
    torch.manual_seed(12345)  # the resumed run must not depend on the RNG it starts with
    resumed_model = _model(meta, seed=99)
    resumed = fit(resumed_model, train, val, hp, state=saved[-1])
    exact = ("epoch", "train/loss", "train/accuracy", "val/loss", "val/accuracy", "train/lr")
    assert [[r[k] for k in exact] for r in resumed.history] == \
        [[r[k] for k in exact] for r in expected.history]
    assert resumed.best_epoch == expected.best_epoch
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key


def test_learns_digits(digits):
    meta, train, val = digits
    result = fit(_model(meta), train, val, Hyper(optimizer="adam", lr=3e-3, epochs=5,
                                                 batch_size=64))
    assert result.last["val/accuracy"] > 0.9
    assert result.history[0]["train/loss"] > result.last["train/loss"]
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5]


def test_early_stopping_restores_the_best_epoch(digits):
    meta, train, val = digits
    # A learning rate this high makes validation accuracy wobble after an early peak.
    hp = Hyper(optimizer="sgd", lr=0.2, momentum=0.9, epochs=12, batch_size=64, patience=2)
    model = _model(meta)
    result = fit(model, train, val, hp)
    best = max(result.history, key=lambda row: row["val/accuracy"])
    assert result.stopped_early
    assert result.best_epoch == best["epoch"] < result.history[-1]["epoch"]
    assert len(result.history) == best["epoch"] + 2
    _, accuracy = evaluate(model, val, 512)
    assert accuracy == pytest.approx(best["val/accuracy"])


def test_divergence_is_one_clear_error(digits):
    meta, train, val = digits
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at epoch 1, step \d+"):
        fit(_model(meta), train, val, Hyper(optimizer="sgd", lr=1e6, epochs=3, batch_size=64))


def test_schedules_warm_up_and_anneal():
    param = torch.nn.Parameter(torch.zeros(1))
    lrs = {}
    for schedule in ("constant", "cosine", "onecycle"):
        opt = torch.optim.SGD([param], lr=0.1)
        hp = Hyper(optimizer="sgd", lr=0.1, epochs=4, batch_size=1, schedule=schedule,
                   warmup_epochs=1)
        sched = make_schedule(opt, hp, steps_per_epoch=10)
        seen = []
        for _ in range(40):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        lrs[schedule] = seen
    assert lrs["constant"][0] == pytest.approx(0.01) and lrs["constant"][9] == pytest.approx(0.1)
    assert lrs["constant"][-1] == pytest.approx(0.1)
    assert lrs["cosine"][10] == pytest.approx(0.1) and lrs["cosine"][-1] < 0.001
    assert max(lrs["onecycle"]) == pytest.approx(0.1, rel=0.02)
    assert lrs["onecycle"][0] < 0.01 and lrs["onecycle"][-1] < 1e-4



def _formula_lr(lr, schedule, warmup, total, step):
    """The schedule as reprolab wrote it by hand before it used torch's schedulers."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
@pytest.mark.parametrize(("epochs", "steps", "warmup_epochs"),
                         [(4, 10, 0.0), (4, 10, 1.0), (30, 19, 2.5), (20, 469, 0.5)])
def test_schedule_follows_the_formula_at_every_step(schedule, epochs, steps, warmup_epochs):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    hp = Hyper(optimizer="sgd", lr=0.1, epochs=epochs, batch_size=1, schedule=schedule,
               warmup_epochs=warmup_epochs)
    sched = make_schedule(opt, hp, steps_per_epoch=steps)
    total, warmup = epochs * steps, round(warmup_epochs * steps)
    for step in range(total):
        assert abs(opt.param_groups[0]["lr"] - _formula_lr(0.1, schedule, warmup, total, step)) \
            <= 1e-12, step
        opt.step()
        sched.step()


def test_ranks_share_each_global_batch_and_its_augmentation(digits):
    """Concatenated in rank order, the ranks' shares are the single-process batches exactly,
    augmentation included, also for an uneven last batch; the weights turn summed losses into
    the global batch's mean."""
    _, train, _ = digits
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    alone = list(batches_of(train, order, 100, 2, True, torch.Generator().manual_seed(1)))
    assert len(train) % 100 and len(alone[-1][1]) == len(train) % 100  # an uneven last batch
    world = 3
    ranks = [list(batches_of(train, order, 100, 2, True, torch.Generator().manual_seed(1),
                             rank, world)) for rank in range(world)]
    for i, (x, y, weight) in enumerate(alone):
        shares = [ranks[r][i] for r in range(world)]
        assert torch.equal(torch.cat([s[0] for s in shares]), x)
        assert torch.equal(torch.cat([s[1] for s in shares]), y)
        assert [len(s[1]) for s in shares] == [len(y[part]) for part in
                                               (share(len(y), r, world) for r in range(world))]
        assert shares[0][2] * sum(len(s[1]) for s in shares) == pytest.approx(world)
        assert weight == pytest.approx(1 / len(y))


def test_progress_without_a_terminal_logs_within_an_epoch(digits, monkeypatch, caplog):
    meta, train, val = digits
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)  # every step, instead of every 30 s
    hp = Hyper(optimizer="adam", lr=1e-3, epochs=1, batch_size=256)
    with caplog.at_level(logging.INFO, logger="reprolab"):
        fit(_model(meta), train, val, hp, progress=True)  # pytest's stderr is no terminal
    steps = math.ceil(len(train) / 256)
    lines = [r.getMessage() for r in caplog.records if "step " in r.getMessage()]
    assert [line.split()[3] for line in lines] == [f"{s}/{steps}" for s in range(1, steps + 1)]
    assert all(line.startswith("epoch 1/1  step ") and "img/s" in line for line in lines)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="reprolab"):
        fit(_model(meta), train, val, hp, progress=False)
    assert not [r for r in caplog.records if "step " in r.getMessage()]


def test_progress_on_a_terminal_draws_bars_and_logs_no_step_lines(digits, monkeypatch, caplog):
    import fcntl
    import os
    import pty
    import struct
    import termios
    import threading

    meta, train, val = digits
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 100 columns
    chunks: list[bytes] = []

    def drain() -> None:  # a full pty would block the writer
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    terminal = os.fdopen(slave, "w")
    monkeypatch.setattr("sys.stderr", terminal)
    try:
        with caplog.at_level(logging.INFO, logger="reprolab"):
            fit(_model(meta), train, val, Hyper(optimizer="adam", lr=1e-3, epochs=2,
                                               batch_size=256), progress=True)
    finally:
        terminal.close()
        reader.join(timeout=5)
        os.close(master)
    shown = b"".join(chunks).decode(errors="replace")
    assert "train:" in shown and "2/2" in shown and "epoch 2" in shown  # tqdm's bars
    assert not [r for r in caplog.records if "step " in r.getMessage()]


def test_a_state_saved_at_the_early_stop_resumes_to_the_same_end(digits):
    meta, train, val = digits
    hp = Hyper(optimizer="sgd", lr=0.2, momentum=0.9, epochs=12, batch_size=64, patience=2)
    saved: list[dict] = []
    expected = fit(_model(meta), train, val, hp,
                   save_state=lambda s: saved.append(copy.deepcopy(s)))
    assert expected.stopped_early
    model = _model(meta, seed=5)
    resumed = fit(model, train, val, hp, state=saved[-1])  # killed after its last checkpoint
    assert resumed.stopped_early and resumed.history == expected.history
    assert resumed.best_epoch == expected.best_epoch


def test_sync_batchnorm_stands_in_while_training_and_leaves_plain_batchnorm():
    from reprolab.ddp import sync_batchnorm, unwrap

    torch.manual_seed(0)
    model = build(model_spec("fast_cnn", (3, 16, 16), 10, [0.0] * 3, [1.0] * 3, {"width": 8}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = sync_batchnorm(model)
    assert originals and all(isinstance(m, torch.nn.BatchNorm2d) for m in originals.values())
    assert all(isinstance(model.get_submodule(n), torch.nn.SyncBatchNorm) for n in originals)
    with torch.no_grad():  # training changes the stand-ins' tensors: the originals share them
        for name in originals:
            model.get_submodule(name).weight.add_(1.0)
            model.get_submodule(name).running_mean.add_(2.0)
    unwrap(model, originals)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    for key, value in model.state_dict().items():
        shift = 1.0 if key.endswith(".weight") and key.rsplit(".", 1)[0] in originals else \
            2.0 if key.endswith("running_mean") else 0.0
        assert torch.equal(value, before[key] + shift) if shift else \
            torch.equal(value, before[key]), key


def test_augment_crops_and_flips_whole_batches():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).reshape(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    flipped = augment(x, 0, True, torch.Generator().manual_seed(0))
    mask = torch.rand(2, generator=g) < 0.5
    for i in range(2):
        assert torch.equal(flipped[i], x[i].flip(2) if mask[i] else x[i])
    cropped = augment(x, 1, False, torch.Generator().manual_seed(1))
    assert cropped.shape == x.shape and cropped.dtype == torch.uint8
    for i in range(2):  # each output is a 4x4 window of the zero-padded image
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
        windows = [padded[:, r:r + 4, c:c + 4] for r in range(3) for c in range(3)]
        assert any(torch.equal(cropped[i], w) for w in windows)


@pytest.mark.parametrize("name", sorted(BUILTIN))
@pytest.mark.parametrize(("shape", "classes"), [((1, 8, 8), 10), ((3, 32, 32), 100),
                                                 ((1, 28, 28), 2)])
def test_every_model_fits_any_shape_and_trains_one_step(name, shape, classes):
    torch.manual_seed(0)
    spec = model_spec(name, shape, classes, [0.0] * shape[0], [255.0] * shape[0],
                      {"width": 8} if name == "fast_cnn" else {})
    model = build(spec)
    x = torch.randint(0, 256, (4, *shape)).float()
    y = torch.arange(4) % classes
    out = model(x)
    assert out.shape == (4, classes)
    assert count_parameters(model) > 0
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(("native", "shape", "expected"), [
    (True, (1, 28, 28), "bf16"), (True, (3, 32, 32), "bf16"), (True, (1, 16, 16), "bf16"),
    (True, (1, 8, 8), "fp32"),  # digits: bf16 does not pay there (bench_throughput.py)
    (False, (1, 28, 28), "fp32"), (False, (1, 8, 8), "fp32")])
def test_auto_precision_is_bf16_only_on_cpus_with_native_bf16_and_images_not_tiny(
        monkeypatch, native, shape, expected):
    from reprolab import device

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert device.select_precision("auto", cpu, shape) == expected
    for forced in ("fp32", "bf16", "fp16"):  # an explicit choice is never second-guessed
        assert device.select_precision(forced, cpu, (1, 8, 8)) == forced
