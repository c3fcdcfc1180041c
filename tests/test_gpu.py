"""What only a GPU can show: AMP bf16 and fp16, channels-last, device-resident batches,
torch.compile, and a checkpoint saved on the GPU that resumes bit-identically. Without CUDA every
test here skips with the reason "no CUDA" (their CPU paths are tested in test_engine.py and
test_resume.py).

Self-contained on purpose: benchmarks/gpu_check.sh runs this file with `pytest --noconftest -m
gpu` on a GPU machine whose Python has torch but none of MLflow, DVC or Optuna.
"""

from __future__ import annotations

import io
import os

import pytest
import torch

# cuBLAS reads it when it starts: deterministic matrix products for the bitwise resume
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

from reprolab.data import Split  # noqa: E402
from reprolab.data.batches import batches_of  # noqa: E402
from reprolab.device import seed_everything  # noqa: E402
from reprolab.engine import Hyper, evaluate, fit  # noqa: E402
from reprolab.models import build, model_spec  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]


def quadrants(n: int, seed: int = 0) -> Split:
    """3 x 16 x 16 images whose bright quadrant is the label: learnable in a few epochs."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randint(0, 60, (n, 3, 16, 16), generator=gen, dtype=torch.uint8)
    for label in range(4):
        r, c = divmod(label, 2)
        x[y == label, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 180
    return Split(x, y)


@pytest.fixture(scope="module")
def data():
    cuda = torch.device("cuda")
    return quadrants(2048).to(cuda), quadrants(512, seed=1).to(cuda)


def model(name: str = "fast_cnn", seed: int = 0):
    seed_everything(seed)
    spec = model_spec(name, (3, 16, 16), 4, [100.0] * 3, [80.0] * 3,
                      {"width": 16} if name == "fast_cnn" else {"hidden": 64})
    return build(spec).cuda()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_to_the_same_accuracy_as_fp32(data, precision):
    train, val = data
    hp = Hyper(optimizer="adamw", lr=3e-3, epochs=3, batch_size=128, precision=precision)
    result = fit(model(), train, val, hp)
    assert result.last["val/accuracy"] > 0.95
    reference = fit(model(), train, val, Hyper(**{**hp.__dict__, "precision": "fp32"}))
    assert abs(result.last["val/accuracy"] - reference.last["val/accuracy"]) < 0.03


def test_channels_last_while_training_and_plain_layout_after(data):
    train, val = data
    net = model()
    seen = []

    def on_epoch(row):
        weight = net[1].groups[0][0].weight
        seen.append(weight.is_contiguous(memory_format=torch.channels_last))

    fit(net, train, val, Hyper(optimizer="sgd", lr=0.05, epochs=1, batch_size=256),
        on_epoch=on_epoch)
    assert seen == [True]
    assert all(p.is_contiguous() for p in net.parameters())


def test_batches_come_from_the_device_resident_split(data):
    train, _ = data
    order = torch.randperm(len(train), device="cuda")
    gen = torch.Generator().manual_seed(0)
    batches = list(batches_of(train, order, 300, crop_padding=2, flip=True, generator=gen))
    assert all(xb.device.type == "cuda" and yb.device.type == "cuda" for xb, yb, _ in batches)
    assert sum(len(yb) for _, yb, _ in batches) == len(train)


def test_compiled_model_trains_like_the_eager_one(data):
    train, val = data
    hp = Hyper(optimizer="adamw", lr=3e-3, epochs=2, batch_size=128)
    eager = fit(model(), train, val, hp)
    compiled = fit(model(), train, val, Hyper(**{**hp.__dict__, "compile": True}))
    assert compiled.last["val/accuracy"] > 0.9
    assert abs(compiled.last["train/loss"] - eager.last["train/loss"]) < 0.05


def test_a_checkpoint_saved_on_the_gpu_resumes_bit_identically(data):
    train, val = data
    hp = Hyper(optimizer="adamw", lr=3e-3, epochs=3, batch_size=128, crop_padding=1,
               schedule="cosine", seed=3)
    seed_everything(0, deterministic=True)
    try:
        whole = model("simple_cnn")
        fit(whole, train, val, hp)
        saved = {}

        def keep(state):
            if state["epoch"] == 1:
                buffer = io.BytesIO()
                torch.save(state, buffer)  # its tensors live on the GPU
                saved["bytes"] = buffer.getvalue()

        fit(model("simple_cnn"), train, val, hp, save_state=keep)
        state = torch.load(io.BytesIO(saved["bytes"]), weights_only=True)
        assert state["model"]["1.features.0.weight"].device.type == "cuda"
        resumed = model("simple_cnn")
        fit(resumed, train, val, hp, state=state)
    finally:
        torch.use_deterministic_algorithms(False)
    for (key, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(),
                           strict=True):
        assert torch.equal(a, b), key
    assert evaluate(whole, val, 256)[1] == evaluate(resumed, val, 256)[1]
