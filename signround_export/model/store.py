"""A model folder's weights, read from its safetensors files one tensor at a time, when asked for.

Tuning reads one block at a time through TensorStore, so a model larger than memory can be tuned: the files
keep their stored dtype (bfloat16, float16 or float32) on disk, and only the tensors in use are held as
float32. What every tensor is called, and its dtype and shape, is known from the headers alone. A
quantized checkpoint's packed integers are read the same way, as stored, through StoredArrays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelError, SignroundError
from .folder import TensorHeader, read_tensor, safetensors_headers


class _HeaderMapping(Mapping):
    """A Mapping over safetensors headers: names, `in` and shapes from the headers, values read on
    indexing (every read a fresh copy the caller drops; nothing is cached)."""

    def __init__(self, headers: dict[str, TensorHeader], error: type[SignroundError], remedy: str):
        self.headers, self.error, self.remedy = headers, error, remedy

    def read(self, name: str, dtype=None) -> torch.Tensor:
        return read_tensor(name, self.headers[name], self.error, self.remedy, dtype)

    def __contains__(self, name: object) -> bool:  # from the headers, without reading (Mapping's would read)
        return name in self.headers

    def __iter__(self) -> Iterator[str]:
        return iter(self.headers)

    def __len__(self) -> int:
        return len(self.headers)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.headers[name].shape


class TensorStore(_HeaderMapping):
    """name -> float32 tensor over a folder's safetensors shards, checked finite when read."""

    def __init__(self, folder: Path, error: type[SignroundError] = ModelError,
                 remedy: str = "rebuild or re-download it"):
        super().__init__(safetensors_headers(Path(folder), error, remedy), error, remedy)

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.read(name, torch.float32)
        if not finite(t):
            raise ModelError(f"tensor {name} contains NaN or infinity; the model weights are broken")
        return t


class StoredArrays(_HeaderMapping):
    """name -> numpy array as stored (bfloat16, which numpy cannot hold, as float32), unchecked."""

    def __getitem__(self, name: str) -> np.ndarray:
        t = self.read(name)
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


def finite(t: torch.Tensor) -> bool:
    """Whether every value of t is finite, checked a slice at a time: isfinite over a whole tensor makes
    temporaries larger than the tensor (measured: 1.25 GB more for a 1 GB embedding)."""
    return all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(1 << 24))


class Lazy(Mapping):
    """names -> load(name), called on every indexing and not kept: a consumer that takes a block's
    entries, uses them and drops them holds one block. Iteration, len, `in` and shape(name) (a tensor's
    shape, a layer's [N, K], when a shape function is given) read nothing."""

    def __init__(self, names, load: Callable, shape: Callable[[str], tuple[int, ...]] | None = None):
        self.names, self.load, self._shape = dict.fromkeys(names), load, shape

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.names:
            raise KeyError(name)
        return tuple(self._shape(name)) if self._shape else tuple(self.load(name).shape)

    def __getitem__(self, name: str):
        if name not in self.names:
            raise KeyError(name)
        return self.load(name)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)
