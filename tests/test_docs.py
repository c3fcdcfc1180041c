"""The docs hold what the code holds: the reference tables are generated from it, and these
tests check that the generators miss nothing; the README stays short and its links resolve.
(`make test` builds the site with `mkdocs build --strict` first: broken links fail it.)"""

from __future__ import annotations

import re
import sys

import yaml

from conftest import REPO
from reprolab import tags
from reprolab.cli import COMMANDS
from reprolab.config import _flatten

sys.path.insert(0, str(REPO / "docs"))

import hooks  # noqa: E402


def test_the_configuration_page_lists_every_key_of_params_yaml():
    table = hooks.config_reference()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    mappings = {f"{s}.{k}" for s, v in params.items() if isinstance(v, dict)
                for k, w in v.items() if isinstance(w, dict) and k != "augment"}
    keys = {k for k in _flatten(params) if not any(k.startswith(m + ".") for m in mappings)}
    listed = set(re.findall(r"^\| `([^`]+)` \|", table, re.M))
    assert listed == keys | mappings  # a free mapping (model.kwargs) is one key
    assert "| `train.lr` | `0.001` | float (> 0) |" in table


def test_the_cli_page_lists_every_command():
    text = hooks.cli_reference()
    assert set(re.findall(r"^## `reprolab (\w+)`", text, re.M)) == set(COMMANDS)
    assert "`-S, --set`" in text


def test_the_tracking_page_lists_every_tag():
    text = hooks.tags_reference()
    names = {v for k, v in vars(tags).items() if k.isupper() and isinstance(v, str)}
    assert names == set(re.findall(r"^\| `([^`]+)` \|", text, re.M))
    assert "<!-- generated: tags -->" in (REPO / "docs" / "tracking.md").read_text()


def test_the_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        assert (REPO / link).exists(), link
