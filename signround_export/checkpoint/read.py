"""Reading a checkpoint folder into exact integers (the layout is in format.py).

read_checkpoint reads the headers only: the tensors' names, dtypes and shapes and their agreement with
quantization_config are checked when the folder is opened. A layer's integers and a float tensor's values
are read from the shards each time they are indexed, and checked then (their bytes against the digests
written with them, zero points, g_idx, NaN), so a consumer taking one entry at a time holds one layer at
a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..model.folder import FLOAT_DTYPES, TensorHeader, read_json, safetensors_headers
from ..model.store import Lazy, StoredArrays
from .format import AWQ, GPTQ_V1, LAYER_TENSORS, Checkpoint, QuantConfig
from .packing import unpack_awq, unpack_bits, words_for
from .qweight import SUPPORTED_BITS, QuantWeight, check_grid

REMEDY = "write the checkpoint again"


def read_checkpoint(path, verify: bool = True) -> Checkpoint:
    """A checkpoint folder whose layers and float tensors are read when indexed; CheckpointError now if
    its config or tensor headers are broken, and on indexing if an entry's values are. verify: check each
    tensor's bytes against the digest the writer put in its file's metadata (files without digests,
    written by other tools, are read unchecked either way); False reads a damaged file as it is."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder (give the folder `signround tune` wrote, "
                              "with config.json and model.safetensors)")
    hf, quant = _read_config(folder / "config.json")
    headers = safetensors_headers(folder, CheckpointError, REMEDY)
    if not verify:
        headers = {name: replace(h, digest=None) for name, h in headers.items()}
    arrays = StoredArrays(headers, CheckpointError, REMEDY)
    layers = read_layers(headers, arrays, quant)
    floats = _float_names(headers, layers)
    log_path = folder / "tuning_log.json"
    tuning_log = read_json(log_path, "the tuning log", CheckpointError) if log_path.is_file() else None
    return Checkpoint(path=folder, hf_config=hf, quant=quant,
                      qweights=Lazy(sorted(layers), lambda m: layers[m].weight(), lambda m: (layers[m].n, layers[m].k)),
                      tensors=Lazy(floats, lambda n: _float_tensor(n, arrays), lambda n: headers[n].shape),
                      tuning_log=tuning_log, biased=frozenset(m for m in layers if m + ".bias" in headers))


def read_layers(headers: dict[str, TensorHeader], arrays: Mapping[str, np.ndarray], quant: QuantConfig
                ) -> dict[str, "_Layer"]:
    """Every quantized layer (a module with a .qweight) of these tensors, its headers checked."""
    modules = sorted(t[: -len(".qweight")] for t in headers if t.endswith(".qweight"))
    return {m: _Layer(m, headers, arrays, quant) for m in modules}


def layer_weight(name: str, headers: dict[str, TensorHeader], arrays: Mapping[str, np.ndarray],
                 quant: QuantConfig) -> QuantWeight:
    """One quantized layer of these tensors, read, unpacked and checked."""
    return _Layer(name, headers, arrays, quant).weight()


def _read_config(config_path: Path) -> tuple[dict, QuantConfig]:
    """config.json without its quantization_config, and that config parsed."""
    hf = read_json(config_path, "the checkpoint's config.json", CheckpointError)
    qc = hf.pop("quantization_config", None)
    if qc is None:
        raise CheckpointError(f"{config_path} has no quantization_config: {config_path.parent} is a float model, "
                              "not a quantized checkpoint (quantize it with `signround tune` first)")
    try:
        return hf, QuantConfig.from_json(qc)
    except CheckpointError as e:
        raise CheckpointError(f"{config_path}: {e}") from None


def _float_names(headers: dict[str, TensorHeader], layers: dict) -> list[str]:
    """Every tensor that belongs to no quantized layer; anything else this reader does not know is
    refused by name."""
    floats = []
    for tname, h in headers.items():
        module, _, suffix = tname.rpartition(".")
        if module in layers:
            if suffix not in LAYER_TENSORS:
                raise CheckpointError(f"{h.file}: tensor {tname} belongs to quantized layer {module} but is "
                                      f"none of {', '.join(LAYER_TENSORS)}; this reader does not know it")
            continue
        if suffix in ("qzeros", "scales", "g_idx", "offsets"):
            raise CheckpointError(f"{h.file}: {tname} is there but {module}.qweight is missing; the "
                                  "checkpoint is incomplete (write it again)")
        if h.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{h.file}: tensor {tname} is {dtype_name(h.dtype)} but belongs to no quantized "
                                  f"layer (no {module}.qweight); this reader does not know it")
        floats.append(tname)
    return floats


