"""Safetensors files written a tensor at a time, and a checkpoint's tensors split into shards.

A safetensors file is an 8-byte header length, a JSON header naming every tensor's dtype, shape and byte
range, then the data. The header depends on dtypes and shapes only, so it is computed first and each
tensor is written at its offset when it comes: nothing but the tensor in hand is held in memory. The
layout is the one safetensors' own save_file gives (data sorted by dtype, widest first, then by name;
the header padded with spaces to 8 bytes), so the same tensors give save_file's header and data.

Every tensor's digest goes into the header's metadata (digests.py). The header comes first, so it is
written with fixed-length placeholders; each tensor is hashed as it is written, and once all are, the
header is written again over the first with the real digests: the same length, so no offset moves.
(save_file orders metadata keys by a hash map, ours are sorted: with more than one key the headers
are equal as JSON, not byte for byte.)

Sharding follows transformers' save_pretrained: units (one quantized layer's tensors, or one float
tensor) fill a shard in order until the next one would pass the shard size (a unit larger than the
size gets a shard of its own; a layer is never split); files are model-0000X-of-0000Y.safetensors with
model.safetensors.index.json, or model.safetensors alone when everything fits in one.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..digests import PLACEHOLDER, digest_of, metadata_key
from ..errors import CheckpointError

DEFAULT_SHARD_SIZE = "5GB"  # transformers' and auto-round's default
SINGLE = "model.safetensors"

# safetensors' dtype names, in the order of its Dtype enum (the data is sorted by it, last first)
DTYPE_ORDER = ("BOOL", "U8", "I8", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64")
NUMPY_DTYPES = {np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8",
                np.dtype(np.int16): "I16", np.dtype(np.uint16): "U16", np.dtype(np.float16): "F16",
                np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32", np.dtype(np.float32): "F32",
                np.dtype(np.float64): "F64", np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64"}
ITEM_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4,
              "F32": 4, "F64": 8, "I64": 8, "U64": 8}


@dataclass(frozen=True)
class TensorSpec:
    """What a tensor will be, known before its values: safetensors' dtype name and the shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return ITEM_BYTES[self.dtype] * int(np.prod(self.shape, dtype=np.int64))

    @classmethod
    def of(cls, array: np.ndarray) -> "TensorSpec":
        return cls(NUMPY_DTYPES[np.dtype(array.dtype)], tuple(array.shape))


def safetensors_header(specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None
                       ) -> tuple[bytes, dict[str, int]]:
    """The file's first bytes (length and padded JSON header) and each tensor's offset in the data."""
    order = sorted(specs, key=lambda n: (-DTYPE_ORDER.index(specs[n].dtype), n.encode()))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    offsets, at = {}, 0
    for name in order:
        spec = specs[name]
        offsets[name] = at
        header[name] = {"dtype": spec.dtype, "shape": list(spec.shape), "data_offsets": [at, at + spec.nbytes]}
        at += spec.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


class SafetensorsWriter:
    """One safetensors file written a tensor at a time, in any order; close() checks that every tensor
    of the header was written and puts their digests in the header. Write to a temporary name
    (atomic.py): an unfinished file has holes and placeholder digests."""

    def __init__(self, path: str | Path, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None):
        self.path, self.specs, self.metadata = Path(path), dict(specs), dict(metadata or {})
        self.digests = dict.fromkeys(self.specs, PLACEHOLDER)
        head, self.offsets = self.header()
        self.data_start = len(head)
        self.pending = set(self.specs)
        self.file = open(self.path, "wb")
        self.file.write(head)

    def header(self) -> tuple[bytes, dict[str, int]]:
        """The header with the digests known so far (placeholders for the others) in the metadata."""
        return safetensors_header(self.specs, self.metadata | {metadata_key(n): d for n, d in self.digests.items()})

    def write(self, name: str, array: np.ndarray) -> None:
        spec = self.specs.get(name)
        if spec is None or name not in self.pending:
            raise CheckpointError(f"{self.path}: tensor {name} is not expected here or was written twice")
        array = np.ascontiguousarray(array)  # safetensors stores memory as it lies: no strided views
        if TensorSpec.of(array) != spec:
            raise CheckpointError(f"{self.path}: tensor {name} is {array.dtype} {list(array.shape)}, but the "
                                  f"header says {spec.dtype} {list(spec.shape)}")
        self.file.seek(self.data_start + self.offsets[name])
        data = array.data if array.size else b""
        self.file.write(data)
        self.digests[name] = digest_of(data)
        self.pending.discard(name)

    def close(self) -> None:
        if self.pending:
            self.file.close()
            raise CheckpointError(f"{self.path}: {len(self.pending)} tensors were never written, e.g. "
                                  f"{sorted(self.pending)[:3]}")
        self.file.truncate(self.data_start + sum(s.nbytes for s in self.specs.values()))
        head, _ = self.header()
        assert len(head) == self.data_start, "a digest did not fill its placeholder's room"
        self.file.seek(0)
        self.file.write(head)
        self.file.close()

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, *_) -> None:
        if kind is None:
            self.close()
        else:
            self.file.close()


def parse_size(size: int | str) -> int:
    """A shard size in bytes: an int, or "5GB", "500MB", "2GiB", "100KB" as transformers reads them;
    CheckpointError naming `shard_size` otherwise."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(I?))?B?\s*", str(size).upper())
        if m is None:
            raise CheckpointError(f"`shard_size` {size!r}: give bytes or a number with a unit (KB, MB, GB, "
                                  "GiB, ...), e.g. 5GB", param="shard_size")
        power = " KMGT".index(m.group(2)) if m.group(2) else 0
        value = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if value <= 0:
        raise CheckpointError(f"`shard_size` {size!r}: give a positive size, e.g. 5GB", param="shard_size")
    return value


@dataclass
class Unit:
    """Tensors that go to one shard together: a quantized layer's, or one float tensor. load() gives
    them as arrays (read or packed when called, dropped by the caller after writing)."""

    name: str
    specs: dict[str, TensorSpec]
    load: Callable[[], dict[str, np.ndarray]]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs.values())


def plan_shards(units: list[Unit], shard_size: int | str) -> list[list[Unit]]:
    """Units in order, a new shard started whenever the next would pass shard_size."""
    limit = parse_size(shard_size)
    shards: list[list[Unit]] = [[]]
    size = 0
    for unit in units:
        if shards[-1] and size + unit.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def index_json(shards: list[list[Unit]]) -> str:
    """model.safetensors.index.json as transformers writes it."""
    weight_map = {t: file for file, units in zip(shard_names(len(shards)), shards) for u in units for t in u.specs}
    total = sum(u.nbytes for units in shards for u in units)
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"


def write_shard(path: Path, units: list[Unit]) -> None:
    """One shard, a unit in memory at a time."""
    specs = {t: s for u in units for t, s in u.specs.items()}
    if len(specs) != sum(len(u.specs) for u in units):
        raise CheckpointError(f"{path}: a tensor name occurs twice among the checkpoint's tensors")
    with SafetensorsWriter(path, specs, metadata={"format": "pt"}) as writer:
        for unit in units:
            arrays = unit.load()
            if set(arrays) != set(unit.specs):
                raise CheckpointError(f"{unit.name}: gave tensors {sorted(arrays)}, expected {sorted(unit.specs)}")
            for name, array in arrays.items():
                writer.write(name, array)
            del arrays
