"""Reading params.yaml: YAML whose keys are unique, `-S key.path=value` overrides read as YAML
(as DVC's -S reads them), and every validation error as one line that names the key, the value
and what is allowed. The sections, their rules and the derived values are config.py's."""

from __future__ import annotations

import difflib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from reprolab.config import Config
from reprolab.errors import ConfigError

# keys that moved: the old key's error names the new one
MOVED = {"model.hidden": "model.kwargs.hidden", "model.width": "model.kwargs.width"}


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=0.01` -> (["train", "lr"], 0.01); the value is read as YAML, as DVC's -S does."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"-S {text!r}: expected key.path=value, e.g. -S train.lr=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = tree
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}  # unknown section: validation names it below
            if not isinstance(child, dict):
                where = ".".join(keys[: depth + 1])
                raise ConfigError(f"-S {text}: {where} is a value, not a section")
            node = child
        node[keys[-1]] = value
    return tree


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys that the section holding `loc` accepts, to say what is allowed."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden" and key in MOVED:
        return (f"{key}: moved to {MOVED[key]} (the model's keyword arguments: "
                f"-S {MOVED[key]}={error['input']!r})")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        prefix = ".".join(str(p) for p in loc[:-1])
        hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}? " if close else ""
        return f"unknown key {key}; {hint}allowed keys here: {', '.join(allowed)}"
    if kind == "missing":
        return f"{key}: missing; every knob must be set in params.yaml"
    msg = error["msg"]
    if msg.startswith("Value error, "):
        return msg.removeprefix("Value error, ")  # our validators name their keys
    return f"{key} = {error['input']!r}: {msg[0].lower()}{msg[1:]}"


class DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so a second `lr:` would override the first without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKey(
                    f"key {key!r} appears twice in one section (lines {seen[key]} and "
                    f"{key_node.start_mark.line + 1}); keep one"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_config(
    params: str | os.PathLike[str] = "params.yaml", overrides: Sequence[str] = ()
) -> Config:
    path = Path(params)
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except DuplicateKey as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    tree = apply_overrides(tree, list(overrides))
    source = f"{path}" + (" with -S overrides" if overrides else "")
    return _validate(tree, source, path.resolve().parent)


def _validate(tree: dict[str, Any], source: str, base_dir: Path) -> Config:
    try:
        cfg = Config.model_validate(tree)
    except ValidationError as exc:
        # a typo is both an unknown key and a missing one: name the typo
        first = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        raise ConfigError(f"{source}: {_describe(first)}") from None
    cfg._base_dir = base_dir
    return cfg


def with_train(cfg: Config, values: dict[str, Any], source: str) -> Config:
    """`cfg` with `values` in place of keys of its train section, validated like params.yaml:
    tuned hyperparameters (and a tuning trial's point) become the config that trains."""
    tree = cfg.as_dict()
    tree["train"] = {**tree["train"], **values}
    return _validate(tree, source, cfg.base_dir)


def with_tuned(cfg: Config) -> Config:
    """The config that trains: with train.use_tuned, tune's best params override the train
    section. Its params_hash tells two differently tuned models apart."""
    if not cfg.train.use_tuned:
        return cfg
    path = cfg.best_params_file
    if not path.is_file():
        raise ConfigError(
            f"{path}: not found; run `reprolab tune` first, or set train.use_tuned: false"
        )
    try:
        best = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        best = None
    if not isinstance(best, dict):
        raise ConfigError(f"{path}: expected a mapping of train keys (lr, optimizer, ...)")
    return with_train(cfg, best, str(path))
