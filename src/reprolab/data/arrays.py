"""The processed split files: `.npy` arrays written in a streaming pass and read by mapping.

A split is two files, `<split>.x.npy` (uint8 images N x C x H x W) and `<split>.y.npy` (int64
labels N). The writer appends one chunk at a time and writes the header, whose shape holds the
final count, when it closes (the header has a fixed length, so it is rewritten in place), so a
split of any size is written with memory flat in its size. Readers map the files
(`numpy.load(mmap_mode="r")`): what they read is the kernel's page cache, shared by every
process that maps the same file (torchrun's ranks, tuning workers), never a private copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

HEADER = 128  # bytes before the data: magic, version, length, the header text padded


def header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A .npy (format 1.0) header of exactly HEADER bytes."""
    text = repr({"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                 "shape": tuple(int(n) for n in shape)})
    body_len = HEADER - 10  # magic (6), version (2), header length (2)
    text = text.ljust(body_len - 1) + "\n"
    assert len(text) == body_len, "a shape too long for the fixed header"
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + text.encode("latin1")


class ArrayWriter:
    """Append rows of one dtype and row shape to a .npy file; the header comes last."""

    def __init__(self, path: Path, dtype: Any):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.rows, self.row_shape = 0, None
        self.file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self.file.write(b"\0" * HEADER)

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if self.row_shape is None:
            self.row_shape = rows.shape[1:]
        assert rows.shape[1:] == self.row_shape, (rows.shape, self.row_shape)
        self.file.write(rows.tobytes())
        self.rows += len(rows)

    def close(self, row_shape: tuple[int, ...] = ()) -> None:
        """Write the header (`row_shape` for a file that got no rows) and close."""
        shape = (self.rows, *(self.row_shape if self.row_shape is not None else row_shape))
        self.file.seek(0)
        self.file.write(header(self.dtype, shape))
        self.file.close()


def open_array(path: Path) -> np.ndarray:
    """A .npy file mapped read-only: no byte of it is read into private memory (an empty one,
    which cannot be mapped, is read)."""
    with open(path, "rb") as fh:
        np.lib.format.read_magic(fh)
        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    if 0 in shape:
        return np.empty(shape, dtype=dtype)
    return np.load(path, mmap_mode="r")


def sha256_stream(paths: list[Path]) -> str:
    """One sha256 over the files, read in blocks (the page cache serves them): a split's hash."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
