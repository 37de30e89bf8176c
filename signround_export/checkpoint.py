"""The quantized checkpoint: auto-round's "auto_round" format, written and read.

A checkpoint is one folder, the hub every exporter reads:

    config.json         the model's HF config plus `quantization_config` (QuantConfig below)
    model.safetensors   the quantized linears packed as below; every other tensor (embeddings,
                        norms, a float lm_head) as float32
    tuning_log.json     what the tuning did (optional)
    tokenizer files     copied from the source model

A quantized linear L with HF weight [N, K] (N out, K in), bits b, groups of g along K,
G = ceil(K / g) (a short last group counts as zero-padded) is stored as

    weight[n, k] = (q[n, k] - zero[n, k // g]) * scale[n, k // g]

| packing_format       | L.qweight int32               | L.qzeros int32             | zero stored       |
| -------------------- | ----------------------------- | -------------------------- | ----------------- |
| auto_round:auto_gptq | [K*b/32, N], q packed along K | [G, ceil(N*b/32)], along N | zero - 1          |
| auto_round           | [K*b/32, N], q packed along K | [G, ceil(N*b/32)], along N | zero              |
| auto_round:auto_awq  | [K, N/8], along N, AWQ order  | [G, N/8], AWQ order        | zero (4-bit only) |

and L.scales is float16 [G, N] in all three (bit layouts in packing.py; "zero - 1" is GPTQ v1's
habit, so readers add 1). L.bias, when the layer has one, is float. A `L.g_idx` [K] may be present;
only the trivial k // g is accepted (act-order reorders columns, which no exporter here can carry).

We write the first two (auto_round:auto_gptq only when every layer is symmetric: "zero - 1" has no
room for a zero point of 0) and read all three, in one file or sharded (model.safetensors.index.json).

One extension, written only for layers tuned on a GGUF grid with a float minimum (`tune --gguf q4_1`,
q5_1, q4_k, q5_k, q2_k and the mixes): `L.offsets` float16 [G, N], the float minimum of each group,
with zero points stored as 0, and then

    weight[n, k] = q[n, k] * scale[n, k // g] - offset[n, k // g]

auto-round's own loader does not know this tensor; checkpoints without such layers never carry it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .fileio import atomic_dir
from .packing import pack_bits, unpack_awq, unpack_bits, words_for
from .quant.qweight import SUPPORTED_BITS, QuantWeight

GPTQ_V1 = "auto_round:auto_gptq"  # GPTQ layout, zero point stored minus 1
GPTQ = "auto_round"  # GPTQ layout, zero point as is
AWQ = "auto_round:auto_awq"  # AWQ layout (4-bit), zero point as is
READ_FORMATS = (GPTQ_V1, GPTQ, AWQ)
WRITE_FORMATS = (GPTQ_V1, GPTQ)

AUTOROUND_FORMAT_VERSION = "0.16.1"  # the auto-round release whose layout we write and test against
QUANT_METHODS = ("auto-round", "intel/auto-round")  # the second is what older auto-round wrote
SCHEME_KEYS = ("bits", "group_size", "sym")
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias", "offsets")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read, with what is wrong and what to do."""


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("signround-export")
    except Exception:  # running from a source tree that is not installed
        return "unknown"


