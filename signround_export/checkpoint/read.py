"""Reading a checkpoint folder into exact integers (the layout is in format.py)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..model.folder import read_json, read_safetensors
from .format import AWQ, GPTQ_V1, LAYER_TENSORS, Checkpoint, QuantConfig
from .packing import unpack_awq, unpack_bits, words_for
from .qweight import SUPPORTED_BITS, QuantWeight


def read_checkpoint(path) -> Checkpoint:
    """Read a checkpoint folder into exact integers and float32 tensors; CheckpointError if it is broken."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder (give the folder `signround tune` wrote, "
                              "with config.json and model.safetensors)")
    config_path = folder / "config.json"
    hf = read_json(config_path, "the checkpoint's config.json", CheckpointError)
    qc = hf.pop("quantization_config", None)
    if qc is None:
        raise CheckpointError(f"{config_path} has no quantization_config: {folder} is a float model, not a "
                              "quantized checkpoint (quantize it with `signround tune` first)")
    try:
        quant = QuantConfig.from_json(qc)
    except CheckpointError as e:
        raise CheckpointError(f"{config_path}: {e}") from None

    tensors, source = read_safetensors(folder, CheckpointError, "write the checkpoint again")
    modules = sorted(t[: -len(".qweight")] for t in tensors if t.endswith(".qweight"))
    qweights = {m: _unpack_layer(m, tensors, source, quant) for m in modules}

    floats = {}
    for tname, t in tensors.items():
        module, _, suffix = tname.rpartition(".")
        if module in qweights:
            if suffix not in LAYER_TENSORS:
                raise CheckpointError(f"{source[tname]}: tensor {tname} belongs to quantized layer {module} but is "
                                      f"none of {', '.join(LAYER_TENSORS)}; this reader does not know it")
            continue
        if suffix in ("qzeros", "scales", "g_idx", "offsets"):
            raise CheckpointError(f"{source[tname]}: {tname} is there but {module}.qweight is missing; the "
                                  "checkpoint is incomplete (write it again)")
        if not np.issubdtype(t.dtype, np.floating):
            raise CheckpointError(f"{source[tname]}: tensor {tname} is {t.dtype} but belongs to no quantized layer "
                                  f"(no {module}.qweight); this reader does not know it")
        if not np.all(np.isfinite(t)):
            raise CheckpointError(f"{source[tname]}: tensor {tname} contains NaN or infinity; the checkpoint is "
                                  "broken (write it again)")
        floats[tname] = t.astype(np.float32, copy=False)

    log_path = folder / "tuning_log.json"
    tuning_log = read_json(log_path, "the tuning log", CheckpointError) if log_path.is_file() else None
    return Checkpoint(path=folder, hf_config=hf, quant=quant, qweights=qweights, tensors=floats,
                      tuning_log=tuning_log)


