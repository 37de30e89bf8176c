"""Digests that files carry of their own bytes, so that a damaged file is refused instead of being read.

A checkpoint shard keeps one digest per tensor in its safetensors `__metadata__` (str -> str, which
safetensors', transformers' and auto-round's loaders pass over), under "sha256:" + the tensor's name.
The reader hashes the bytes as it reads them and refuses a tensor whose digest differs; a file with no
such keys (written by another tool) is read as before.

sha256 rather than blake2b: measured on this machine (hashlib, OpenSSL 3.0, a CPU with SHA
instructions) 1560 MB/s against blake2b's 900 MB/s, and `sha256sum` can check it from a shell.
"""

from __future__ import annotations

import hashlib

ALGORITHM = "sha256"
PREFIX = ALGORITHM + ":"  # a metadata key is PREFIX + tensor name
PLACEHOLDER = "0" * hashlib.new(ALGORITHM).digest_size * 2  # the room a digest takes before it is known


def new_hash():
    return hashlib.new(ALGORITHM)


def digest_of(data) -> str:
    """The hex digest of bytes (or of anything exposing the buffer protocol)."""
    return hashlib.new(ALGORITHM, data).hexdigest()


def metadata_key(tensor: str) -> str:
    return PREFIX + tensor


def tensor_digests(metadata: dict | None) -> dict[str, str]:
    """Tensor name -> digest, from a safetensors file's `__metadata__`."""
    return {k[len(PREFIX):]: v for k, v in (metadata or {}).items() if k.startswith(PREFIX) and isinstance(v, str)}
