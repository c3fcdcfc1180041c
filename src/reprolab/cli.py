"""`reprolab <stage> [--params params.yaml] [-S key.path=value ...]`: one subcommand per stage.

Nothing heavy is imported here: torch, mlflow and optuna load inside the stage that needs them,
so `reprolab --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys

# stage -> module; a stage, its module, its params section and its report folder share a name.
STAGES = {
    "fetch": ("reprolab.data.fetch", "download or copy the raw dataset and write its manifest"),
    "preprocess": ("reprolab.data.preprocess", "verify raw files; write uint8 tensor splits"),
    "tune": ("reprolab.tune", "search lr and optimizer with Optuna"),
    "train": ("reprolab.train", "train the model and log it to MLflow"),
    "evaluate": ("reprolab.evaluate", "test-split metrics and confusion matrix"),
    "register": ("reprolab.register", "register the model; move @champion if it is better"),
}
# Commands that are not pipeline stages.
TOOLS = {
    "predict": ("reprolab.predict", "class and probability for image files or directories"),
    "verify": ("reprolab.verify", "rebuild a registered model from its commit and compare"),
}
COMMANDS = {**STAGES, **TOOLS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reprolab",
        description="Reproducible training of PyTorch image classifiers (DVC, MLflow, Optuna).",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(stage, help=help_text, description=help_text)
        p.add_argument("--params", default="params.yaml", metavar="PATH",
                       help="params file (default: params.yaml)")
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
                         help="model URI (default: models:/<register.model_name>@champion)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of a table")
    predict.add_argument("paths", nargs="*", metavar="PATH", help="image files or directories")
    sub.choices["verify"].add_argument(
        "model_uri", metavar="MODEL_URI",
        help="a registered version: models:/NAME@ALIAS or models:/NAME/VERSION")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)  # also when logging was set up before (tests, embeds)
    # MLflow announces every new store's table set-up: not news for a user of a stage
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    from reprolab.config import load_config
    from reprolab.errors import ReprolabError

    overrides = [*shlex.split(args.override_list), *args.overrides]
    try:
        cfg = load_config(args.params, overrides)  # before any work: a bad value writes nothing
        module = importlib.import_module(COMMANDS[args.stage][0])
        code = module.main(cfg, args)
    except ReprolabError as exc:
        print(f"reprolab {args.stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"reprolab {args.stage}: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
