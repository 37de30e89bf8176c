"""The weights of an exported file read back and compared with the checkpoint's integers, layer by layer.

A layer's error is the largest |W - W_ckpt| over its weights, in steps of its group's scale: 0 when
the file holds the integers exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..checkpoint.format import Checkpoint
from ..errors import GGUFExportError, ValidationError
from ..export.gguf import holds_exactly, read_gguf_weights
from ..export.onnx.matmulnbits import NBitsWeight, dequantize_nbits
from ..export.onnx.stacking import stacked_modules
from ..model.config import ModelConfig


@dataclass
class LayerErrors:
    errors: dict[str, float] = field(default_factory=dict)  # layer -> error in steps
    exact: list[str] = field(default_factory=list)  # layers whose format holds the integers exactly
    notes: list[str] = field(default_factory=list)


def read_gguf(path, ckpt: Checkpoint) -> tuple[Mapping[str, np.ndarray], dict[str, str]]:
    """The GGUF file's weights under HF names (each dequantized by gguf-py when indexed) and its tensor types."""
    try:
        return read_gguf_weights(path, ModelConfig.from_hf(ckpt.hf_config))
    except GGUFExportError as e:
        raise ValidationError(f"gguf: {e}", param="gguf") from None


def gguf_layer_errors(path, ckpt: Checkpoint, weights: Mapping[str, np.ndarray], types: dict[str, str]) -> LayerErrors:
    """A GGUF file's layers (weights and types as read_gguf reads them) against its checkpoint, one layer
    at a time."""
    out, missing = LayerErrors(), []
    for name, qw in ckpt.qweights.items():
        w = weights.get(name + ".weight")
        if w is None:
            if name == "lm_head" and ckpt.hf_config.get("tie_word_embeddings"):
                continue
            missing.append(name)
            continue
        if w.shape != qw.shape:
            raise ValidationError(f"gguf {path}: {name} has shape {list(w.shape)}, the checkpoint's is "
                                  f"{list(qw.shape)}; the file belongs to another model", param="gguf")
        out.errors[name] = qw.step_error(w)
        if holds_exactly(types[name + ".weight"], qw):
            out.exact.append(name)
    if missing:
        out.notes.append(f"{len(missing)} quantized layers are not in the file, e.g. {missing[0]}")
    inexact = [n for n in out.errors if n not in out.exact]
    if inexact:
        worst = max(inexact, key=out.errors.get)
        out.notes.append(f"{len(inexact)} layers in types that cannot hold the integers exactly; worst {worst}: "
                         f"{out.errors[worst]:.3g} steps ({types[worst + '.weight']})")
    return out


def matmulnbits_weights(path: Path) -> Iterator[tuple[str, NBitsWeight]]:
    """Every MatMulNBits weight of the graph in the model.onnx at path, by its stacked name ("a+b+c":
    linears stacked row after row), one at a time: initializers in an external data file are read when
    their node is reached."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name], str(path.parent))

    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        zp = array(node.input[3]) if len(node.input) > 3 and node.input[3] else None
        yield node.input[1].removesuffix(".B"), NBitsWeight(array(node.input[1]), array(node.input[2]), zp,
                                                           attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"])


def onnx_layer_errors(folder, ckpt: Checkpoint) -> LayerErrors:
    """An exported ONNX folder's MatMulNBits weights against its checkpoint, one stacked weight and its
    layers at a time. Layers with float minima take float zero points (offset / scale): exact to float32
    rounding only, so not counted exact."""
    out, offsets = LayerErrors(), []
    for stacked, w in matmulnbits_weights(Path(folder) / "model.onnx"):
        qws = {m: ckpt.qweights.get(m) for m in stacked_modules(stacked)}
        if any(qw is None for qw in qws.values()):
            out.notes.append(f"{stacked}: MatMulNBits with no integers in the checkpoint (rounded at export)")
            continue
        want = (sum(qw.shape[0] for qw in qws.values()), next(iter(qws.values())).shape[1])
        if (w.n, w.k) != want:
            raise ValidationError(f"onnx {folder}: {stacked} is {w.n}x{w.k}, the checkpoint's is "
                                  f"{want[0]}x{want[1]}; the folder belongs to another model", param="onnx")
        rows, start = dequantize_nbits(w), 0
        for module, qw in qws.items():
            out.errors[module] = qw.step_error(rows[start : start + qw.shape[0]])
            start += qw.shape[0]
            if qw.offset is not None:
                offsets.append(module)
        del qws, rows
    missing = [m for m in ckpt.qweights if m not in out.errors]
    if missing:
        out.notes.append(f"{len(missing)} quantized layers are not MatMulNBits in the graph, e.g. {missing[0]}")
    if offsets:
        worst = max(offsets, key=out.errors.get)
        out.notes.append(f"{len(offsets)} layers with float minima take float zero points (offset / scale), exact "
                         f"to float32 rounding; worst {worst}: {out.errors[worst]:.3g} steps")
    out.exact = [m for m in out.errors if m not in offsets]
    return out
