"""Load a float HF model folder, or a quantized checkpoint as the reference model, into `Model`."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..checkpoint.format import Checkpoint
from ..checkpoint.read import read_checkpoint
from ..errors import CheckpointError, ModelError
from .config import ModelConfig
from .folder import read_hf_config, resolve_model_dir
from .forward import Model
from .shapes import check_float_dtypes, check_tensors
from .store import Lazy, TensorStore


def load_float_model(model: str | Path) -> tuple[Model, dict, Path]:
    """(model, HF config dict, folder) with float32 weights, each read from disk when it is indexed
    (a TensorStore: the headers are read and checked now, a tensor's data only when it is used)."""
    folder = resolve_model_dir(model)
    hf = read_hf_config(folder)
    if "quantization_config" in hf:
        method = hf["quantization_config"].get("quant_method") if isinstance(hf["quantization_config"], dict) else None
        raise ModelError(f"{folder} is already quantized ({method}); give the float model")
    cfg = ModelConfig.from_hf(hf, str(folder / "config.json"))
    store = TensorStore(folder, ModelError, "rebuild or re-download it")
    check_tensors(cfg, {name: h.shape for name, h in store.headers.items()}, str(folder), ModelError)
    check_float_dtypes(cfg, store.headers, ModelError)
    return Model(cfg, store), hf, folder


def open_checkpoint(path: str | Path, verify: bool = True) -> Checkpoint:
    """A checkpoint folder read (read_checkpoint: its format's headers checked; verify: its tensors against
    their digests when read) and checked as a model (check_checkpoint): the door every command reads a
    checkpoint through."""
    ckpt = read_checkpoint(path, verify)
    check_checkpoint(ckpt)
    return ckpt


def check_checkpoint(ckpt: Checkpoint) -> ModelConfig:
    """The checkpoint's model config, every field checked, and its tensors' names and shapes checked against
    it, known without reading any data (a quantized layer's bias is taken to be [N] here; reading the layer
    checks it)."""
    cfg = ModelConfig.from_hf(ckpt.hf_config, str(Path(ckpt.path) / "config.json"))
    shapes = {name: shape_of(ckpt.tensors, name) for name in ckpt.tensors}
    for module in ckpt.qweights:
        shapes[module + ".weight"] = shape_of(ckpt.qweights, module)
    shapes |= {module + ".bias": shapes[module + ".weight"][:1] for module in ckpt.layers_with_bias()}
    check_tensors(cfg, shapes, str(ckpt.path), CheckpointError)
    return cfg


def shape_of(entries: Mapping, name: str) -> tuple[int, ...]:
    """An entry's shape (a layer's [N, K]), without reading it where the mapping tells shapes (a Lazy)."""
    shape = getattr(entries, "shape", None)
    return tuple(shape(name) if shape is not None else entries[name].shape)


def in_memory(model: Model) -> Model:
    """The model with every tensor read once and held: for whole-model forwards run many times
    (perplexity, validation), which would otherwise read every weight from disk on every call."""
    return Model(model.cfg, dict(model.tensors))


def float_checkpoint(model: str | Path):
    """A float model as a Checkpoint with no quantized layers: every weight goes to the exporters as a
    float tensor (float16 GGUF, float32 ONNX), read from the model's files when the exporter takes it."""
    llama, hf, folder = load_float_model(model)
    store = llama.tensors
    names = [n for n in store if not (llama.cfg.tie_word_embeddings and n == "lm_head.weight")]
    return Checkpoint(path=folder, hf_config=hf, quant=None, qweights={},
                      tensors=Lazy(names, lambda name: store[name].numpy()))


def as_float32(array) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def reference_from_checkpoint(ckpt) -> Model:
    """The PyTorch reference of a quantized checkpoint: float weights dequantized from its integers when
    the forward reaches them (a layer's weight is dequantized each time it is indexed, and not kept)."""
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    qweights, tensors = ckpt.qweights, ckpt.tensors
    biased = {m + ".bias": m for m in ckpt.layers_with_bias()}

    def read(name: str) -> torch.Tensor:
        if name in biased:
            return as_float32(qweights[biased[name]].bias)
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in qweights:
            return torch.from_numpy(qweights[module].dequantize())
        return as_float32(tensors[name])

    names = list(tensors) + [m + ".weight" for m in qweights] + list(biased)
    return Model(cfg, Lazy(names, read))


def is_checkpoint(folder: Path) -> bool:
    try:
        return "quantization_config" in read_hf_config(Path(folder))
    except ModelError:
        return False


def load_any(model: str | Path, verify: bool = True) -> tuple[Model, str]:
    """A float model or the reference of a checkpoint, with a word saying which; either reads each weight
    when the forward reaches it (Model.stream_logits runs the whole model block by block). verify: a
    checkpoint's tensors against their digests (read_checkpoint)."""
    folder = resolve_model_dir(model)
    if is_checkpoint(folder):
        return reference_from_checkpoint(open_checkpoint(folder, verify)), "checkpoint reference"
    return load_float_model(folder)[0], "float model"
