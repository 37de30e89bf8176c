"""Load a float HF model folder, or a quantized checkpoint as the reference model, into `Model`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.format import Checkpoint
from ..checkpoint.read import read_checkpoint
from ..errors import ModelError
from .config import ModelConfig
from .folder import read_hf_config, resolve_model_dir
from .forward import Model
from .store import TensorStore


def load_float_model(model: str | Path) -> tuple[Model, dict, Path]:
    """(model, HF config dict, folder) with float32 weights, each read from disk when it is indexed
    (a TensorStore: the headers are read and checked now, a tensor's data only when it is used)."""
    folder = resolve_model_dir(model)
    hf = read_hf_config(folder)
    if "quantization_config" in hf:
        raise ModelError(f"{folder} is already quantized ({hf['quantization_config'].get('quant_method')}); "
                         "give the float model")
    cfg = ModelConfig.from_hf(hf)
    return Model(cfg, TensorStore(folder, ModelError, "rebuild or re-download it")), hf, folder


def in_memory(model: Model) -> Model:
    """The model with every tensor read once and held: for whole-model forwards run many times
    (perplexity, validation), which would otherwise read every weight from disk on every call."""
    return Model(model.cfg, dict(model.tensors))


class FloatTensors(Mapping):
    """A TensorStore's tensors as float32 numpy arrays, each read from disk when indexed (the Checkpoint's
    contract: a consumer that takes one at a time and drops it holds one at a time), without the names
    in `hidden`."""

    def __init__(self, store: TensorStore, hidden: frozenset[str] = frozenset()):
        self.store, self.hidden = store, hidden

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self.hidden:
            raise KeyError(name)
        return self.store[name].numpy()

    def __contains__(self, name: object) -> bool:  # from the headers (Mapping's would read the tensor)
        return name not in self.hidden and name in self.store

    def __iter__(self) -> Iterator[str]:
        return (n for n in self.store if n not in self.hidden)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def float_checkpoint(model: str | Path):
    """A float model as a Checkpoint with no quantized layers: every weight goes to the exporters as a
    float tensor (float16 GGUF, float32 ONNX), read from the model's files when the exporter takes it."""
    llama, hf, folder = load_float_model(model)
    tied = frozenset({"lm_head.weight"}) if llama.cfg.tie_word_embeddings else frozenset()
    return Checkpoint(path=folder, hf_config=hf, quant=None, qweights={}, tensors=FloatTensors(llama.tensors, tied))


def reference_from_checkpoint(ckpt) -> Model:
    """The PyTorch reference of a quantized checkpoint: float weights dequantized from its integers."""
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    tensors = {n: torch.from_numpy(np.asarray(t, dtype=np.float32)) for n, t in ckpt.tensors.items()}
    for name, qw in ckpt.qweights.items():
        tensors[name + ".weight"] = torch.from_numpy(qw.dequantize())
        if qw.bias is not None:
            tensors[name + ".bias"] = torch.from_numpy(qw.bias.astype(np.float32))
    return Model(cfg, tensors)


def is_checkpoint(folder: Path) -> bool:
    try:
        return "quantization_config" in read_hf_config(Path(folder))
    except ModelError:
        return False


def load_any(model: str | Path) -> tuple[Model, str]:
    """A float model or the reference of a checkpoint, with a word saying which."""
    folder = resolve_model_dir(model)
    if is_checkpoint(folder):
        return reference_from_checkpoint(read_checkpoint(folder)), "checkpoint reference"
    return in_memory(load_float_model(folder)[0]), "float model"