def _unpack_layer(name: str, tensors: dict, source: dict, quant: QuantConfig) -> QuantWeight:
    where = source[name + ".qweight"]
    bits, group_cfg, sym = quant.layer_scheme(name)
    if bits not in SUPPORTED_BITS:
        raise CheckpointError(f"{where}: layer {name} is {bits}-bit by quantization_config; this project holds "
                              f"{', '.join(map(str, SUPPORTED_BITS))}-bit weights only")

    def need(suffix: str, dtypes: tuple) -> np.ndarray:
        tname = f"{name}.{suffix}"
        if tname not in tensors:
            raise CheckpointError(f"{where}: layer {name} has a qweight but no {tname}; the checkpoint is "
                                  "incomplete (write it again)")
        t = tensors[tname]
        if t.ndim != 2 or t.dtype not in dtypes:
            raise CheckpointError(f"{source[tname]}: {tname} is {t.dtype} {list(t.shape)}, "
                                  f"expected a 2-D {' or '.join(map(str, dtypes))} tensor")
        return t

    int32 = (np.dtype(np.int32), np.dtype(np.uint32))
    qweight, qzeros = need("qweight", int32), need("qzeros", int32)
    scales = need("scales", (np.dtype(np.float16), np.dtype(np.float32)))
    n = scales.shape[1]

    def expect(tname: str, shape: tuple, why: str) -> None:
        if tensors[tname].shape != shape:
            raise CheckpointError(f"{source[tname]}: {tname} has shape {list(tensors[tname].shape)}, expected "
                                  f"{list(shape)} ({why}); the checkpoint is damaged or not {quant.packing_format}")

    if quant.packing_format == AWQ:
        if bits != 4:
            raise CheckpointError(f"{where}: layer {name} is {bits}-bit, but {AWQ} holds 4-bit weights only")
        if n % 8:
            raise CheckpointError(f"{where}: {name} has N={n} outputs; {AWQ} packs 8 per word and needs N % 8 == 0")
        k = qweight.shape[0]
        expect(name + ".qweight", (k, n // 8), f"K x N/8 for N={n} from the scales")
        expect(name + ".qzeros", (qzeros.shape[0], n // 8), f"G x N/8 for N={n}")
        q = unpack_awq(qweight).T  # [K, N] -> [N, K]
        zero = unpack_awq(qzeros)  # [G, N]
    else:
        if qweight.shape[0] * 32 % bits:
            raise CheckpointError(f"{where}: {name}.qweight has {qweight.shape[0]} rows, which hold no whole number "
                                  f"of {bits}-bit columns; the checkpoint is damaged or its bits are wrong")
        k = qweight.shape[0] * 32 // bits
        expect(name + ".qweight", (qweight.shape[0], n), f"K*bits/32 x N for N={n} from the scales")
        expect(name + ".qzeros", (qzeros.shape[0], words_for(n, bits)), f"G x ceil(N*bits/32) for N={n}")
        q = unpack_bits(qweight, bits, k, axis=0).T
        zero = unpack_bits(qzeros, bits, n, axis=1)
        if quant.packing_format == GPTQ_V1:
            zero = zero.astype(np.int16) + 1
            if zero.max() > 2**bits - 1:
                raise CheckpointError(f"{where}: {name} stores a zero point of {2**bits - 1} in {GPTQ_V1}, meaning "
                                      f"{2**bits} after GPTQ's +1, which {bits} bits cannot hold")

    group = k if group_cfg == -1 else group_cfg
    g = math.ceil(k / group)
    expect(name + ".scales", (g, n), f"{g} groups of {group} for K={k}")
    expect(name + ".qzeros", (g, qzeros.shape[1]), f"{g} groups of {group} for K={k}")
    if name + ".g_idx" in tensors:
        g_idx = tensors[name + ".g_idx"].reshape(-1)
        if not np.array_equal(g_idx, np.arange(k) // group):
            raise CheckpointError(f"{source[name + '.g_idx']}: {name}.g_idx is not k // {group}: the layer was "
                                  "quantized with act-order (desc_act), which is not supported; quantize without it")
    scale = scales.T.astype(np.float32)
    if scales.dtype != np.float16 and not np.array_equal(scale.astype(np.float16).astype(np.float32), scale,
                                                         equal_nan=True):
        raise CheckpointError(f"{where}: {name}.scales are {scales.dtype} values that float16 cannot hold exactly")
    bias = tensors.get(name + ".bias")
    offset = None
    if name + ".offsets" in tensors:
        offsets = need("offsets", (np.dtype(np.float16),))
        expect(name + ".offsets", (g, n), f"{g} groups of {group} for K={k}")
        offset = np.ascontiguousarray(offsets.T.astype(np.float32))
    qw = QuantWeight(q=np.ascontiguousarray(q), scale=np.ascontiguousarray(scale),
                     zero=np.ascontiguousarray(zero.T.astype(np.uint8)), bits=bits, group_size=group, sym=sym,
                     bias=None if bias is None else bias.astype(np.float32).reshape(-1), offset=offset)
    try:
        qw.check(name)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}; the checkpoint is broken (write it again)") from None
    if sym and not np.all(qw.zero == 2 ** (bits - 1)):
        raise CheckpointError(f"{where}: {name} is symmetric by quantization_config but its zero points are not "
                              f"{2 ** (bits - 1)}; the config and the tensors disagree")
    if qw.bias is not None and (qw.bias.shape != (n,) or not np.all(np.isfinite(qw.bias))):
        raise CheckpointError(f"{where}: {name}.bias must be {n} finite values")
    return qw
