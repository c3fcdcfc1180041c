"""Files: atomic writes, content hashes, json and yaml. A stage never leaves a half-written
output behind."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# misdirected output can never delete a folder reprolab did not write.
MARKER = ".reprolab-output"


@contextlib.contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """OSErrors name `path` (a failed write often names no file); torch's writer reports a full
    disk as a RuntimeError, which becomes the OSError it is."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    except RuntimeError as exc:
        if "inline_container" not in str(exc) and "PytorchStreamWriter" not in str(exc):
            raise
        full = shutil.disk_usage(path.parent if path.parent.exists() else ".").free < 1 << 24
        code = errno.ENOSPC if full else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from exc


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path` in one rename."""
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def replaceable(path: Path) -> bool:
    """Whether atomic_dir may replace `path`: absent, or a folder that reprolab wrote (MARKER)."""
    if not path.exists():
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    return (path / MARKER).is_file()


def check_replaceable(path: Path) -> None:
    """Refuse, with one line, an output folder that atomic_dir would not replace (a stage
    calls it before its work too, so that nothing is spent on outputs it cannot write)."""
    from reprolab.errors import ConfigError

    if not replaceable(path):
        raise ConfigError(
            f"{path}: exists and was not written by reprolab (no {MARKER} inside); refusing to "
            "replace it: move it away, or point this output's paths.* knob elsewhere"
        )


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it takes the place of `path`.

    An existing `path` is replaced only when reprolab wrote it (see `replaceable`): anything
    else there is refused with one line and left as it is.
    """
    check_replaceable(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            yield tmp
            (tmp / MARKER).write_text("written by reprolab; replaced whole on the next run\n")
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