@dataclass
class QuantConfig:
    bits: int
    group_size: int  # as in the config: -1 means one group per row
    sym: bool
    packing_format: str = GPTQ_V1
    extra_config: dict[str, dict] = field(default_factory=dict)  # layer name or regex -> differing keys
    iters: int | None = None
    tuning: dict = field(default_factory=dict)  # the tuning arguments, recorded, never used to read
    block_name_to_quantize: str = "model.layers"
    autoround_version: str | None = AUTOROUND_FORMAT_VERSION
    quantizer: str | None = None  # the tool that wrote the checkpoint; None: not recorded

    def layer_scheme(self, name: str) -> tuple[int, int, bool]:
        """(bits, group_size as in the config, sym) of one layer, after extra_config.

        An exact layer name wins; otherwise the first key that matches as a regex. Like auto-round's
        loader we use re.search; auto-round writes its patterns as ".*name.*", so for its files this
        is the same as a full match. A layer kept in float by auto-round reads as 16 bits.
        """
        over = self.extra_config.get(name)
        if over is None:
            over = next((v for k, v in self.extra_config.items() if _regex_search(k, name)), {})
        bits = int(over.get("bits", self.bits))
        if over.get("data_type", "int") != "int":
            bits = max(bits, 16)  # a float layer ("fp") is not quantized, whatever bits says
        return bits, int(over.get("group_size", self.group_size)), bool(over.get("sym", self.sym))

    def to_json(self) -> dict:
        d = {
            "quant_method": "auto-round",
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "data_type": "int",
            "packing_format": self.packing_format,
            "block_name_to_quantize": self.block_name_to_quantize,
            "autoround_version": self.autoround_version,
            "quantizer": self.quantizer if self.quantizer is not None else f"signround-export {_tool_version()}",
            "iters": self.iters,
        }
        if self.extra_config:
            d["extra_config"] = self.extra_config
        if self.tuning:
            d["tuning"] = self.tuning
        return d

    @classmethod
    def from_json(cls, d: dict) -> "QuantConfig":
        """Parse a quantization_config; raise CheckpointError for anything this project cannot read."""
        if not isinstance(d, dict):
            raise CheckpointError(f"quantization_config must be a JSON object, got {type(d).__name__}")
        method = d.get("quant_method")
        if method not in QUANT_METHODS:
            raise CheckpointError(f"quant_method is {method!r}; only auto-round checkpoints "
                                  f"(quant_method \"auto-round\") can be read")
        if d.get("data_type", "int") != "int":
            raise CheckpointError(f"data_type is {d['data_type']!r}; only integer weights (\"int\") can be read")
        missing = [k for k in SCHEME_KEYS if k not in d]
        if missing:
            raise CheckpointError(f"quantization_config lacks {', '.join(missing)}")
        fmt = d.get("packing_format", GPTQ_V1)  # early auto-round wrote no packing_format: GPTQ v1 then
        if fmt not in READ_FORMATS:
            raise CheckpointError(f"packing_format {fmt!r} is not one this reader knows "
                                  f"({', '.join(READ_FORMATS)}); re-export with auto-round's \"auto_round\" format")
        known = {"quant_method", "data_type", "packing_format", "extra_config", "iters", "tuning",
                 "block_name_to_quantize", "autoround_version", "quantizer", *SCHEME_KEYS}
        # Our own tuning arguments sit under "tuning"; auto-round records its own (nsamples, seqlen,
        # amp, ...) as top-level keys: keep those as the tuning record.
        tuning = d.get("tuning") or {k: v for k, v in d.items() if k not in known}
        blocks = d.get("block_name_to_quantize") or "model.layers"
        return cls(bits=int(d["bits"]), group_size=int(d["group_size"]), sym=bool(d["sym"]), packing_format=fmt,
                   extra_config=dict(d.get("extra_config") or {}), iters=d.get("iters"), tuning=dict(tuning),
                   block_name_to_quantize=blocks if isinstance(blocks, str) else ",".join(blocks),
                   autoround_version=d.get("autoround_version"), quantizer=d.get("quantizer"))


