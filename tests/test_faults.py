"""Faults and hostile input, injected for real: every case ends in one line and a non-zero exit,
with nothing outside the stage's outputs changed, nothing executed and nothing half-written.

(Image folders, raw files and the pixel limit: tests/test_faults_data.py.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from conftest import TINY, cli_argv, training_run_id
from reprolab import cli, registry, tracking, train
from reprolab.data import load_split
from reprolab.files import read_json, write_json
from reprolab.lifecycle import interrupt_on_sigterm


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under root, but those under `skip` (a stage's own outputs) and
    train's lock file (empty once released)."""
    skip = (*skip, "checkpoints/train.lock")
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not str(p.relative_to(root)).startswith(skip)}


def run_cli(cfg, stage: str, *overrides: str, extra: tuple[str, ...] = ()) -> int:
    args = [*cli_argv(stage, cfg.base_dir, *TINY, *overrides), *extra]
    return cli.main(args)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    (line,) = err.splitlines()
    return line


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Path:
    """A small file system mounted at `path` (as root): a disk that fills up, or turns
    read-only, on demand."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


# ---- nothing outside a stage's outputs is deleted ----

@pytest.mark.parametrize("models", [".", "data", "/tmp/elsewhere", "../outside", "src", ".git",
                                    "reports/models", "params.yaml"])
def test_a_path_that_would_delete_the_repository_is_refused(project, capsys, models):
    cfg = project()
    (cfg.base_dir / "src").mkdir()
    (cfg.base_dir / "src" / "code.py").write_text("kept\n")
    before = tree(cfg.base_dir)
    assert run_cli(cfg, "train", f"paths.models={models}") == 2
    line = one_line(capsys)
    assert "paths.models" in line and "allowed" in line, line
    assert tree(cfg.base_dir) == before


def test_a_folder_reprolab_did_not_write_is_never_replaced(project, capsys):
    cfg = project()
    notes = cfg.base_dir / "notes"
    notes.mkdir()
    (notes / "keep.txt").write_text("mine\n")
    before = tree(cfg.base_dir)
    assert run_cli(cfg, "train", "paths.models=notes") == 2
    assert "notes: exists and was not written by reprolab" in one_line(capsys)
    assert tree(cfg.base_dir) == before
    # what reprolab wrote it replaces: a second train into its own folder works
    assert run_cli(cfg, "train", "paths.models=trained", "train.epochs=1") == 0
    assert run_cli(cfg, "train", "paths.models=trained", "train.epochs=2") == 0
    assert (cfg.base_dir / "trained" / ".reprolab-output").is_file()


# ---- no code from artifacts ----

class Payload(torch.nn.Module):
    """A model whose unpickling runs code: it touches a file."""

    marker = ""

    def forward(self, x):
        return x

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_pickle_format_model_is_refused_and_runs_no_code(project, capsys, tmp_path):
    cfg = project()
    marker = tmp_path / "pwned"
    Payload.marker = str(marker)
    mlflow.set_tracking_uri(cfg.mlflow_uri)
    experiment = mlflow.create_experiment("pickle-test",  # artifacts here, not in ./mlruns
                                          artifact_location=(tmp_path / "art").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    with mlflow.start_run():
        # pip_requirements given: MLflow would otherwise load (and so run) it to infer them
        info = mlflow.pytorch.log_model(Payload(), name="model", serialization_format="pickle",
                                        pip_requirements=["torch"])
    assert not marker.exists()
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(load_split(cfg.processed_dir, "test").x[0, 0].numpy(), "L").save(image)

    capsys.readouterr()  # what logging the model printed
    assert run_cli(cfg, "predict", extra=("--model", info.model_uri, str(image))) == 2
    line = one_line(capsys)
    assert "pickle format" in line and "--allow-pickle" in line, line
    assert not marker.exists()
    # the payload is real: opting in for a trusted registry does run it
    with contextlib.suppress(Exception):
        registry.load_classifier(info.model_uri, allow_pickle=True)
    assert marker.exists()


# ---- every artifact verified where it is read ----

@pytest.mark.parametrize(("damage", "part"), [("flip", "x"), ("truncate", "x"), ("flip", "y")])
def test_a_damaged_processed_split_is_refused(project, capsys, damage, part):
    cfg = project()
    path = cfg.processed_dir / f"train.{part}.npy"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-1 - len(data) // 3] ^= 0x01  # in the pixels or labels, past the header
    else:
        data = data[: len(data) // 2]
    path.write_bytes(bytes(data))
    before = tree(cfg.base_dir)
    assert run_cli(cfg, "train") == 2
    line = one_line(capsys)
    assert "train.*.npy: content does not match the sha256 in meta.json" in line, line
    assert tree(cfg.base_dir, ("checkpoints",)) == before


def test_processed_data_of_an_earlier_format_says_to_preprocess_again(project, capsys):
    """Splits written by a reprolab before the mapped format (train.pt, ...; no `format` in
    meta.json) are not read: one line says to rerun preprocess. A version registered from them
    is still verified at its own commit, by that commit's code (`reprolab verify`)."""
    cfg = project()
    meta = read_json(cfg.processed_dir / "meta.json")
    del meta["format"]
    write_json(cfg.processed_dir / "meta.json", meta)
    for name in ("train", "val", "test"):
        for part in ("x", "y"):
            (cfg.processed_dir / f"{name}.{part}.npy").unlink()
        (cfg.processed_dir / f"{name}.pt").write_bytes(b"a torch.save of the split")
    before = tree(cfg.base_dir)
    assert run_cli(cfg, "train") == 2
    line = one_line(capsys)
    assert line.endswith("meta.json: processed data in the format of an earlier reprolab; run "
                         "`dvc repro preprocess` (or `reprolab preprocess`)"), line
    assert tree(cfg.base_dir, ("checkpoints",)) == before


