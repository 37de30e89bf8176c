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
| auto_round:gptq_levels | as auto_round               | as auto_round              | zero              |

and L.scales is float16 [G, N] in all three (bit layouts in packing.py; "zero - 1" is GPTQ v1's
habit, so readers add 1). L.bias, when the layer has one, is float. A `L.g_idx` [K] may be present;
only the trivial k // g is accepted (act-order reorders columns, which no exporter here can carry).

We write the first two (auto_round:auto_gptq only when every layer is symmetric: "zero - 1" has no
room for a zero point of 0), and the last, ours, when some layer is on a non-uniform grid (below); we
read all four, in one file or sharded (model.safetensors.index.json;
we write shards of at most shard_size, as transformers does: shards.py).

One extension, written only for layers tuned on a GGUF grid with a float minimum (`tune --gguf q4_1`,
q5_1, q4_k, q5_k, q2_k and the mixes): `L.offsets` float16 [G, N], the float minimum of each group,
with zero points stored as 0, and then

    weight[n, k] = q[n, k] * scale[n, k // g] - offset[n, k // g]

auto-round's own loader does not know this tensor; checkpoints without such layers never carry it.

A second extension, for layers on a non-uniform grid (`tune --gguf iq4_nl`): their codes q are packed
as 4-bit symmetric integers (zero points 8), but mean

    weight[n, k] = levels[q[n, k]] * scale[n, k // g]

with the grid named by auto-round's own key `data_type` and its table written beside it, globally
(`"data_type": "iq4_nl", "levels": [-127, -104, ...]`) or in a layer's extra_config entry, and the whole
file marked packing_format "auto_round:gptq_levels" (GPTQ's layout, zero points as they are). Readers
that know neither must not take the codes for integers. auto-round's loader (0.16.1, also behind
transformers' from_pretrained) picks a kernel per layer by packing format and scheme; a data_type it does
not know alone is not enough: its "fake" fallback accepts any data_type under its own packing formats,
expects float weights and would leave every quantized linear randomly initialized (a "MISSING" load
report, no error). Under the unknown packing format no backend matches, and it stops with "No compatible
backend found for layer ... data_type='iq4_nl'" (checked with auto-round 0.16.1 and transformers
5.25). Our reader checks the table against the name and refuses a name or table it does not know.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..model.fields import GROUP, POSITIVE, Field, Rule, found, read_fields
from .qweight import GRIDS, SUPPORTED_BITS, UNIFORM, QuantWeight, check_grid

GPTQ_V1 = "auto_round:auto_gptq"  # GPTQ layout, zero point stored minus 1
GPTQ = "auto_round"  # GPTQ layout, zero point as is
AWQ = "auto_round:auto_awq"  # AWQ layout (4-bit), zero point as is
GPTQ_LEVELS = "auto_round:gptq_levels"  # ours: GPTQ layout, zero point as is, codes of grids index levels
READ_FORMATS = (GPTQ_V1, GPTQ, AWQ, GPTQ_LEVELS)
WRITE_FORMATS = (GPTQ_V1, GPTQ, GPTQ_LEVELS)

AUTOROUND_FORMAT_VERSION = "0.16.1"  # the auto-round release whose layout we write and test against
QUANT_METHODS = ("auto-round", "intel/auto-round")  # the second is what older auto-round wrote
SCHEME_KEYS = ("bits", "group_size", "sym")
LAYER_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "bias", "offsets")

# quantization_config's scheme, checked by read_fields (model/fields.py)
QUANT_FIELDS = (
    #     field         type    when absent  rule
    Field("bits",       "int",                rule=Rule(f"among {', '.join(map(str, SUPPORTED_BITS))}",
                                                        lambda v: v in SUPPORTED_BITS)),
    Field("group_size", "int",                rule=GROUP),
    Field("sym",        "bool"),
)
# an extra_config entry: the keys it overrides (bits above 8 mark a layer kept in float, as auto-round writes)
LAYER_FIELDS = (
    Field("bits",       "int",  absent=None,  rule=POSITIVE),
    Field("group_size", "int",  absent=None,  rule=GROUP),
    Field("sym",        "bool", absent=None),
)


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
    grid: str = UNIFORM  # data_type: "int", or a non-uniform grid of qweight.GRIDS

    def layer_override(self, name: str) -> dict:
        """The extra_config entry of one layer: its exact name's, else the first key that matches as a regex."""
        over = self.extra_config.get(name)
        if over is None:
            over = next((v for k, v in self.extra_config.items() if _regex_search(k, name)), {})
        return over

    def layer_grid(self, name: str) -> str:
        """The grid of one layer's codes after extra_config (UNIFORM for float layers too)."""
        data_type = self.layer_override(name).get("data_type", self.grid)
        return data_type if data_type in GRIDS else UNIFORM

    def layer_scheme(self, name: str) -> tuple[int, int, bool]:
        """(bits, group_size as in the config, sym) of one layer, after extra_config.

        An exact layer name wins; otherwise the first key that matches as a regex. Like auto-round's
        loader we use re.search; auto-round writes its patterns as ".*name.*", so for its files this
        is the same as a full match. A layer kept in float by auto-round reads as 16 bits.
        """
        over = self.layer_override(name)
        bits = int(over.get("bits", self.bits))
        if over.get("data_type", self.grid) not in (UNIFORM, *GRIDS):
            bits = max(bits, 16)  # a float layer ("fp") is not quantized, whatever bits says
        return bits, int(over.get("group_size", self.group_size)), bool(over.get("sym", self.sym))

    def to_json(self) -> dict:
        d = {
            "quant_method": "auto-round",
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "data_type": self.grid,
            **grid_record(self.grid),
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
        grid = read_grid(d, "quantization_config", UNIFORM)
        if grid not in (UNIFORM, *GRIDS):
            raise CheckpointError(f"data_type is {grid!r}; only integer weights (\"int\") and the non-uniform grids "
                                  f"{', '.join(GRIDS)} can be read")
        scheme = read_fields(d, QUANT_FIELDS, "quantization_config", CheckpointError)
        check_grid(grid, scheme["bits"], scheme["sym"], CheckpointError, "quantization_config")
        extra = read_extra_config(d.get("extra_config"), grid)
        if "packing_format" not in d and str(d.get("quantizer")).startswith("signround-export"):
            raise CheckpointError("quantization_config: packing_format is missing, which signround-export always "
                                  "writes (it says how zero points are stored); config.json is damaged: restore it")
        fmt = d.get("packing_format", GPTQ_V1)  # early auto-round wrote no packing_format: GPTQ v1 then
        if fmt not in READ_FORMATS:
            raise CheckpointError(f"packing_format {fmt!r} is not one this reader knows "
                                  f"({', '.join(READ_FORMATS)}); re-export with auto-round's \"auto_round\" format")
        known = {"quant_method", "data_type", "levels", "packing_format", "extra_config", "iters", "tuning",
                 "block_name_to_quantize", "autoround_version", "quantizer", *SCHEME_KEYS}
        # Our own tuning arguments sit under "tuning"; auto-round records its own (nsamples, seqlen,
        # amp, ...) as top-level keys: keep those as the tuning record.
        tuning = d.get("tuning") or {k: v for k, v in d.items() if k not in known}
        blocks = d.get("block_name_to_quantize") or "model.layers"
        check_records(tuning, blocks)
        return cls(**scheme, packing_format=fmt, extra_config=extra, iters=d.get("iters"), tuning=dict(tuning),
                   block_name_to_quantize=blocks if isinstance(blocks, str) else ",".join(blocks),
                   autoround_version=d.get("autoround_version"), quantizer=d.get("quantizer"), grid=grid)


def check_records(tuning, blocks) -> None:
    """CheckpointError when quantization_config's tuning record is not a JSON object, or its
    block_name_to_quantize not a name or a list of names."""
    if not isinstance(tuning, dict):
        raise CheckpointError(f"quantization_config: tuning is {found(tuning)}; it must be a JSON object (the tuning "
                              "record) or absent (correct it)")
    if not isinstance(blocks, str) and not (isinstance(blocks, list) and all(isinstance(b, str) for b in blocks)):
        raise CheckpointError(f"quantization_config: block_name_to_quantize is {found(blocks)}; it must be a module "
                              "name or a list of them (correct it)")


def grid_record(grid: str) -> dict:
    """The levels written beside a non-uniform grid's data_type (none for "int")."""
    return {} if grid == UNIFORM else {"levels": list(GRIDS[grid])}


def read_grid(d: dict, where: str, inherited: str) -> str:
    """The data_type of a quantization_config or an extra_config entry (inherited when absent), its levels
    record checked: present where data_type names a non-uniform grid, equal to that grid's table, and
    absent elsewhere."""
    data_type = d.get("data_type", inherited)
    levels = d.get("levels")
    if not isinstance(data_type, str):
        raise CheckpointError(f"{where}: data_type is {found(data_type)}; it must be a name such as \"int\" "
                              "(correct it)")
    if data_type in GRIDS:
        if levels is None and "data_type" in d:
            raise CheckpointError(f"{where}: data_type {data_type!r} comes without its levels; the file's writer "
                                  f"omitted them (add \"levels\": {list(GRIDS[data_type])})")
        if levels is not None and levels != list(GRIDS[data_type]):
            raise CheckpointError(f"{where}: levels {found(levels)} are not {data_type}'s {list(GRIDS[data_type])}; "
                                  "this reader holds that grid's table only")
    elif levels is not None:
        raise CheckpointError(f"{where}: levels are given but data_type is {data_type!r}, which has none; "
                              f"this reader knows the levels of {', '.join(GRIDS)} only")
    return data_type


def read_extra_config(extra, grid: str = UNIFORM) -> dict[str, dict]:
    """quantization_config's extra_config (layer name or regex -> the keys it overrides), each entry's
    overrides checked by LAYER_FIELDS and its grid by read_grid (grid: the config's own)."""
    if extra is None or extra == []:  # none, as some writers say it
        return {}
    if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
        raise CheckpointError("quantization_config: extra_config must map layer names to JSON objects of the keys "
                              "they override (correct it)")
    for name, over in extra.items():
        read_fields(over, LAYER_FIELDS, f"quantization_config's extra_config[{name!r}]", CheckpointError)
        read_grid(over, f"quantization_config's extra_config[{name!r}]", grid)
    return dict(extra)


def _regex_search(pattern: str, name: str) -> bool:
    try:
        return re.search(pattern, name) is not None
    except re.error:  # a key that is no valid regex can only match exactly
        return False


@dataclass
class Checkpoint:
    """A checkpoint's contents. qweights and tensors are Mappings: dicts when built in memory, and read
    from disk one entry per indexing when read from a folder (read_checkpoint), so that a consumer
    which takes one entry at a time and drops it holds one layer at a time. Iterating over names and
    `in` read nothing."""

    path: Path
    hf_config: dict  # config.json without quantization_config
    quant: QuantConfig
    qweights: Mapping[str, QuantWeight]  # module name ("model.layers.0.self_attn.q_proj") -> integers
    tensors: Mapping[str, np.ndarray]  # every other tensor, float32, by HF name
    tuning_log: dict | None = None
    biased: frozenset[str] | None = None  # the quantized layers with a bias, when known without reading

    def layers_with_bias(self) -> frozenset[str]:
        """The quantized layers that carry a bias: from the headers when read from a folder, else from the
        layers themselves."""
        if self.biased is None:
            self.biased = frozenset(m for m in self.qweights if self.qweights[m].bias is not None)
        return self.biased
