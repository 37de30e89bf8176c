"""Writing a checkpoint folder (the layout is in format.py), a layer at a time, in shards (shards.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..atomic import atomic_dir, atomic_file
from ..errors import CheckpointError
from ..model.folder import INDEX, copy_tokenizer_files, file_headers
from .format import GPTQ, GPTQ_LEVELS, GPTQ_V1, WRITE_FORMATS, QuantConfig, grid_record
from .packing import pack_bits, words_for
from .qweight import UNIFORM, QuantWeight, n_groups
from .shards import DEFAULT_SHARD_SIZE, TensorSpec, Unit, index_json, plan_shards, shard_names, write_shard


@dataclass(frozen=True)
class PackedLayer:
    """A quantized layer's scheme and shape: all that its packed tensors' headers and its entry in
    extra_config depend on, known before its integers are read."""

    bits: int
    group_size: int  # resolved
    sym: bool
    n: int
    k: int
    offsets: bool = False
    bias: bool = False
    grid: str = UNIFORM  # data_type: what the codes mean (qweight.GRIDS)

    @classmethod
    def of(cls, qw: QuantWeight) -> "PackedLayer":
        n, k = qw.shape
        return cls(qw.bits, qw.group_size, qw.sym, n, k, qw.offset is not None, qw.bias is not None, qw.grid)

    def specs(self, name: str) -> dict[str, TensorSpec]:
        """The dtype and shape of each tensor pack_layer writes for this layer."""
        g = n_groups(self.k, self.group_size)
        specs = {f"{name}.qweight": TensorSpec("I32", (self.k * self.bits // 32, self.n)),
                 f"{name}.qzeros": TensorSpec("I32", (g, words_for(self.n, self.bits))),
                 f"{name}.scales": TensorSpec("F16", (g, self.n))}
        if self.offsets:
            specs[f"{name}.offsets"] = TensorSpec("F16", (g, self.n))
        if self.bias:
            specs[f"{name}.bias"] = TensorSpec("F32", (self.n,))
        return specs


def write_checkpoint(out_dir, hf_config: dict, quant: QuantConfig, qweights: Mapping[str, QuantWeight],
                     tensors: Mapping[str, np.ndarray], tokenizer_src_dir=None, tuning_log: dict | None = None,
                     shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Write a checkpoint folder atomically: it appears under `out_dir` only once it is whole.

    Layers whose scheme differs from quant's default get an exact-name entry in extra_config, as do
    quantized layers outside the blocks (lm_head) and float linears inside them, so auto-round's
    loader finds the same layers we do. qweights and tensors are taken an entry at a time (a lazy
    Mapping is read twice: once for the shapes, once to write); shards of at most shard_size.
    """
    layers = {name: PackedLayer.of(qweights[name]) for name in qweights}
    floats = {name: float_spec(tensors, name) for name in tensors}
    quant = settled_config(quant, layers, floats)
    units = [Unit(name, layers[name].specs(name), lambda n=name: pack_layer(n, qweights[n], quant.packing_format))
             for name in layers]
    units += [float_unit(name, floats[name], tensors) for name in floats]
    with atomic_dir(out_dir) as tmp:
        write_shards(tmp, units, shard_size)
        write_files(tmp, hf_config, quant, tokenizer_src_dir, tuning_log)
    return Path(out_dir)


def write_staged_checkpoint(out_dir, hf_config: dict, quant: QuantConfig, units: list[Unit], staging: Path,
                            on_written: Callable[[list[Unit]], None] | None = None, tokenizer_src_dir=None,
                            tuning_log: dict | None = None, shard_size: int | str = DEFAULT_SHARD_SIZE,
                            extra_files: list[Path] = ()) -> Path:
    """Write the units' shards into `staging` (a folder that outlives a failure: the shards finished there
    are kept by a rerun), then make `out_dir` atomically from them (hard links: no second copy on disk).
    quant is settled (settled_config). extra_files: more files to keep in the folder under their names
    (the generated calibration ids)."""
    names = write_shards(staging, units, shard_size, on_written)
    with atomic_dir(out_dir) as tmp:
        for name in names:
            link_into(Path(staging) / name, tmp / name)
        for path in extra_files:
            link_into(Path(path), tmp / Path(path).name)
        write_files(tmp, hf_config, quant, tokenizer_src_dir, tuning_log)
    return Path(out_dir)


def float_spec(tensors: Mapping, name: str) -> TensorSpec:
    """A float tensor as the checkpoint stores it (float32), its shape from the headers when tensors can say."""
    shape = tensors.shape(name) if hasattr(tensors, "shape") else np.shape(tensors[name])
    return TensorSpec("F32", tuple(shape))


def float_unit(name: str, spec: TensorSpec, tensors: Mapping) -> Unit:
    return Unit(name, {name: spec}, lambda: {name: np.asarray(tensors[name], dtype=np.float32)})