@pytest.mark.parametrize("content", ["garbage", "truncated"])
def test_a_corrupt_checkpoint_is_moved_aside_and_training_starts_over(project, caplog,
                                                                      content):
    cfg = project("train.epochs=1")
    cfg.checkpoint_file.parent.mkdir(parents=True)
    if content == "garbage":
        cfg.checkpoint_file.write_bytes(b"not a checkpoint")
    else:
        torch.save({"epoch": 1, "weights": torch.zeros(10000)}, cfg.checkpoint_file)
        blob = cfg.checkpoint_file.read_bytes()
        cfg.checkpoint_file.write_bytes(blob[: len(blob) // 2])
    damaged = cfg.checkpoint_file.read_bytes()
    result = train.run(cfg)
    assert [row["epoch"] for row in result.history] == [1]
    aside = cfg.checkpoint_file.with_name("train.pt.corrupt-1")
    assert aside.read_bytes() == damaged
    assert any("unreadable" in r.message and "corrupt-1" in r.message for r in caplog.records)


# ---- validation that names the culprit ----

@pytest.mark.parametrize(("override", "expected"), [
    ("train.lr=inf", "train.lr = 'inf': input should be a finite number"),
    ("train.lr=.inf", "train.lr = inf: input should be a finite number"),
    ("tune.lr_high=.inf", "tune.lr_high = inf: input should be a finite number"),
    ("train.lrr=0.1", "unknown key train.lrr; did you mean train.lr?"),
    ("tune.storage=postgresq://me@db/optuna",
     "tune.storage = 'postgresq://me@db/optuna': not a database URL"),
])
def test_a_bad_value_is_one_line_naming_the_key(project, capsys, override, expected):
    cfg = project()
    before = tree(cfg.base_dir)
    assert run_cli(cfg, "tune", override) == 2
    assert expected in one_line(capsys)
    assert tree(cfg.base_dir) == before


def test_a_typo_and_a_repeated_key_in_params_yaml(project, capsys):
    cfg = project()
    params = cfg.base_dir / "params.yaml"
    text = params.read_text()
    params.write_text(text.replace("\n  lr: 1.0e-3", "\n  lrr: 1.0e-3"))
    assert run_cli(cfg, "train") == 2
    assert "unknown key train.lrr; did you mean train.lr?" in one_line(capsys)
    params.write_text(text.replace("\n  lr: 1.0e-3", "\n  lr: 1.0e-3\n  lr: 0.5"))
    assert run_cli(cfg, "train") == 2
    line = one_line(capsys)
    assert "params.yaml: key 'lr' appears twice in one section" in line, line


def test_a_mistyped_tracking_uri_is_refused_before_it_is_opened(project, capsys, monkeypatch):
    cfg = project()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp://127.0.0.1:5000")
    before = tree(cfg.base_dir)
    assert run_cli(cfg, "train") == 2
    assert "MLFLOW_TRACKING_URI = 'htp://127.0.0.1:5000': not a tracking store" in \
        one_line(capsys)
    assert tree(cfg.base_dir) == before


# ---- a stage run out of order says what to run first ----

def _no_data(cfg):
    for rel in (cfg.paths.raw, cfg.paths.processed):
        shutil.rmtree(cfg.base_dir / rel)


def _trained(cfg):
    train.run(cfg)


OUT_OF_ORDER = [
    # (stage, set-up, overrides, what its one line says)
    ("preprocess", _no_data, (), "manifest.json: manifest not found; run `reprolab fetch` first"),
    ("tune", _no_data, (), "meta.json: not found; run `reprolab preprocess` (or `dvc repro`)"),
    ("train", _no_data, (), "meta.json: not found; run `reprolab preprocess` (or `dvc repro`)"),
    ("train", None, ("train.use_tuned=true",),
     "best_params.yaml: not found; run `reprolab tune` first"),
    ("evaluate", None, (), "models/model.pt: not found; run `reprolab train` first"),
    ("register", None, (), "models/model.pt: not found; run `reprolab train` and `reprolab "
                           "evaluate` (or `dvc repro`) first"),
    ("register", _trained, (), "evaluate/metrics.json: not found; run `reprolab evaluate` (or "
                               "`dvc repro`) first"),
    ("predict", None, ("register.model_name=never-registered",),
     "error: registered model 'never-registered' has no versions in sqlite:///"),
]


@pytest.mark.parametrize(("stage", "setup", "overrides", "expected"), OUT_OF_ORDER,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(OUT_OF_ORDER)])
def test_a_stage_run_out_of_order_says_what_to_run_first(project, capsys, stage, setup,
                                                         overrides, expected):
    cfg = project("tracking.experiment=out-of-order", "train.epochs=1", *overrides)
    if setup:
        setup(cfg)
    image = cfg.base_dir / "digit.png"
    from PIL import Image

    Image.new("L", (8, 8)).save(image)
    before = tree(cfg.base_dir)
    extra = (str(image),) if stage == "predict" else ()
    assert run_cli(cfg, stage, "tracking.experiment=out-of-order", "train.epochs=1",
                   *overrides, extra=extra) == 2
    line = one_line(capsys)
    assert line.startswith(f"reprolab {stage}: error: "), line
    assert expected in line, line
    if stage == "predict":
        assert "or pass --model URI" in line, line
    assert tree(cfg.base_dir, ("checkpoints",)) == before  # nothing written


# ---- one trainer at a time: the filelock package's lock, the holder's pid beside it ----

HOLDER = """
import sys, time
from pathlib import Path
from reprolab.lifecycle import exclusive_lock
with exclusive_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def test_the_lock_names_a_live_holder_and_dies_with_it(tmp_path):
    from reprolab.lifecycle import LockHeld, exclusive_lock, pid_note

    lock = tmp_path / "checkpoints" / "train.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockHeld) as held, exclusive_lock(lock):
            pass
        assert held.value.pid == holder.pid
        assert f"held by pid {holder.pid}" in str(held.value)
        holder.kill()  # kill -9: nothing released by hand, the pid note stays behind
        holder.wait()
        assert pid_note(lock).read_text().strip() == str(holder.pid)
        with exclusive_lock(lock):  # the OS let go of the lock with its holder
            assert pid_note(lock).read_text().strip() == str(os.getpid())
            with pytest.raises(LockHeld) as again, exclusive_lock(lock):  # a second open here
                pass
            assert again.value.pid == os.getpid()
        assert not pid_note(lock).exists()  # released: no pid left naming a non-holder
    finally:
        holder.kill()
        holder.wait()


# ---- a stop that lands inside a finalizer ----

# A finalizer that the garbage collector could be running when the signal comes (GitPython's
# Repo.__del__ under MLflow's git context, in the flake of test_study's SIGTERM test): here one
# that only a signal ends, so that the signal lands in it every time.
IN_FINALIZER = """
import signal, sys, time
from reprolab.lifecycle import interrupt_on_sigterm

# Ctrl-C as an interactive shell leaves it (a shell without job control starts a background
# command with SIGINT ignored, and Python then keeps it ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)
interrupt_on_sigterm(once=sys.argv[1] == "once")

class Finalized:
    def __del__(self):
        print("in __del__", flush=True)
        while True:
            time.sleep(0.01)

try:
    Finalized()
    print("after __del__", flush=True)
    time.sleep(20)
    print("not interrupted", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


@pytest.mark.parametrize("mode", ["plain", "once"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_that_lands_in_a_finalizer_is_not_lost(mode, signum):
    """Python drops (prints) an exception raised in a finalizer: the stop would be lost, and
    after a once-only handler the process deaf to the next. It is sent again once the finalizer
    has returned: the process ends as interrupted, at once. SIGINT with `plain` is Python's own
    Ctrl-C handler."""
    proc = subprocess.Popen([sys.executable, "-c", IN_FINALIZER, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "in __del__"
        started = time.monotonic()
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=15)
        assert proc.returncode == 130, (out, err)
        assert out.split() == ["after", "__del__", "interrupted"], (out, err)
        assert time.monotonic() - started < 10  # not the 20 s the process would sleep on
        assert "Exception ignored" not in err and "Traceback" not in err, err
    finally:
        proc.kill()
        proc.wait()

# A command already ending with an error when the stop comes: a rank whose peer died reports it
# as the launcher stops the ranks left (SIGTERM). Here the stop lands in the error's report.
WHILE_ENDING = """
import os, signal, sys
from reprolab import cli
from reprolab.errors import ReprolabError
from reprolab.lifecycle import interrupt_on_sigterm

class StopWhileWriting:
    def write(self, text):
        written = sys.__stderr__.write(text)
        if text.endswith("\\n"):  # a line printed
            os.kill(os.getpid(), signal.SIGTERM)
        return written

    def flush(self):
        sys.__stderr__.flush()

def fail(cfg, args):
    interrupt_on_sigterm()
    sys.stderr = StopWhileWriting()
    raise ReprolabError("another rank stopped answering")

cli.COMMANDS["promote"] = ("__main__:fail", "")
sys.exit(cli.main(["promote", "-q", "a-model", "1"]))
"""


def test_a_stop_while_a_command_ends_with_an_error_is_an_exit_not_a_kill(tmp_path):
    """Escaping, the KeyboardInterrupt would end the process as killed by SIGINT, which the
    launcher reads as a kill from outside and names in place of the rank that died."""
    proc = subprocess.run([sys.executable, "-c", WHILE_ENDING], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.splitlines() == ["reprolab promote: error: another rank stopped answering",
                                        "reprolab: interrupted"], proc.stderr


# ---- environment faults ----

def test_a_full_disk_is_one_line_and_the_rerun_has_one_model(project, capsys):
    """models/ on a disk too small for the model: train fails after logging the model, keeps
    its checkpoint; once there is space, the rerun resumes the run and reuses that model."""
    cfg = project("paths.models=out/models", "tracking.experiment=full-disk")
    with tmpfs(cfg.base_dir / "out", "64k"):
        assert run_cli(cfg, "train", "paths.models=out/models",
                       "tracking.experiment=full-disk") == 1
        line = one_line(capsys)
        assert "out/models: no space left on the device" in line, line
        assert not (cfg.base_dir / "out" / "models").exists()
        assert cfg.checkpoint_file.is_file()  # kept for the rerun
        (failed,) = MlflowClient().search_runs(
            [MlflowClient().get_experiment_by_name("full-disk").experiment_id])
        assert failed.info.status == "FAILED"
    assert run_cli(cfg, "train", "paths.models=out/models", "tracking.experiment=full-disk") == 0
    run_id = training_run_id(cfg)
    assert run_id == failed.info.run_id  # the same run, resumed
    client = MlflowClient()
    models = client.search_logged_models(
        [failed.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1
    steps = [m.step for m in client.get_metric_history(run_id, "val/accuracy")]
    assert steps == [1, 2, 3]


def test_a_read_only_store_is_one_line(project, capsys, monkeypatch, tmp_path):
    cfg = project()
    with tmpfs(tmp_path / "store", "16m") as store:
        uri = f"sqlite:///{store / 'mlflow.db'}"
        # the store exists, tables and all (made in another process, which lets go of it)
        subprocess.run([sys.executable, "-c", "import sys; from mlflow import MlflowClient; "
                        "MlflowClient(sys.argv[1]).search_experiments()", uri], check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(store)], check=True)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        before = tree(cfg.base_dir)
        assert run_cli(cfg, "train") == 1
        line = one_line(capsys)
        assert f"the MLflow store {uri}:" in line and "readonly" in line, line
        assert tree(cfg.base_dir, ("checkpoints",)) == before


@pytest.mark.slow
def test_a_vanished_tracking_server_is_one_line_and_the_rerun_resumes(project, tmp_path,
                                                                     forks):
    """The team's server goes away mid-training: train ends with one line naming it; with the
    server back, the rerun resumes the same run and logs every epoch exactly once."""
    import os

    from servers import BIN, free_port, serve, stop

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server_args = [str(BIN / "mlflow"), "server", "--backend-store-uri",
                   f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                   (tmp_path / "artifacts").as_uri(), "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1"]
    overrides = ["train.epochs=3", "train.batch_size=16", "tracking.experiment=vanish"]
    cfg = project(*overrides)
    env_uri = os.environ["MLFLOW_TRACKING_URI"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    args = cli_argv("train", cfg.base_dir, *TINY, *overrides)

    server = serve(server_args, port, dict(os.environ), "/health")
    try:
        proc = forks.reprolab(args, cfg.base_dir, env=env)
        deadline = time.monotonic() + 120
        while not cfg.checkpoint_file.exists():  # the first epoch is done and logged
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
    finally:
        stop(server)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    (line,) = err.strip().splitlines()
    assert f"the MLflow store {uri}:" in line and "run again" in line, line
    assert not cfg.models_dir.exists()

    server = serve(server_args, port, dict(os.environ), "/health")
    try:
        os.environ["MLFLOW_TRACKING_URI"] = uri  # the rerun in this process: no new imports
        try:
            assert run_cli(cfg, "train", *overrides) == 0
        finally:
            os.environ["MLFLOW_TRACKING_URI"] = env_uri
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("vanish").experiment_id])
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "val/accuracy"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == \
                [1, 2, 3]
        models = client.search_logged_models([run.info.experiment_id])
        assert len(models) == 1
    finally:
        stop(server)


# ---- a signal while a run ends ----

@pytest.mark.parametrize(("raised", "status"), [(RuntimeError, "FAILED"), (None, "FINISHED")])
def test_a_sigterm_while_a_run_ends_waits_for_its_end(make_config, monkeypatch, raised, status):
    """torchrun stops the other ranks of a failed one with SIGTERM, which can land while rank 0
    marks its run FAILED: the run must not stay RUNNING. A SIGTERM during a run's normal end
    still interrupts the stage, once the run is FINISHED."""
    import signal

    tracking.configure(make_config("tracking.experiment=sigterm-at-end"))
    real_end_run = mlflow.end_run
    ending = []

    def end_run_hit_by_sigterm(*args, **kwargs):
        ending.append(True)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, before the store is written
        return real_end_run(*args, **kwargs)

    previous = signal.getsignal(signal.SIGTERM)
    interrupt_on_sigterm()  # as `reprolab train` does
    monkeypatch.setattr(mlflow, "end_run", end_run_hit_by_sigterm)
    try:
        with pytest.raises(raised or KeyboardInterrupt), \
                tracking.start_run("sigterm-at-end") as run_id:
            if raised:
                raise raised("rank 1 is gone")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert ending
    assert MlflowClient().get_run(run_id).info.status == status
    assert signal.getsignal(signal.SIGTERM) is previous


def test_a_stop_at_any_line_of_a_failing_runs_end_never_leaves_it_finished(make_config):
    """The ranks left of a failed one get torchrun's SIGTERM as they handle their own error (a
    peer that stopped answering): wherever in start_run's handling that stop lands (a trace
    function raises it at each of its lines in turn, once the block has raised), the run ends
    FAILED or KILLED, never FINISHED, and nothing stays RUNNING."""
    import inspect
    import sys

    tracking.configure(make_config("tracking.experiment=stop-in-the-end"))
    code = inspect.unwrap(tracking.start_run).__code__
    lines = range(code.co_firstlineno, code.co_firstlineno + len(inspect.getsource(code)
                                                                  .splitlines()))
    landed = []
    for line in lines:
        raised = []

        def tracer(frame, event, arg, line=line, raised=raised):
            if frame.f_code is not code:
                return None
            if event == "line" and frame.f_lineno == line and raised == ["block"]:
                raised.append("stop")
                raise KeyboardInterrupt("signal 15")
            return tracer

        run_id = None
        sys.settrace(tracer)
        try:
            with tracking.start_run("stop-in-the-end") as run_id:
                raised.append("block")
                raise RuntimeError("gloo: connection reset by peer")
        except (RuntimeError, KeyboardInterrupt):
            pass
        finally:
            sys.settrace(None)
        if raised[-1] == "stop":
            landed.append(line)
            if mlflow.active_run() is not None:  # the stop came before the run's end began:
                tracking.end_left_runs()  # what the process's exit does (an atexit handler)
            status = MlflowClient().get_run(run_id).info.status
            assert status in ("FAILED", "KILLED"), (line, status)
    assert len(landed) >= 3, landed  # the except clause, the finally, the end
    assert mlflow.active_run() is None
