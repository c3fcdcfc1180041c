"""Your own code by import path: `package.module:Name` -> the object, from the repository's own
top-level folders first (nets/, sources/, metrics/), with one clear line when it does not import.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from reprolab.errors import ConfigError

IMPORT_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def is_import_path(text: str) -> bool:
    return bool(IMPORT_PATH.match(text))


def _from_this_project(top: str, base_dir: Path) -> None:
    """Import the package `top` from `base_dir`: its folder goes first on sys.path, and a
    package of that name imported from elsewhere (another clone, another test's project) is
    forgotten, so that the code run is the code DVC hashed."""
    root = str(base_dir.resolve())
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    loaded = sys.modules.get(top)
    where = getattr(loaded, "__file__", None) or next(iter(getattr(loaded, "__path__", [])), None)
    if loaded is not None and (where is None or not Path(where).resolve().is_relative_to(root)):
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]
    importlib.invalidate_caches()


def load_object(path: str, base_dir: Path | None, key: str, allowed: str) -> Any:
    """`package.module:Name` -> the object. `key` and `allowed` make the one-line error: the
    params key that named it and what it may name."""
    module_name, _, attr = path.partition(":")
    top = module_name.split(".")[0]
    if base_dir is not None and (base_dir / top).is_dir():
        _from_this_project(top, base_dir)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module may fail in any way; say how
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        raise ConfigError(f"{key} = {path!r}: cannot import {module_name} ({reason}); "
                          f"allowed: {allowed}") from None
    if not hasattr(module, attr):
        raise ConfigError(f"{key} = {path!r}: {module_name} has no {attr!r}; allowed: {allowed}")
    return getattr(module, attr)


def code_sha256(path: str, base_dir: Path | None) -> str | None:
    """sha256 of the user's code behind an import path: every .py file of its top-level folder
    in the repository (a module may import its neighbours), or of the module's own file when it
    lives elsewhere. None for code that is not the repository's own."""
    module_name = path.partition(":")[0]
    top = module_name.split(".")[0]
    files: list[Path] = []
    if base_dir is not None and (base_dir / top).is_dir():
        files = sorted(p for p in (base_dir / top).rglob("*.py") if "__pycache__" not in p.parts)
        root = base_dir
    else:
        spec = importlib.util.find_spec(module_name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        files, root = [Path(spec.origin)], Path(spec.origin).parent
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()
