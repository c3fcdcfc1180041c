"""Your own network through `dvc exp run` in the workspace, as the README writes it, in a clone
of its own (tests/test_e2e.py's helpers: `.venv/bin/dvc` from a shell where the venv is not
activated). A file of its own so that it runs beside test_e2e.py's pipeline, not after it."""

from __future__ import annotations

import json
import shutil

import pytest

from test_e2e import project_copy, sh, shell_env, store, tool

pytestmark = pytest.mark.e2e


TINY_NET = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_chans, hidden=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_chans, hidden, 3, padding=1), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.head = nn.Linear(4 * hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))
'''


def test_your_own_network_through_dvc_exp_run(tmp_path):
    """`dvc exp run` in the workspace of a fresh clone, as the README writes it: one file in
    nets/ and -S on the command line. Editing the file, or adding weights to start from, makes
    the stages that read them stale; the registered model predicts with no nets/ anywhere
    near."""
    (tmp_path / "clone").mkdir()
    dest = project_copy(tmp_path / "clone")
    (dest / "nets" / "tiny.py").write_text(TINY_NET)
    # one trial: tune's search is not what is tested here
    out = sh(tool("dvc"), "exp", "run", "-S", "model.name=nets.tiny:TinyNet", "-S",
             "model.kwargs={hidden: 24}", "-S", "train.use_tuned=false", "-S",
             "register.model_name=tiny-net", "-S", "tune.n_trials=1", cwd=dest).stdout
    spec = __import__("torch").load(dest / "models/model.pt", weights_only=True)["spec"]
    assert (spec["name"], spec["kwargs"]) == ("nets.tiny:TinyNet", {"hidden": 24})
    fresh = json.loads(sh(tool("dvc"), "status", "--json", cwd=dest).stdout or "{}")
    assert not {"tune", "train", "evaluate"} & set(fresh), fresh
    client = store(dest)
    exp = client.get_experiment_by_name("reprolab")
    (run,) = client.search_runs([exp.experiment_id], "params.`model.name` = 'nets.tiny:TinyNet' "
                                "and tags.`dvc.stage` = 'train'")
    assert run.info.status == "FINISHED" and run.data.tags["dvc.exp_name"] in out
    assert "test/accuracy" in run.data.metrics

    net = dest / "nets" / "tiny.py"
    net.write_text(net.read_text().replace("nn.ReLU()", "nn.GELU()"))
    stale = json.loads(sh(tool("dvc"), "status", "--json", cwd=dest).stdout)
    for stage in ("tune", "train", "evaluate"):
        changes = [c for c in stale.get(stage, []) if isinstance(c, dict)]
        assert any("nets" in c.get("changed deps", {}) for c in changes), (stage, stale)
    assert stale.get("fetch") == ["always changed"] and "preprocess" not in stale
    net.write_text(TINY_NET)

    # fine-tuning through DVC: weights added to DVC are a dependency of the stages that load
    # them (tests/test_adapt.py trains from such weights)
    shutil.copy(dest / "models" / "model.pt", dest / "weights" / "tiny.pt")
    sh(tool("dvc"), "add", "weights/tiny.pt", cwd=dest)
    stale = json.loads(sh(tool("dvc"), "status", "--json", cwd=dest).stdout)
    for stage in ("tune", "train"):
        changes = [c for c in stale.get(stage, []) if isinstance(c, dict)]
        assert any("weights" in c.get("changed deps", {}) for c in changes), (stage, stale)

    shutil.move(dest / "nets", tmp_path / "nets-away")  # no network code left in the project
    from PIL import Image

    image = tmp_path / "digit.png"
    Image.new("L", (8, 8), 0).save(image)
    env = {**shell_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{dest / 'mlflow.db'}"}
    out = sh(str(dest / tool("reprolab")), "predict", "-q", "--json", "--model",
             "models:/tiny-net@champion", str(image), cwd=tmp_path, env=env).stdout
    (prediction,) = json.loads(out)
    assert len(prediction["probabilities"]) == 10 and prediction["error"] is None