def _float_tensor(name: str, arrays: StoredArrays) -> np.ndarray:
    t = arrays[name]
    if not np.all(np.isfinite(t)):
        raise CheckpointError(f"{arrays.headers[name].file}: tensor {name} contains NaN or infinity; the checkpoint "
                              "is broken (write it again)")
    return t.astype(np.float32, copy=False)


INT32 = ("I32", "U32")
SCALE_DTYPES = ("F16", "F32")
NUMPY_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
               "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "F64": "float64",
               "I64": "int64", "U64": "uint64"}


def dtype_name(stored: str) -> str:
    """numpy's name of a safetensors dtype, for messages."""
    return NUMPY_NAMES.get(stored, stored)


class _Layer:
    """The tensors of one quantized layer L (L.qweight, L.qzeros, L.scales, ...): their headers checked
    when made, their values read, unpacked and checked by weight()."""

    def __init__(self, name: str, headers: dict[str, TensorHeader], arrays: Mapping[str, np.ndarray],
                 quant: QuantConfig):
        self.name, self.headers, self.arrays, self.quant = name, headers, arrays, quant
        self.where = str(headers[name + ".qweight"].file)
        self.bits, self.group_cfg, self.sym = quant.layer_scheme(name)
        self.grid = quant.layer_grid(name)
        if self.bits not in SUPPORTED_BITS:
            raise CheckpointError(f"{self.where}: layer {name} is {self.bits}-bit by quantization_config; this "
                                  f"project holds {', '.join(map(str, SUPPORTED_BITS))}-bit weights only")
        check_grid(self.grid, self.bits, self.sym, CheckpointError, f"{self.where}: layer {name}")
        self.n = self.need("scales", SCALE_DTYPES)[1]
        self.k = self.awq_k() if quant.packing_format == AWQ else self.gptq_k()
        self.group = self.k if self.group_cfg == -1 else self.group_cfg
        self.check_groups()

    def need(self, suffix: str, dtypes: tuple) -> tuple[int, ...]:
        """The shape of tensor L.suffix, which must be there, 2-D and of one of the dtypes."""
        tname = f"{self.name}.{suffix}"
        if tname not in self.headers:
            raise CheckpointError(f"{self.where}: layer {self.name} has a qweight but no {tname}; the checkpoint "
                                  "is incomplete (write it again)")
        h = self.headers[tname]
        if len(h.shape) != 2 or h.dtype not in dtypes:
            raise CheckpointError(f"{h.file}: {tname} is {dtype_name(h.dtype)} {list(h.shape)}, "
                                  f"expected a 2-D {' or '.join(map(dtype_name, dtypes))} tensor")
        return h.shape

    def expect(self, suffix: str, shape: tuple, why: str) -> None:
        h = self.headers[f"{self.name}.{suffix}"]
        if h.shape != shape:
            raise CheckpointError(f"{h.file}: {self.name}.{suffix} has shape {list(h.shape)}, "
                                  f"expected {list(shape)} ({why}); the checkpoint is damaged or not "
                                  f"{self.quant.packing_format}")

    def gptq_k(self) -> int:
        """K from the qweight rows; qweight and qzeros shaped for N = self.n."""
        bits, n = self.bits, self.n
        rows = self.need("qweight", INT32)[0]
        zero_rows = self.need("qzeros", INT32)[0]
        if rows * 32 % bits:
            raise CheckpointError(f"{self.where}: {self.name}.qweight has {rows} rows, which hold no whole number "
                                  f"of {bits}-bit columns; the checkpoint is damaged or its bits are wrong")
        self.expect("qweight", (rows, n), f"K*bits/32 x N for N={n} from the scales")
        self.expect("qzeros", (zero_rows, words_for(n, bits)), f"G x ceil(N*bits/32) for N={n}")
        return rows * 32 // bits

    def awq_k(self) -> int:
        n = self.n
        if self.bits != 4:
            raise CheckpointError(f"{self.where}: layer {self.name} is {self.bits}-bit, but {AWQ} holds 4-bit "
                                  "weights only")
        if n % 8:
            raise CheckpointError(f"{self.where}: {self.name} has N={n} outputs; {AWQ} packs 8 per word and needs "
                                  "N % 8 == 0")
        rows = self.need("qweight", INT32)[0]
        zero_rows = self.need("qzeros", INT32)[0]
        self.expect("qweight", (rows, n // 8), f"K x N/8 for N={n} from the scales")
        self.expect("qzeros", (zero_rows, n // 8), f"G x N/8 for N={n}")
        return rows

    def check_groups(self) -> None:
        """Scales, zero points (and offsets) of ceil(K / group) groups."""
        k, group = self.k, self.group
        g = math.ceil(k / group)
        # K comes from qweight's rows at the layer's bits: name both settings, either may be what is wrong
        why = (f"{g} groups of {group} for K={k}, by quantization_config's bits {self.bits} and group_size "
               f"{self.group_cfg} for this layer")
        for suffix in ("scales", "qzeros"):
            width = self.headers[f"{self.name}.{suffix}"].shape[1]
            self.expect(suffix, (g, width), why)
        if self.name + ".offsets" in self.headers:
            self.need("offsets", ("F16",))
            self.expect("offsets", (g, self.n), why)

    def weight(self) -> QuantWeight:
        """The layer as exact integers, float16 scales and zero points (or float offsets)."""
        scales = self.arrays[self.name + ".scales"]
        q, zero = self.codes()
        self.check_g_idx()
        qw = QuantWeight(q=np.ascontiguousarray(q), scale=self.scale(scales),
                         zero=np.ascontiguousarray(zero.T.astype(np.uint8)), bits=self.bits, group_size=self.group,
                         sym=self.sym, bias=self.bias(), offset=self.offset(), grid=self.grid)
        self.check(qw)
        return qw

    def codes(self) -> tuple[np.ndarray, np.ndarray]:
        """q [N, K] and the zero points [G, N] as stored, unpacked from the packing format."""
        qweight, qzeros = self.arrays[self.name + ".qweight"], self.arrays[self.name + ".qzeros"]
        if self.quant.packing_format == AWQ:
            return unpack_awq(qweight).T, unpack_awq(qzeros)  # q [K, N] -> [N, K]; zero [G, N]
        bits = self.bits
        q = unpack_bits(qweight, bits, self.k, axis=0).T
        zero = unpack_bits(qzeros, bits, self.n, axis=1)
        if self.quant.packing_format == GPTQ_V1:
            zero = zero.astype(np.int16) + 1
            if zero.max() > 2**bits - 1:
                raise CheckpointError(f"{self.where}: {self.name} stores a zero point of {2**bits - 1} in "
                                      f"{GPTQ_V1}, meaning {2**bits} after GPTQ's +1, which {bits} bits cannot hold")
        return q, zero

    def check_g_idx(self) -> None:
        """No act-order column permutation: g_idx, when there, is k // group."""
        tname = self.name + ".g_idx"
        if tname in self.headers and not np.array_equal(self.arrays[tname].reshape(-1),
                                                        np.arange(self.k) // self.group):
            raise CheckpointError(f"{self.headers[tname].file}: {tname} is not k // {self.group}: the layer was "
                                  "quantized with act-order (desc_act), which is not supported; quantize without it")

    def scale(self, scales: np.ndarray) -> np.ndarray:
        scale = scales.T.astype(np.float32)
        if scales.dtype != np.float16 and not np.array_equal(scale.astype(np.float16).astype(np.float32), scale,
                                                             equal_nan=True):
            raise CheckpointError(f"{self.where}: {self.name}.scales are {scales.dtype} values that float16 cannot "
                                  "hold exactly")
        return np.ascontiguousarray(scale)

    def bias(self) -> np.ndarray | None:
        if self.name + ".bias" not in self.headers:
            return None
        return self.arrays[self.name + ".bias"].astype(np.float32).reshape(-1)

    def offset(self) -> np.ndarray | None:
        if self.name + ".offsets" not in self.headers:
            return None
        return np.ascontiguousarray(self.arrays[self.name + ".offsets"].T.astype(np.float32))

    def check(self, qw: QuantWeight) -> None:
        """The unpacked layer is consistent with itself and with quantization_config."""
        try:
            qw.check(self.name)
        except ValueError as e:
            raise CheckpointError(f"{self.where}: {e}; the checkpoint is broken (write it again)") from None
        if self.sym and not np.all(qw.zero == 2 ** (self.bits - 1)):
            raise CheckpointError(f"{self.where}: {self.name} is symmetric by quantization_config's sym but its "
                                  f"zero points are not {2 ** (self.bits - 1)}; the config and the tensors disagree")
        n = qw.shape[0]
        if qw.bias is not None and (qw.bias.shape != (n,) or not np.all(np.isfinite(qw.bias))):
            raise CheckpointError(f"{self.where}: {self.name}.bias must be {n} finite values")
