"""Writing a checkpoint folder (the layout is in format.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from ..atomic import atomic_dir
from ..errors import CheckpointError
from ..model.folder import copy_tokenizer_files
from .format import GPTQ, GPTQ_V1, WRITE_FORMATS, QuantConfig
from .packing import pack_bits
from .qweight import QuantWeight


def write_checkpoint(out_dir, hf_config: dict, quant: QuantConfig, qweights: dict[str, QuantWeight],
                     tensors: dict[str, np.ndarray], tokenizer_src_dir=None, tuning_log: dict | None = None) -> Path:
    """Write a checkpoint folder atomically: it appears under `out_dir` only once it is whole.

    Layers whose scheme differs from quant's default get an exact-name entry in extra_config, as do
    quantized layers outside the blocks (lm_head) and float linears inside them, so auto-round's
    loader finds the same layers we do.
    """
    quant = _settled_config(quant, qweights, tensors)
    arrays: dict[str, np.ndarray] = {}
    for name in sorted(qweights):
        arrays.update(_pack_layer(name, qweights[name], quant.packing_format))
    for name, t in tensors.items():
        if name in arrays or name.rsplit(".", 1)[0] in qweights:
            raise CheckpointError(f"tensor {name} belongs to quantized layer {name.rsplit('.', 1)[0]}; "
                             "pass it either quantized or as a float tensor, not both")
        arrays[name] = np.asarray(t, dtype=np.float32)
    # safetensors writes an array's memory as it lies: a transposed view would be stored scrambled
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}

    config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    config["quantization_config"] = quant.to_json()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(arrays, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tuning_log is not None:
            (tmp / "tuning_log.json").write_text(json.dumps(tuning_log, indent=2) + "\n")
        if tokenizer_src_dir is not None:
            copy_tokenizer_files(tokenizer_src_dir, tmp)
    return out_dir


def _settled_config(quant: QuantConfig, qweights: dict[str, QuantWeight], tensors: dict) -> QuantConfig:
    """quant with the packing format checked and extra_config completed for the layers at hand."""
    if quant.packing_format not in WRITE_FORMATS:
        raise CheckpointError(f"cannot write packing_format {quant.packing_format!r}; we write {' or '.join(WRITE_FORMATS)}")
    extra = {k: dict(v) for k, v in quant.extra_config.items()}
    settled = replace(quant, extra_config=extra)  # sees the entries added below
    blocks = [b.strip() for b in quant.block_name_to_quantize.split(",") if b.strip()]

    def in_blocks(name: str) -> bool:
        return any(name.startswith(b + ".") for b in blocks)

    for name, qw in sorted(qweights.items()):
        qw.check(name)
        if qw.sym and not np.all(qw.zero == 2 ** (qw.bits - 1)):
            raise CheckpointError(f"{name} is marked symmetric but its zero points are not {2 ** (qw.bits - 1)}")
        bits, group, sym = settled.layer_scheme(name)
        k = qw.shape[1]
        if not in_blocks(name):
            # outside the blocks auto-round's loader quantizes only what extra_config names, in full
            extra[name] = {"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym, "data_type": "int"}
        elif (bits, k if group == -1 else group, sym) != (qw.bits, qw.group_size, qw.sym):
            # an exact name shadows every regex, so the entry lists all keys that differ from the default
            extra[name] = {key: value for key, value, default in (
                ("bits", qw.bits, quant.bits),
                ("group_size", qw.group_size, k if quant.group_size == -1 else quant.group_size),
                ("sym", qw.sym, quant.sym)) if value != default}
        if quant.packing_format == GPTQ_V1 and not qw.sym:
            raise CheckpointError(f"{name} is asymmetric: packing_format {GPTQ_V1!r} stores zero points minus 1 and "
                             f"cannot hold a zero point of 0; use {GPTQ!r} for asymmetric weights")

    for tname, t in tensors.items():  # linears left in float inside the blocks: say so, as auto-round does
        module = tname[: -len(".weight")]
        if tname.endswith(".weight") and np.ndim(t) == 2 and in_blocks(module) and module not in qweights:
            if settled.layer_scheme(module)[0] < 16:
                extra[module] = {"bits": 16, "data_type": "fp"}
    return settled


def _pack_layer(name: str, qw: QuantWeight, packing_format: str) -> dict[str, np.ndarray]:
    n, k = qw.shape
    if k * qw.bits % 32:
        raise CheckpointError(f"{name}: K={k} columns of {qw.bits} bits do not fill whole int32 words, which the "
                         "format needs to know K; leave this layer in float")
    scales = qw.scale.T.astype(np.float16)
    if not np.array_equal(scales.astype(np.float32), qw.scale.T):
        raise CheckpointError(f"{name}: scales are not float16 values; round them to float16 before writing "
                         "(the checkpoint stores float16, and the integers were chosen for those scales)")
    zero = qw.zero.astype(np.int16) - (1 if packing_format == GPTQ_V1 else 0)
    out = {
        f"{name}.qweight": pack_bits(qw.q.T, qw.bits, axis=0),  # [K, N] -> [K*bits/32, N]
        f"{name}.qzeros": pack_bits(zero.T.astype(np.uint8), qw.bits, axis=1),  # [G, N] -> [G, N*bits/32]
        f"{name}.scales": np.ascontiguousarray(scales),
    }
    if qw.offset is not None:
        offsets = qw.offset.T.astype(np.float16)
        if not np.array_equal(offsets.astype(np.float32), qw.offset.T):
            raise CheckpointError(f"{name}: offsets are not float16 values; round them to float16 before writing")
        out[f"{name}.offsets"] = np.ascontiguousarray(offsets)
    if qw.bias is not None:
        out[f"{name}.bias"] = np.asarray(qw.bias, dtype=np.float32)
    return out