def _natural(name: str) -> list:
    """model.layers.2 before model.layers.10: the order transformers' state dicts have."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def write_shards(folder: Path, units: list[Unit], shard_size: int | str,
                 on_written: Callable[[list[Unit]], None] | None = None) -> list[str]:
    """The units' shards (and index when more than one) in folder; a shard already there (a resumed run's)
    is kept when it holds what the plan puts in it. on_written(units) after each shard. The file names."""
    plan = plan_shards(sorted(units, key=lambda u: _natural(u.name)), shard_size)
    names = shard_names(len(plan))
    for fname, shard in zip(names, plan):
        path = Path(folder) / fname
        if path.is_file():
            expected = {t: s for u in shard for t, s in u.specs.items()}
            found = {t: TensorSpec(h.dtype, h.shape) for t, h in file_headers(path, CheckpointError).items()}
            if found != expected:
                raise CheckpointError(f"{path} holds other tensors than this run puts in it; delete {folder} "
                                      "to start over")
        else:
            with atomic_file(path) as tmp:
                write_shard(tmp, shard)
        if on_written is not None:
            on_written(shard)
    if len(plan) == 1:
        return names
    with atomic_file(Path(folder) / INDEX) as tmp:
        tmp.write_text(index_json(plan))
    return [*names, INDEX]


def write_files(folder: Path, hf_config: dict, quant: QuantConfig, tokenizer_src_dir=None,
                tuning_log: dict | None = None) -> None:
    """Everything of a checkpoint folder but its weights: config.json, the tuning log, the tokenizer."""
    config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    config["quantization_config"] = quant.to_json()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if tuning_log is not None:
        (folder / "tuning_log.json").write_text(json.dumps(tuning_log, indent=2) + "\n")
    if tokenizer_src_dir is not None:
        copy_tokenizer_files(tokenizer_src_dir, folder)


def link_into(src: Path, dst: Path) -> None:
    """dst as a second name of src (no copy on disk), or a copy where the filesystem has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def settled_config(quant: QuantConfig, layers: dict[str, PackedLayer], floats: dict[str, TensorSpec]) -> QuantConfig:
    """quant with the packing format checked and extra_config completed for the layers at hand."""
    if quant.packing_format not in WRITE_FORMATS:
        raise CheckpointError(f"cannot write packing_format {quant.packing_format!r}; we write "
                              f"{' or '.join(WRITE_FORMATS)}")
    for name in floats:
        if name.rsplit(".", 1)[0] in layers:
            raise CheckpointError(f"tensor {name} belongs to quantized layer {name.rsplit('.', 1)[0]}; "
                                  "pass it either quantized or as a float tensor, not both")
    extra = {k: dict(v) for k, v in quant.extra_config.items()}
    settled = replace(quant, extra_config=extra)  # sees the entries added below
    blocks = [b.strip() for b in quant.block_name_to_quantize.split(",") if b.strip()]

    def in_blocks(name: str) -> bool:
        return any(name.startswith(b + ".") for b in blocks)

    for name, layer in sorted(layers.items()):
        bits, group, sym = settled.layer_scheme(name)
        k = layer.k
        if not in_blocks(name):
            # outside the blocks auto-round's loader quantizes only what extra_config names, in full
            extra[name] = {"bits": layer.bits, "group_size": layer.group_size, "sym": layer.sym,
                           "data_type": layer.grid, **grid_record(layer.grid)}
        elif ((bits, k if group == -1 else group, sym, settled.layer_grid(name))
              != (layer.bits, layer.group_size, layer.sym, layer.grid)):
            # an exact name shadows every regex, so the entry lists all keys that differ from the default
            extra[name] = {key: value for key, value, default in (
                ("bits", layer.bits, quant.bits),
                ("group_size", layer.group_size, k if quant.group_size == -1 else quant.group_size),
                ("sym", layer.sym, quant.sym), ("data_type", layer.grid, quant.grid)) if value != default}
            if layer.grid != quant.grid:
                extra[name] |= grid_record(layer.grid)
        if layer.grid != UNIFORM and quant.packing_format != GPTQ_LEVELS:
            raise CheckpointError(f"{name} is on the non-uniform grid {layer.grid!r}: write it under packing_format "
                                  f"{GPTQ_LEVELS!r}, which loaders that do not know grids refuse instead of reading "
                                  "its codes as integers")
        if quant.packing_format == GPTQ_V1 and not layer.sym:
            raise CheckpointError(f"{name} is asymmetric: packing_format {GPTQ_V1!r} stores zero points minus 1 and "
                                  f"cannot hold a zero point of 0; use {GPTQ!r} for asymmetric weights")

    for tname, spec in floats.items():  # linears left in float inside the blocks: say so, as auto-round does
        module = tname[: -len(".weight")]
        if tname.endswith(".weight") and len(spec.shape) == 2 and in_blocks(module) and module not in layers:
            if settled.layer_scheme(module)[0] < 16:
                extra[module] = {"bits": 16, "data_type": "fp"}
    return settled


def pack_layer(name: str, qw: QuantWeight, packing_format: str) -> dict[str, np.ndarray]:
    """The layer's tensors as the checkpoint stores them, after checking its values."""
    qw.check(name)
    if qw.sym and not np.all(qw.zero == 2 ** (qw.bits - 1)):
        raise CheckpointError(f"{name} is marked symmetric but its zero points are not {2 ** (qw.bits - 1)}")
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
