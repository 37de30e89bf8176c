"""A float model's weights, read from its safetensors files one tensor at a time, when asked for.

Tuning reads one block at a time through it, so a model larger than memory can be tuned: the files keep
their stored dtype (bfloat16, float16 or float32) on disk, and only the tensors in use are held as
float32. What every tensor is called, and its dtype and shape, is known from the headers alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import ModelError, SignroundError
from .folder import TensorHeader, safetensors_headers


class TensorStore(Mapping):
    """name -> float32 tensor over a folder's safetensors shards. Indexing reads the tensor from its
    memory-mapped file, upcasts it and checks that it is finite; every read is a fresh copy that the
    caller drops when done (nothing is cached here)."""

    def __init__(self, folder: Path, error: type[SignroundError] = ModelError,
                 remedy: str = "rebuild or re-download it"):
        self.error, self.remedy = error, remedy
        self.headers: dict[str, TensorHeader] = safetensors_headers(Path(folder), error, remedy)

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        header = self.headers[name]
        try:
            with safe_open(str(header.file), framework="pt") as st:
                # a copy: the file's mapping is released when the file closes, not when the tensor goes
                t = st.get_tensor(name).to(torch.float32, copy=True)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise self.error(f"{header.file} is truncated or corrupt ({e}); {self.remedy}") from None
        if not finite(t):
            raise ModelError(f"tensor {name} contains NaN or infinity; the model weights are broken")
        return t

    def __contains__(self, name: object) -> bool:  # from the headers, without reading (Mapping's would read)
        return name in self.headers

    def __iter__(self) -> Iterator[str]:
        return iter(self.headers)

    def __len__(self) -> int:
        return len(self.headers)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.headers[name].shape


def finite(t: torch.Tensor) -> bool:
    """Whether every value of t is finite, checked a slice at a time: isfinite over a whole tensor makes
    temporaries larger than the tensor (measured: 1.25 GB more for a 1 GB embedding)."""
    return all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(1 << 24))
