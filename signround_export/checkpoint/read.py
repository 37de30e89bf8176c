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
    hf, quant = _read_config(folder / "config.json")
    tensors, source = read_safetensors(folder, CheckpointError, "write the checkpoint again")
    modules = sorted(t[: -len(".qweight")] for t in tensors if t.endswith(".qweight"))
    qweights = {m: _Layer(m, tensors, source, quant).weight() for m in modules}
    log_path = folder / "tuning_log.json"
    tuning_log = read_json(log_path, "the tuning log", CheckpointError) if log_path.is_file() else None
    return Checkpoint(path=folder, hf_config=hf, quant=quant, qweights=qweights,
                      tensors=_float_tensors(tensors, source, qweights), tuning_log=tuning_log)


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


def _float_tensors(tensors: dict, source: dict, qweights: dict) -> dict[str, np.ndarray]:
    """Every tensor that belongs to no quantized layer, as float32; anything else this reader does not
    know is refused by name."""
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
    return floats


INT32 = (np.dtype(np.int32), np.dtype(np.uint32))
SCALE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


class _Layer:
    """The tensors of one quantized layer L (L.qweight, L.qzeros, L.scales, ...), checked and unpacked."""

    def __init__(self, name: str, tensors: dict, source: dict, quant: QuantConfig):
        self.name, self.tensors, self.source, self.quant = name, tensors, source, quant
        self.where = source[name + ".qweight"]
        self.bits, self.group_cfg, self.sym = quant.layer_scheme(name)
        if self.bits not in SUPPORTED_BITS:
            raise CheckpointError(f"{self.where}: layer {name} is {self.bits}-bit by quantization_config; this "
                                  f"project holds {', '.join(map(str, SUPPORTED_BITS))}-bit weights only")

    def need(self, suffix: str, dtypes: tuple) -> np.ndarray:
        """Tensor L.suffix, which must be there, 2-D and of one of the dtypes."""
        tname = f"{self.name}.{suffix}"
        if tname not in self.tensors:
            raise CheckpointError(f"{self.where}: layer {self.name} has a qweight but no {tname}; the checkpoint "
                                  "is incomplete (write it again)")
        t = self.tensors[tname]
        if t.ndim != 2 or t.dtype not in dtypes:
            raise CheckpointError(f"{self.source[tname]}: {tname} is {t.dtype} {list(t.shape)}, "
                                  f"expected a 2-D {' or '.join(map(str, dtypes))} tensor")
        return t

    def expect(self, suffix: str, shape: tuple, why: str) -> None:
        tname = f"{self.name}.{suffix}"
        if self.tensors[tname].shape != shape:
            raise CheckpointError(f"{self.source[tname]}: {tname} has shape {list(self.tensors[tname].shape)}, "
                                  f"expected {list(shape)} ({why}); the checkpoint is damaged or not "
                                  f"{self.quant.packing_format}")

    def weight(self) -> QuantWeight:
        """The layer as exact integers, float16 scales and zero points (or float offsets)."""
        scales = self.need("scales", SCALE_DTYPES)
        q, zero = self.codes(scales.shape[1])
        n, k = q.shape
        group = k if self.group_cfg == -1 else self.group_cfg
        self.check_groups(k, group)
        qw = QuantWeight(q=np.ascontiguousarray(q), scale=self.scale(scales),
                         zero=np.ascontiguousarray(zero.T.astype(np.uint8)), bits=self.bits, group_size=group,
                         sym=self.sym, bias=self.bias(), offset=self.offset(math.ceil(k / group), n, group, k))
        self.check(qw)
        return qw

    def codes(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """q [N, K] and the zero points [G, N] as stored, unpacked from the packing format."""
        if self.quant.packing_format == AWQ:
            return self.awq_codes(n)
        bits = self.bits
        qweight, qzeros = self.need("qweight", INT32), self.need("qzeros", INT32)
        if qweight.shape[0] * 32 % bits:
            raise CheckpointError(f"{self.where}: {self.name}.qweight has {qweight.shape[0]} rows, which hold no "
                                  f"whole number of {bits}-bit columns; the checkpoint is damaged or its bits are wrong")
        k = qweight.shape[0] * 32 // bits
        self.expect("qweight", (qweight.shape[0], n), f"K*bits/32 x N for N={n} from the scales")
        self.expect("qzeros", (qzeros.shape[0], words_for(n, bits)), f"G x ceil(N*bits/32) for N={n}")
        q = unpack_bits(qweight, bits, k, axis=0).T
        zero = unpack_bits(qzeros, bits, n, axis=1)
        if self.quant.packing_format == GPTQ_V1:
            zero = zero.astype(np.int16) + 1
            if zero.max() > 2**bits - 1:
                raise CheckpointError(f"{self.where}: {self.name} stores a zero point of {2**bits - 1} in "
                                      f"{GPTQ_V1}, meaning {2**bits} after GPTQ's +1, which {bits} bits cannot hold")
        return q, zero

    def awq_codes(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        if self.bits != 4:
            raise CheckpointError(f"{self.where}: layer {self.name} is {self.bits}-bit, but {AWQ} holds 4-bit "
                                  "weights only")
        if n % 8:
            raise CheckpointError(f"{self.where}: {self.name} has N={n} outputs; {AWQ} packs 8 per word and needs "
                                  "N % 8 == 0")
        qweight, qzeros = self.need("qweight", INT32), self.need("qzeros", INT32)
        self.expect("qweight", (qweight.shape[0], n // 8), f"K x N/8 for N={n} from the scales")
        self.expect("qzeros", (qzeros.shape[0], n // 8), f"G x N/8 for N={n}")
        return unpack_awq(qweight).T, unpack_awq(qzeros)  # q [K, N] -> [N, K]; zero [G, N]

    def check_groups(self, k: int, group: int) -> None:
        """Scales and zero points of ceil(K / group) groups, and no act-order column permutation."""
        g = math.ceil(k / group)
        self.expect("scales", (g, self.tensors[self.name + ".scales"].shape[1]), f"{g} groups of {group} for K={k}")
        self.expect("qzeros", (g, self.tensors[self.name + ".qzeros"].shape[1]), f"{g} groups of {group} for K={k}")
        g_idx = self.tensors.get(self.name + ".g_idx")
        if g_idx is not None and not np.array_equal(g_idx.reshape(-1), np.arange(k) // group):
            raise CheckpointError(f"{self.source[self.name + '.g_idx']}: {self.name}.g_idx is not k // {group}: the "
                                  "layer was quantized with act-order (desc_act), which is not supported; quantize "
                                  "without it")

    def scale(self, scales: np.ndarray) -> np.ndarray:
        scale = scales.T.astype(np.float32)
        if scales.dtype != np.float16 and not np.array_equal(scale.astype(np.float16).astype(np.float32), scale,
                                                             equal_nan=True):
            raise CheckpointError(f"{self.where}: {self.name}.scales are {scales.dtype} values that float16 cannot "
                                  "hold exactly")
        return np.ascontiguousarray(scale)

    def bias(self) -> np.ndarray | None:
        bias = self.tensors.get(self.name + ".bias")
        return None if bias is None else bias.astype(np.float32).reshape(-1)

    def offset(self, g: int, n: int, group: int, k: int) -> np.ndarray | None:
        if self.name + ".offsets" not in self.tensors:
            return None
        offsets = self.need("offsets", (np.dtype(np.float16),))
        self.expect("offsets", (g, n), f"{g} groups of {group} for K={k}")
        return np.ascontiguousarray(offsets.T.astype(np.float32))

    def check(self, qw: QuantWeight) -> None:
        """The unpacked layer is consistent with itself and with quantization_config."""
        try:
            qw.check(self.name)
        except ValueError as e:
            raise CheckpointError(f"{self.where}: {e}; the checkpoint is broken (write it again)") from None
        if self.sym and not np.all(qw.zero == 2 ** (self.bits - 1)):
            raise CheckpointError(f"{self.where}: {self.name} is symmetric by quantization_config but its zero "
                                  f"points are not {2 ** (self.bits - 1)}; the config and the tensors disagree")
        n = qw.shape[0]
        if qw.bias is not None and (qw.bias.shape != (n,) or not np.all(np.isfinite(qw.bias))):
            raise CheckpointError(f"{self.where}: {self.name}.bias must be {n} finite values")
