"""The screenshots of docs/ui.md, made again: a copy of this repository runs the pipeline on
digits with small params (`dvc repro`, then a `dvc exp run` whose model becomes the challenger),
a local `mlflow server` serves its store, and headless Chromium opens the views the page shows.

    .venv/bin/pip install playwright==1.63.0   # the browser driver; not a dependency of reprolab
    apt-get install chromium                   # or set CHROMIUM to a Chromium or Chrome binary
    .venv/bin/python docs/ui_screenshots.py    # writes docs/img/ui/*.png (about 4 minutes)

Not part of `make test`: it needs a browser, and screenshots are for reading, not asserting.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "img" / "ui"
BIN = Path(sys.executable).parent
SMALL = {"train": {"epochs": 6}, "tune": {"n_trials": 6, "epochs": 3}}
PORT = 5077


def run(*cmd: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def pipeline(root: Path) -> Path:
    """A clone with the pipeline run twice: v1 @champion, then a worse v2 @challenger."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from harness import git_copy

    dest = git_copy(root / "reprolab", SMALL)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    run(str(BIN / "dvc"), "repro", cwd=dest)
    run(str(BIN / "dvc"), "exp", "run", "-n", "low-lr", "-S", "train.use_tuned=false",
        "-S", "train.lr=0.0001", "-S", "train.epochs=2", cwd=dest)
    return dest


def server(dest: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{dest / 'mlflow.db'}",
         "--host", "127.0.0.1", "--port", str(PORT), "--workers", "1"],
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
             "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    sys.exit("mlflow server did not start")


def shoot(dest: Path) -> None:
    from mlflow import MlflowClient
    from playwright.sync_api import sync_playwright

    client = MlflowClient(f"http://127.0.0.1:{PORT}")
    exp = client.get_experiment_by_name("reprolab")
    name = "reprolab-digits"
    champion = client.get_model_version_by_alias(name, "champion")
    challenger = client.get_model_version_by_alias(name, "challenger")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`optuna.study` != ''")
    model_id = champion.source.removeprefix("models:/")
    base = f"http://127.0.0.1:{PORT}/#"
    views = {
        "runs-table": f"/experiments/{exp.experiment_id}/runs",
        "train-run": f"/experiments/{exp.experiment_id}/runs/{champion.run_id}",
        "tune-run": f"/experiments/{exp.experiment_id}/runs/{parent.info.run_id}",
        "logged-model": f"/experiments/{exp.experiment_id}/models/{model_id}",
        "registered-model": f"/models/{name}",
        "champion-version": f"/models/{name}/versions/{champion.version}",
        "challenger-version": f"/models/{name}/versions/{challenger.version}",
    }
    OUT.mkdir(parents=True, exist_ok=True)
    browser_path = os.environ.get("CHROMIUM") or shutil.which("chromium") or \
        shutil.which("chromium-browser") or shutil.which("google-chrome")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True)
        page = browser.new_page(viewport={"width": 1900, "height": 1500})
        # as a reader sets the UI once (it remembers): the "Model training" view, which MLflow
        # 3 does not open on, and the assistant's side panel closed
        page.goto(f"{base}/experiments/{exp.experiment_id}/runs")
        page.wait_for_timeout(4000)
        click(page, page.get_by_text("Model training", exact=True))
        click(page, page.get_by_role("button", name="Close"))
        for shot, path in views.items():
            page.goto(base + path)
            page.wait_for_timeout(5000)  # the UI polls: the network never idles
            if shot == "runs-table":
                table(page)
            page.screenshot(path=OUT / f"{shot}.png", full_page=True)
            print(f"docs/img/ui/{shot}.png  <- {path}")
        browser.close()


def click(page, locator) -> None:
    """Click the first match when the UI has it (its layout changes between versions)."""
    if locator.count():
        locator.first.click()
        page.wait_for_timeout(1500)


def table(page) -> None:
    """The runs table with the trials unfolded and the knob columns shown."""
    click(page, page.get_by_role("button", name="Columns"))
    for key in ("val/accuracy", "train.lr", "train.optimizer", "train.epochs"):
        click(page, page.get_by_text(key, exact=True))
    page.keyboard.press("Escape")
    page.wait_for_timeout(1000)
    click(page, page.get_by_role("row").filter(has_text="tune-").get_by_role("button"))


def main() -> None:
    """With a folder argument: the pipeline's copy is made there once and kept (to take the
    screenshots again without training again); without: in a temporary folder."""
    keep = Path(sys.argv[1]) if len(sys.argv) > 1 else None
    with tempfile.TemporaryDirectory(prefix="reprolab-ui-") as tmp:
        root = keep or Path(tmp)
        dest = root / "reprolab"
        if not (dest / "mlflow.db").exists():
            root.mkdir(parents=True, exist_ok=True)
            dest = pipeline(root)
        proc = server(dest)
        try:
            shoot(dest)
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
