"""`reprolab <stage> [--params params.yaml] [-S key.path=value ...]`: one subcommand per stage.

Nothing heavy is imported here: torch, mlflow and optuna load inside the stage that needs them,
so `reprolab --help` answers at once.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import logging
import os
import re
import shlex
import signal
import sys
import threading

# stage -> module; a stage, its module, its params section and its report folder share a name.
STAGES = {
    "fetch": ("reprolab.data.fetch", "download or copy the raw dataset and write its manifest"),
    "preprocess": ("reprolab.data.preprocess", "verify raw files; write uint8 tensor splits"),
    "tune": ("reprolab.tune", "search lr and optimizer with Optuna"),
    "train": ("reprolab.train", "train the model and log it to MLflow"),
    "evaluate": ("reprolab.evaluate", "test-split metrics and confusion matrix"),
    "register": ("reprolab.register", "register the model; move @champion if it is better"),
}
# The folders of your own code and weights that a stage reads (imported by import path, so no
# import statement shows them): dvc.yaml declares each as a dependency of the stage
# (tests/test_pipeline.py checks), so that editing your network makes tune and train stale.
READS = {
    "fetch": ("sources",),
    "preprocess": ("sources",),
    "tune": ("nets", "${paths.weights}"),
    "train": ("nets", "${paths.weights}"),
    "evaluate": ("nets", "metrics"),
    "register": ("sources", "metrics"),
}
# Commands that are not pipeline stages ("module:function" when the function is not `main`).
TOOLS = {
    "predict": ("reprolab.predict", "class and probability for image files or directories"),
    "promote": ("reprolab.promote",
                "make a registered version the champion by hand (lineage checked)"),
    "verify": ("reprolab.verify", "rebuild a registered model from its commit and compare"),
}
COMMANDS = {**STAGES, **TOOLS}
DEFAULT_PARAMS = "params.yaml"
# Commands that also work outside the project: with --model (predict), or with the store that
# MLFLOW_TRACKING_URI names, when there is no params.yaml.
PARAMS_OPTIONAL = ("predict", "promote")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reprolab",
        description="Reproducible training of PyTorch image classifiers (DVC, MLflow, Optuna).",
    )
    from reprolab import __version__  # pyproject.toml's version (tests/test_config.py checks)

    parser.add_argument("--version", action="version", version=f"reprolab {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(stage, help=help_text, description=help_text)
        p.add_argument("--params", default=DEFAULT_PARAMS, metavar="PATH",
                       help=f"params file (default: {DEFAULT_PARAMS})")
        p.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                       metavar="KEY.PATH=VALUE",
                       help="override one param, validated like the file (repeatable)")
        p.add_argument("--overrides", dest="override_list", default="", metavar="'K=V K=V'",
                       help="several overrides in one string (for MLproject parameters)")
        p.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub.choices["tune"].add_argument(
        "--worker", action="store_true",
        help="join the study with tune.workers more workers (from any machine that reaches "
             "tune.storage); writes no outputs")
    predict = sub.choices["predict"]
    predict.add_argument("--model", metavar="URI",
                         help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, an "
                              "MLflow model folder or a models/model.pt checkpoint (default: "
                              "models:/<the registered model name>@champion); with a folder or "
                              "checkpoint no params.yaml or store is needed")
    predict.add_argument("--invert", action="store_true",
                         help="invert the images first (dark strokes on a light background, "
                              "for a model trained on light strokes on dark)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.add_argument("--allow-pickle", action="store_true",
                         help="also load models in MLflow's pickle format, whose loading runs "
                              "code from the artifact (only for a registry you trust)")
    predict.add_argument("paths", nargs="*", metavar="PATH", help="image files or directories")
    promote = sub.choices["promote"]
    promote.add_argument("name", metavar="NAME", help="registered model name")
    promote.add_argument("version", metavar="VERSION", help="version number to make champion")
    sub.choices["verify"].add_argument(
        "model_uri", metavar="MODEL_URI",
        help="a registered version: models:/NAME@ALIAS or models:/NAME/VERSION")
    return parser


def main(argv: list[str] | None = None) -> int:
    # Start-up without the cyclic garbage collector: importing torch, MLflow, scikit-learn and
    # matplotlib makes millions of objects that live as long as the process, and Python rescans
    # them at every full collection, about a quarter of a short stage's wall time
    # (benchmarks/bench_startup.py). Stages with long work turn it back on when that work
    # begins (lifecycle.startup_over: training epochs, preprocessing); the short ones end first.
    # A caller in the same process (tests) gets the collector back as it was.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return run_command(argv)
    except KeyboardInterrupt:
        # a stop that came while the command was already ending: as its error line was printed,
        # or as a rank whose peer died was reporting it when the launcher stopped the rest.
        # Escaping, it would end the process as killed by SIGINT, which reads as a kill from
        # outside (the launcher would name this rank, not the one that died)
        _ignore_stops()
        print("reprolab: interrupted", file=sys.stderr)
        return 130
    finally:
        (gc.enable if collecting else gc.disable)()


def _ignore_stops() -> None:
    """A second signal while the process winds down must not turn exit code 130 into a death by
    signal."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_command(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)  # also when logging was set up before (tests, embeds)
    # MLflow announces every new store's table set-up, logs a store's failure with a traceback
    # before raising it, and urllib3 warns at every retry: the stage says it in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    # MLflow retries a silent server for minutes by default (7 times, backoff factor 2); a few
    # seconds tell a stage that the server is gone. Set them to wait longer.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    # No network but the stores: MLflow would otherwise send usage telemetry from every stage
    # (a thread that looks up its service, an installation id in ~/.config). Before any import
    # of mlflow; MLFLOW_DISABLE_TELEMETRY=false turns it back on (tests/test_offline.py).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # A process that loaded torch, MLflow and scikit-learn spends 1-2 s of its exit in the
    # interpreter's last garbage collection, over objects that die with the process anyway
    # (benchmarks/bench_startup.py). Freezing them at exit skips it; registered before the stage
    # runs, it runs after the handlers the stage registers (MLflow's flushes among them).
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)
    # A Ctrl-C (or SIGTERM) that lands inside a finalizer is not lost (lifecycle.py says how)
    from reprolab.lifecycle import redeliver_swallowed_interrupts

    redeliver_swallowed_interrupts()
    if args.quiet:  # quiet: MLflow's download bars on stderr too (predict's output is parsed)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from reprolab.config import load_config
    from reprolab.errors import ReprolabError

    overrides = [*shlex.split(args.override_list), *args.overrides]
    cfg = None
    try:
        cfg = None if params_absent(args, overrides) else \
            load_config(args.params, overrides)  # before any work: a bad value writes nothing
        module_name, _, function = COMMANDS[args.stage][0].partition(":")
        module = importlib.import_module(module_name)
        code = getattr(module, function or "main")(cfg, args)
    except ReprolabError as exc:
        print(f"reprolab {args.stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        _ignore_stops()
        print(f"reprolab {args.stage}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the disk, not the code: full, read-only, no permission
        print(f"reprolab {args.stage}: error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:
        described = describe_store_error(exc, cfg, args.stage)
        if described is None:
            raise  # a bug: the traceback is what a report needs
        print(f"reprolab {args.stage}: error: {described[0]}", file=sys.stderr)
        return described[1]
    return code or 0


def params_absent(args: argparse.Namespace, overrides: list[str]) -> bool:
    """predict and promote outside a project: no params.yaml here, none named, no -S."""
    from pathlib import Path

    return (args.stage in PARAMS_OPTIONAL and args.params == DEFAULT_PARAMS and not overrides
            and not Path(DEFAULT_PARAMS).exists())


def describe_os_error(exc: OSError) -> str:
    import errno

    where = exc.filename or "(a file)"
    advice = {
        errno.ENOSPC: "no space left on the device; free some and run again",
        errno.EDQUOT: "disk quota exceeded; free some and run again",
        errno.EROFS: "read-only file system; point paths.* (or the store) at a writable place",
        errno.EACCES: "permission denied; make it writable for this user, or point paths.* "
                      "elsewhere",
        errno.EPERM: "operation not permitted; make it writable for this user, or point "
                     "paths.* elsewhere",
    }.get(exc.errno, exc.strerror or str(exc))
    return f"{where}: {advice} (outputs are written atomically: nothing was half-written)"


def describe_store_error(exc: Exception, cfg: object, stage: str) -> tuple[str, int] | None:
    """(One line, the exit code) for a tracking store or study database that failed under the
    stage (gone, unreachable, read-only: 1), or a server that refused the user's credentials or
    permission (2); None for anything else."""
    module = type(exc).__module__.split(".")[0]
    if module not in ("mlflow", "sqlalchemy", "psycopg", "pymysql", "requests", "urllib3"):
        return None
    what = "the Optuna storage" if module in ("sqlalchemy", "psycopg", "pymysql") else \
        f"the MLflow store {getattr(cfg, 'mlflow_uri', '')}"
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:500]
    refused = re.search(r"error code (401|403)\b", first)
    if module == "mlflow" and refused:  # an authenticated server (basic-auth) said no
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "")
        if refused.group(1) == "401":
            return (f"{what} did not accept user {user!r}: check MLFLOW_TRACKING_USERNAME and "
                    "MLFLOW_TRACKING_PASSWORD"), 2
        endpoint = re.search(r"endpoint (\S+)", first)
        return (f"{what} gives user {user!r} no permission for this "
                f"({endpoint.group(1) if endpoint else 'a request'}): the owner of the "
                "experiment or registered model, or an admin, can grant it"), 2
    again = "run again (train resumes its run)" if stage == "train" else "run again"
    return f"{what}: check that it is reachable and writable, then {again}: {first}", 1


if __name__ == "__main__":
    sys.exit(main())