def _regex_search(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except re.error:  # a key that is no valid regex can only match exactly
        return False


@dataclass
class Checkpoint:
    path: Path
    hf_config: dict  # config.json without quantization_config
    quant: QuantConfig
    qweights: dict[str, QuantWeight]  # module name ("model.layers.0.self_attn.q_proj") -> integers
    tensors: dict[str, np.ndarray]  # every other tensor, float32, by HF name
    tuning_log: dict | None = None


# ---------------------------------------------------------------------------------------------
# writing


def write_checkpoint(out_dir, hf_config: dict, quant: QuantConfig, qweights: dict[str, QuantWeight],
                     tensors: dict[str, np.ndarray], tokenizer_src_dir=None, tuning_log: dict | None = None) -> Path:
    """Write a checkpoint folder atomically: it appears under `out_dir` only once it is whole.

    Layers whose scheme differs from quant's default get an exact-name entry in extra_config, as do
    quantized layers outside the blocks (lm_head) and float linears inside them, so auto-round's
    loader finds the same layers we do.
    """
    from safetensors.numpy import save_file

    quant = _settled_config(quant, qweights, tensors)
    arrays: dict[str, np.ndarray] = {}
    for name in sorted(qweights):
        arrays.update(_pack_layer(name, qweights[name], quant.packing_format))
    for name, t in tensors.items():
        if name in arrays or name.rsplit(".", 1)[0] in qweights:
            raise ValueError(f"tensor {name} belongs to quantized layer {name.rsplit('.', 1)[0]}; "
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
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_src_dir) / fname
                if src.is_file():
                    shutil.copyfile(src, tmp / fname)
    return out_dir


def _settled_config(quant: QuantConfig, qweights: dict[str, QuantWeight], tensors: dict) -> QuantConfig:
    """quant with the packing format checked and extra_config completed for the layers at hand."""
    if quant.packing_format not in WRITE_FORMATS:
        raise ValueError(f"cannot write packing_format {quant.packing_format!r}; we write {' or '.join(WRITE_FORMATS)}")
    extra = {k: dict(v) for k, v in quant.extra_config.items()}
    settled = replace(quant, extra_config=extra)  # sees the entries added below
    blocks = [b.strip() for b in quant.block_name_to_quantize.split(",") if b.strip()]

    def in_blocks(name: str) -> bool:
        return any(name.startswith(b + ".") for b in blocks)

    for name, qw in sorted(qweights.items()):
        qw.check(name)
        if qw.sym and not np.all(qw.zero == 2 ** (qw.bits - 1)):
            raise ValueError(f"{name} is marked symmetric but its zero points are not {2 ** (qw.bits - 1)}")
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
            raise ValueError(f"{name} is asymmetric: packing_format {GPTQ_V1!r} stores zero points minus 1 and "
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
        raise ValueError(f"{name}: K={k} columns of {qw.bits} bits do not fill whole int32 words, which the "
                         "format needs to know K; leave this layer in float")
    scales = qw.scale.T.astype(np.float16)
    if not np.array_equal(scales.astype(np.float32), qw.scale.T):
        raise ValueError(f"{name}: scales are not float16 values; round them to float16 before writing "
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
            raise ValueError(f"{name}: offsets are not float16 values; round them to float16 before writing")
        out[f"{name}.offsets"] = np.ascontiguousarray(offsets)
    if qw.bias is not None:
        out[f"{name}.bias"] = np.asarray(qw.bias, dtype=np.float32)
    return out


# ---------------------------------------------------------------------------------------------
# reading


def read_checkpoint(path) -> Checkpoint:
    """Read a checkpoint folder into exact integers and float32 tensors; CheckpointError if it is broken."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder (give the folder `signround tune` wrote, "
                              "with config.json and model.safetensors)")
    config_path = folder / "config.json"
    hf = _read_json(config_path, "the checkpoint's config.json")
    qc = hf.pop("quantization_config", None)
    if qc is None:
        raise CheckpointError(f"{config_path} has no quantization_config: {folder} is a float model, not a "
                              "quantized checkpoint (quantize it with `signround tune` first)")
    try:
        quant = QuantConfig.from_json(qc)
    except CheckpointError as e:
        raise CheckpointError(f"{config_path}: {e}") from None

    tensors, source = _read_tensors(folder)
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
    tuning_log = _read_json(log_path, "the tuning log") if log_path.is_file() else None
    return Checkpoint(path=folder, hf_config=hf, quant=quant, qweights=qweights, tensors=floats,
                      tuning_log=tuning_log)


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {path.parent} is not a complete checkpoint ({what})")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the file is damaged (write it again)") from None


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the shards
        weight_map = _read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map; the shard index is damaged")
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = " (only .bin weights found: save with safetensors)" if list(folder.glob("*.bin")) else ""
        raise CheckpointError(f"{folder} holds no model.safetensors{other}")
    return files


def _read_tensors(folder: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """All tensors of the folder as numpy arrays, and the file each came from (for messages)."""
    import torch  # reads bfloat16, which numpy cannot hold
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    source: dict[str, str] = {}
    for f in _safetensors_files(folder):
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    if name in tensors:
                        raise CheckpointError(f"{f}: tensor {name} is also in {source[name]}; the shards overlap")
                    t = st.get_tensor(name)
                    tensors[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
                    source[name] = str(f)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{f} is truncated or corrupt ({e}); write the checkpoint again") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        lost = sorted(set(_read_json(index, "the shard index")["weight_map"]) - set(tensors))
        if lost:
            raise CheckpointError(f"{index} lists tensors no shard holds: {', '.join(lost[:5])}")
    return tensors, source


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
