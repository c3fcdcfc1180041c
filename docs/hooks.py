"""MkDocs hooks: the pages that list facts are generated from the code that holds them, so they
cannot drift. A page asks for a table with `<!-- generated: NAME -->`:

- `config`: every key of params.yaml, from the config's own definitions (src/reprolab/config/)
  with params.yaml's value and comment;
- `cli`: every command and option, from the argparse parser (src/reprolab/cli.py);
- `tags`: every name reprolab writes into MLflow, from src/reprolab/tags.py.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return re.sub(r"<!-- generated: (\w+) -->", lambda m: GENERATORS[m.group(1)](), markdown)


# ---- params.yaml ----


def _comments() -> dict[str, str]:
    """`section.key` -> its comment in params.yaml (continuation lines joined)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    last = None
    for line in (REPO / "params.yaml").read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") and last is None:
            continue
        match = re.match(r"^(\s*)([A-Za-z_]\w*):\s*([^#]*?)\s*(?:#\s?(.*))?$", line)
        if match:
            indent = len(match.group(1))
            stack = [(i, k) for i, k in stack if i < indent] + [(indent, match.group(2))]
            last = ".".join(k for _, k in stack)
            out[last] = (match.group(4) or "").strip()
        elif last and line.lstrip().startswith("#"):
            out[last] = (out[last] + " " + line.lstrip()[1:].strip()).strip()
    return out


def _takes(schema: dict[str, Any], defs: dict[str, Any]) -> str:
    """What a key takes, from its JSON schema (pydantic's): types, choices and bounds."""
    if "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if "anyOf" in schema:
        return " or ".join(_takes(s, defs) for s in schema["anyOf"])
    if "enum" in schema:
        return " or ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = {"integer": "int", "number": "float", "string": "str", "boolean": "bool",
            "null": "null", "object": "mapping", "array": "list"}.get(schema.get("type"), "any")
    if kind == "list" and "items" in schema:
        kind = f"list of {_takes(schema['items'], defs)}"
    if kind == "list" and "prefixItems" in schema:
        kind = "[" + ", ".join(_takes(s, defs) for s in schema["prefixItems"]) + "]"
    bounds = [f"{word} {schema[key]}" for key, word in (
        ("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="),
        ("exclusiveMaximum", "<"), ("minLength", "length >="), ("minItems", "items >="),
        ("pattern", "matching")) if key in schema]
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def config_reference() -> str:
    import yaml

    from reprolab.config import Config, _flatten

    values = _flatten(yaml.safe_load((REPO / "params.yaml").read_text()))
    comments = _comments()
    schema = Config.model_json_schema()
    defs = schema.get("$defs", {})
    rows = ["| key | default | takes | what it does |", "|---|---|---|---|"]

    def walk(props: dict[str, Any], prefix: str) -> None:
        for name, prop in props.items():
            key = f"{prefix}{name}"
            ref = prop.get("$ref", "").rsplit("/", 1)[-1]
            if ref and "properties" in defs.get(ref, {}):
                walk(defs[ref]["properties"], key + ".")
                continue
            value = values.get(key)
            shown = "{}" if value is None and prop.get("type") == "object" else \
                "null" if value is None else str(value)
            rows.append(f"| `{key}` | `{shown}` | {_takes(prop, defs).replace('|', ' or ')} | "
                        f"{comments.get(key, '').replace('|', ' or ')} |")

    walk(schema["properties"], "")
    return "\n".join(rows)


# ---- the CLI ----


def cli_reference() -> str:
    from reprolab.cli import COMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "stage")
    out = []
    for name, (_, help_text) in COMMANDS.items():
        command = sub.choices[name]
        out += [f"## `reprolab {name}`", "", help_text[0].upper() + help_text[1:] + ".", "",
                "| option | what it does |", "|---|---|"]
        for action in command._actions:
            if action.dest == "help":
                continue
            flags = ", ".join(action.option_strings) or action.metavar or action.dest
            out.append(f"| `{flags}` | {(action.help or '').replace('|', ' or ')} |")
        out.append("")
    return "\n".join(out)


# ---- MLflow tags ----


def tags_reference() -> str:
    source = (REPO / "src" / "reprolab" / "tags.py").read_text()
    rows = ["| tag | where | what it says |", "|---|---|---|"]
    where = ""
    for line in source.splitlines():
        heading = re.match(r"^# ---- (.*)$", line)
        if heading:
            where = heading.group(1)
            continue
        match = re.match(r'^[A-Z_]+ = "([^"]+)"(?:\s*#\s*(.*))?$', line)
        if match:
            rows.append(f"| `{match.group(1)}` | {where} | {match.group(2) or ''} |")
    return "\n".join(rows)


GENERATORS = {"config": config_reference, "cli": cli_reference, "tags": tags_reference}
