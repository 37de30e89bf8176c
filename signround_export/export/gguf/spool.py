"""Encoded tensors kept on disk until the GGUF file can be written, so the writer holds one at a time.

A GGUF file lists every tensor's type, shape and offset before any data, and general.file_type in its
metadata counts every layer's type. A quantized layer's type is known only once it is encoded (whether
its integers fit a block type exactly depends on their values), so planning the header from shapes
alone would mean encoding twice or repeating encode.py's choices. Instead each tensor is encoded once,
its bytes appended to an unnamed temporary file beside the output and dropped; the file is then
written in its own order, each tensor's bytes copied from the spool. The cost is disk: the spool and
the file both exist until the file is whole. Each tensor's digest is taken as it is spooled, so the
header can carry them all (write.py) without reading the data again.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...digests import digest_of


@dataclass(frozen=True)
class Spooled:
    """Where one tensor's bytes lie in the spool, the array they make and their digest."""
    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype
    digest: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class TensorSpool:
    """Arrays appended to a temporary file (deleted when closed, or when the process ends) by name."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.file = tempfile.TemporaryFile(prefix=".gguf-tensors.", dir=folder)
        self.entries: dict[str, Spooled] = {}

    def __enter__(self) -> TensorSpool:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def add(self, name: str, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data)
        raw = data.reshape(-1).view(np.uint8)
        self.entries[name] = Spooled(self.file.tell(), data.shape, data.dtype, digest_of(raw))
        self.file.write(raw)

    def read(self, name: str) -> np.ndarray:
        """The array spooled under name, mapped from the file (its pages are the page cache's, not a copy)."""
        entry = self.entries[name]
        self.file.flush()
        return np.memmap(self.file, dtype=entry.dtype, mode="r", offset=entry.offset, shape=entry.shape)
