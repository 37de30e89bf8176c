"""GGUF export for llama.cpp: a checkpoint's tensors in GGUF blocks (encode.py), under llama.cpp's names
and row order (tensors.py), with the model's hyperparameters and tokenizer (vocab.py), in one file."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_VERSION, GGUFWriter, RopeScalingType
from tqdm import tqdm

from ...atomic import atomic_file
from ...digests import PLACEHOLDER
from ...checkpoint.format import Checkpoint
from ...checkpoint.qweight import QuantWeight
from ...errors import GGUFExportError
from ...model.config import ModelConfig, yarn_mscale
from ...model.families import check_linears
from ...model.rope import rope_divisors
from .encode import encode_float, encode_layer, row_slices
from .read import DIGESTS_KEY, METADATA_KEY, ROPE_FACTORS, ROPE_FREQS, dequantize, stamp_metadata_digest
from .spool import TensorSpool
from .strip import file_name
from .tensors import IGNORED_SUFFIXES, gguf_name, is_norm, llama_rows, rope_heads
from .types import GGUF_TYPES
from .vocab import Vocab, add_vocab, read_vocab

ASYM4_TYPES = ("Q5_0", "Q4_1")  # for 4-bit asymmetric layers: exact, or smaller and near exact
FLOAT_TYPES = ("F16", "F32", "Q8_0")  # for float matrices


@dataclass
class TensorRecord:
    """How one tensor went into the file, and how far it is from the checkpoint."""
    name: str  # GGUF name
    source: str  # checkpoint name
    type: str
    exact: bool
    quantized: bool  # a quantized layer of the checkpoint (error in steps) or a float tensor (error relative)
    error: float  # max |W_file - W_ckpt|, in quantization steps for quantized layers, else relative to max |W|


@dataclass
class GGUFExport:
    path: Path
    tensors: list[TensorRecord] = field(default_factory=list)
    file_type: str = ""
    bytes: int = 0

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        inexact = [t for t in self.tensors if not t.exact and t.type != "F32"]
        lines = [f"{self.path}: {self.bytes / 2**20:.1f} MiB, file type {self.file_type}, tensors "
                 + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))]
        if inexact:
            worst = max(inexact, key=lambda t: t.error)
            lines.append(f"  {len(inexact)} tensors not exact; worst {worst.name} ({worst.type}): "
                         f"{worst.error:.3g} {'steps' if worst.quantized else 'relative'}")
        else:
            lines.append("  every quantized tensor holds the checkpoint's integers exactly")
        return "\n".join(lines)


def check_windows(cfg: ModelConfig, param: str | None = None) -> None:
    """Refuse by name a model with sliding windows shorter than its context when llama.cpp's architecture
    for the family reads no window (Family.gguf_windows): llama.cpp would attend to the whole context.
    A family whose architecture reads one sets gguf_windows and writes its keys in add_hparams."""
    sliding = [i for i in range(cfg.n_layers) if cfg.window(i) is not None]
    if sliding and not cfg.family.gguf_windows:
        asked = f"`{param}` asks for a GGUF file, but " if param else ""
        raise GGUFExportError(
            f"{asked}this {cfg.model_type} model has sliding-window attention ({cfg.windows[sliding[0]]} tokens on "
            f"{len(sliding)} of {cfg.n_layers} layers, context {cfg.context_length}), which llama.cpp's "
            f"{cfg.family.gguf_arch!r} architecture does not read: it cannot be exported to GGUF exactly; "
            "export it to ONNX instead", param=param)


def llama_cpp_attention_scale(cfg: ModelConfig) -> float:
    """The scale llama.cpp's graph gives attention scores: 1/sqrt(head_dim), or 1/sqrt(hidden / heads) at
    the family's wide-scale block count (Gemma's 27B models); the file has no key for it."""
    wide = cfg.n_layers == cfg.family.gguf_wide_scale_layers
    return (cfg.hidden_size // cfg.n_heads if wide else cfg.head_dim) ** -0.5


def check_graph(cfg: ModelConfig, param: str | None = None) -> None:
    """Refuse by name a config that llama.cpp's graph for the family's architecture would contradict: it
    hard-codes the attention scale, and gemma2's graph always soft-caps and reads a tied head."""
    fam, arch = cfg.family, repr(cfg.family.gguf_arch)
    scale = cfg.attention_scale if cfg.attention_scale is not None else cfg.head_dim ** -0.5
    problems = []
    if not math.isclose(scale, llama_cpp_attention_scale(cfg), rel_tol=1e-6):
        problems.append(f"attention scale {scale:.6g} (query_pre_attn_scalar {cfg.query_pre_attn_scalar}) where "
                        f"llama.cpp's {arch} graph uses {llama_cpp_attention_scale(cfg):.6g} for {cfg.n_layers} blocks")
    if fam.gguf_attn_softcap != (cfg.attn_softcap is not None):
        problems.append(f"attn_logit_softcapping {cfg.attn_softcap}, where llama.cpp's {arch} graph "
                        + ("always soft-caps attention" if fam.gguf_attn_softcap else "never soft-caps attention"))
    final_ok = {"never": cfg.final_softcap is None, "always": cfg.final_softcap is not None}
    if not final_ok.get(fam.gguf_final_softcap, True):
        problems.append(f"final_logit_softcapping {cfg.final_softcap}, where llama.cpp's {arch} graph "
                        f"{fam.gguf_final_softcap} soft-caps the logits")
    if fam.gguf_tied_head and not cfg.tie_word_embeddings:
        problems.append(f"an lm_head of its own (untied, or quantized apart from the embedding), where "
                        f"llama.cpp's {arch} graph reads the head from token_embd")
    if problems:
        asked = f"`{param}` asks for a GGUF file, but " if param else ""
        raise GGUFExportError(f"{asked}this {cfg.model_type} model has " + "; ".join(problems)
                              + ": llama.cpp would compute another model, so it cannot be exported to GGUF; "
                              "export it to ONNX instead", param=param)


def yarn_problems(cfg: ModelConfig) -> list[str]:
    """What llama.cpp's yarn would compute otherwise than the config: for these architectures it reads the
    factor, original context and magnitude from the file (yarn_attn_factor), but always rounds the band
    outwards and takes beta_fast 32 and beta_slow 1."""
    s = cfg.rope_scaling
    if s is None or s.type != "yarn":
        return []
    problems = []
    if not s.truncate:
        problems.append("yarn with truncate false (llama.cpp always rounds the blend's band outwards)")
    if (s.beta_fast, s.beta_slow) != (32.0, 1.0):
        problems.append(f"yarn beta_fast {s.beta_fast:g} / beta_slow {s.beta_slow:g} (llama.cpp's "
                        f"{cfg.family.gguf_arch!r} loader reads none: it takes 32 / 1)")
    if cfg.local_layers and cfg.local_rope_theta is not None:  # llama.cpp's yarn settings reach every layer
        problems.append("yarn on the global layers beside local layers of plain RoPE (llama.cpp applies its yarn "
                        "settings to every layer; not supported here)")
    return problems


def yarn_attn_factor(cfg: ModelConfig) -> float:
    """rope.scaling.attn_factor for yarn: llama.cpp scales cos and sin by yarn_mscale(factor) times it, so
    the config's attention factor (attention_factor, or from mscale / mscale_all_dim) divided by that."""
    s = cfg.rope_scaling
    return s.attention_factor / yarn_mscale(s.factor)


def check_rope(cfg: ModelConfig, param: str | None = None) -> None:
    """Refuse by name a rope scaling llama.cpp would compute otherwise (yarn_problems)."""
    problems = yarn_problems(cfg)
    if problems:
        asked = f"`{param}` asks for a GGUF file, but " if param else ""
        raise GGUFExportError(f"{asked}this {cfg.model_type} model has " + "; ".join(problems)
                              + ": llama.cpp would compute another model, so it cannot be exported to GGUF; "
                              "export it to ONNX instead", param=param)


def check_llama_cpp(cfg: ModelConfig, param: str | None = None) -> None:
    """Everything llama.cpp cannot run as the config says, refused by name before any work."""
    check_windows(cfg, param)
    check_graph(cfg, param)
    check_rope(cfg, param)


def check_options(asym4: str, float_type: str) -> tuple[str, str]:
    """asym4 and float_type as GGUF type names (any case accepted)."""
    asym4, float_type = asym4.upper(), float_type.upper()
    if asym4 not in ASYM4_TYPES:
        raise GGUFExportError(f"asym4 {asym4!r}: choose 'Q5_0' (exact) or 'Q4_1' (smaller, near exact)",
                              param="asym4")
    if float_type not in FLOAT_TYPES:
        raise GGUFExportError(f"float_type {float_type!r}: choose 'F16', 'F32' or 'Q8_0'", param="float_type")
    return asym4, float_type


def check_names(ckpt: Checkpoint, cfg: ModelConfig) -> None:
    """Refuse a checkpoint with tensors llama.cpp has no name for, from the names alone (a layer's bias is
    checked when its layer is read)."""
    unknown = [n for n in (*(m + ".weight" for m in ckpt.qweights), *ckpt.tensors)
               if not n.endswith(IGNORED_SUFFIXES) and gguf_name(n, cfg.family) is None]
    if unknown:
        raise unknown_names(unknown, cfg)


def unknown_names(names: list[str], cfg: ModelConfig) -> GGUFExportError:
    return GGUFExportError(f"tensors with no llama.cpp name: {', '.join(names[:5])}; this checkpoint "
                           f"does not look like a {cfg.model_type} model")


def encoded_tensors(ckpt: Checkpoint, cfg: ModelConfig, asym4: str, float_type: str, kquant: bool,
                    progress: bool = False) -> Iterator[tuple[TensorRecord, np.ndarray]]:
    """Every tensor of the model encoded (encode_tensor), in the checkpoint's order: each layer or tensor
    is read from the checkpoint once and dropped before the next is read."""
    floats = [n for n in ckpt.tensors if not n.endswith(IGNORED_SUFFIXES)]
    with tqdm(total=len(ckpt.qweights) + len(floats), desc="gguf", unit="tensor", disable=not progress) as bar:
        for module in ckpt.qweights:
            yield from encoded_layer(module, ckpt.qweights[module], cfg, asym4, float_type, kquant)
            bar.update()
        for name in floats:
            yield encode_tensor(name, ckpt.tensors[name], cfg, asym4, float_type, kquant)
            bar.update()


def encoded_layer(module: str, qw: QuantWeight, cfg: ModelConfig, asym4: str, float_type: str,
                  kquant: bool) -> Iterator[tuple[TensorRecord, np.ndarray]]:
    """A quantized layer's weight, and its bias as a float tensor of its own."""
    yield encode_tensor(module + ".weight", qw, cfg, asym4, float_type, kquant)
    if qw.bias is not None:
        if gguf_name(module + ".bias", cfg.family) is None:
            raise unknown_names([module + ".bias"], cfg)
        yield encode_tensor(module + ".bias", np.asarray(qw.bias, dtype=np.float32), cfg, asym4, float_type, kquant)


def encode_tensor(hf_name: str, item: QuantWeight | np.ndarray, cfg: ModelConfig, asym4: str, float_type: str,
                  kquant: bool) -> tuple[TensorRecord, np.ndarray]:
    """One tensor's record and data, in llama.cpp's row order; its error read back as llama.cpp reads it."""
    quantized = isinstance(item, QuantWeight)
    if not quantized:
        item = np.asarray(item, dtype=np.float32)
        if is_norm(hf_name) and cfg.family.norm_offset:  # llama.cpp multiplies by the weight as it lies
            item = item + np.float32(cfg.family.norm_offset)
    heads = rope_heads(cfg, hf_name)
    if heads:
        item = llama_rows(item, heads)
    type_name, data = encode_layer(item, asym4, kquant) if quantized else encode_float(item, float_type)
    err, finite = readback_error(item, type_name, data)
    if not finite:
        raise GGUFExportError(f"{hf_name}: {type_name} encoding gives NaN or infinity (values out of float16 "
                              "range?); use float_type='F32'", param="float_type")
    return TensorRecord(gguf_name(hf_name, cfg.family), hf_name, type_name, err == 0.0, quantized, err), data


def readback_error(item: QuantWeight | np.ndarray, type_name: str, data: np.ndarray) -> tuple[float, bool]:
    """How far the encoded tensor, read as llama.cpp reads it, is from item (in steps for a quantized layer,
    else relative to max |item|), and whether it is finite; a slice of rows at a time (row_slices)."""
    quantized = isinstance(item, QuantWeight)
    err, top, finite = 0.0, 0.0, True
    for rows in row_slices(item.shape):
        part = layer_rows(item, rows) if quantized else item[rows]
        got = dequantize(type_name, data[rows], part.shape)
        finite = finite and bool(np.all(np.isfinite(got)))
        if quantized:
            err = max(err, part.step_error(got))
        elif part.size:
            err, top = max(err, float(np.max(np.abs(got - part)))), max(top, float(np.max(np.abs(part))))
    return (err if quantized else err / (top or 1.0)), finite


def layer_rows(qw: QuantWeight, rows: slice) -> QuantWeight:
    """Some rows of a quantized layer (views)."""
    return replace(qw, q=qw.q[rows], scale=qw.scale[rows], zero=qw.zero[rows], bias=None,
                   offset=None if qw.offset is None else qw.offset[rows])


def rope_tensors(cfg: ModelConfig) -> list[tuple[TensorRecord, np.ndarray]]:
    """Rope scaling as llama.cpp reads it, float32: llama3's divisor of each pair's frequency
    (rope_freqs), longrope's long and short factors (rope_factors_long, rope_factors_short; llama.cpp
    takes the short ones while its context is at most rope.scaling.original_context_length)."""
    s = cfg.rope_scaling
    if s is not None and s.type == "llama3":
        tensors = {ROPE_FREQS: rope_divisors(cfg)}
    elif s is not None and s.type == "longrope":
        tensors = dict(zip(ROPE_FACTORS, (s.long_factor, s.short_factor)))
    else:
        return []
    return [(TensorRecord(name, "rope_scaling", "F32", True, False, 0.0), np.asarray(t, dtype=np.float32))
            for name, t in tensors.items()]


def file_type_of(records: list[TensorRecord], float_type: str) -> str:
    """The most common type of the quantized layers (general.file_type), else the float type."""
    counts: dict[str, int] = {}
    for r in records:
        if r.quantized:
            counts[r.type] = counts.get(r.type, 0) + 1
    if counts:
        return max(counts, key=counts.get)
    return "F32" if float_type == "F32" else "F16"


def add_hparams(w: GGUFWriter, cfg: ModelConfig, name: str, file_type: str) -> None:
    w.add_name(name)
    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.rotary_dim)  # head_dim unless partial rotary
    add_rope_scaling(w, cfg)
    if cfg.head_dim * cfg.n_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    add_attention_keys(w, cfg)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(GGUF_TYPES[file_type].file_type)
    w.add_quantization_version(GGML_QUANT_VERSION)


def add_rope_scaling(w: GGUFWriter, cfg: ModelConfig) -> None:
    """The rope scaling keys llama.cpp reads (llama3's divisors and longrope's factors are tensors,
    rope_tensors)."""
    s = cfg.rope_scaling
    if s is not None and s.type == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(s.factor)
    if s is not None and s.type == "yarn":  # check_rope made sure llama.cpp's other yarn settings hold
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(s.factor)
        w.add_rope_scaling_orig_ctx_len(s.original_max_positions)
        if not math.isclose(yarn_attn_factor(cfg), 1.0, rel_tol=1e-7):  # 1 unless the config sets the magnitude
            w.add_rope_scaling_attn_factors(yarn_attn_factor(cfg))
    if s is not None and s.type == "longrope":  # llama.cpp scales cos and sin by it
        w.add_rope_scaling_attn_factors(s.attention_factor)
        w.add_rope_scaling_orig_ctx_len(s.original_max_positions)


def add_attention_keys(w: GGUFWriter, cfg: ModelConfig) -> None:
    """The sliding windows and the local layers' RoPE base for an architecture that reads them, and the
    soft-cappings the config sets (check_graph made sure the architecture applies them)."""
    if cfg.family.gguf_windows:
        # one window for the local layers; a window the context fits in (or none) is written as the context
        w.add_sliding_window(next((x for x in cfg.windows if x is not None), cfg.max_positions))
        w.add_sliding_window_pattern([i in cfg.local_layers for i in range(cfg.n_layers)])
        w.add_rope_freq_base_swa(cfg.local_rope_theta if cfg.local_rope_theta is not None else cfg.rope_theta)
    if cfg.attn_softcap is not None:
        w.add_attn_logit_softcapping(cfg.attn_softcap)
    if cfg.final_softcap is not None:
        w.add_final_logit_softcapping(cfg.final_softcap)


def write_file(out, cfg: ModelConfig, name: str, report: GGUFExport, vocab: Vocab, spool: TensorSpool) -> None:
    """The GGUF file at out (atomically): metadata, then the tensors of report in its order, each copied
    from the spool in turn. The metadata ends with each tensor's digest, in that order (read.py checks
    them): in the file itself rather than beside it, since a GGUF file travels alone; then the digest of the
    metadata itself (METADATA_KEY), stamped in place once it is written."""
    with atomic_file(out) as tmp:
        w = GGUFWriter(str(tmp), cfg.family.gguf_arch)
        add_hparams(w, cfg, name, report.file_type)
        add_vocab(w, vocab)
        w.add_array(DIGESTS_KEY, [spool.entries[record.name].digest for record in report.tensors])
        w.add_string(METADATA_KEY, PLACEHOLDER)  # stamped once the metadata is written
        for record in report.tensors:
            t, entry = GGUF_TYPES[record.type], spool.entries[record.name]
            w.add_tensor_info(record.name, entry.shape, entry.dtype, entry.nbytes,
                              raw_dtype=t.ggml_type if t.quantized else None)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for record in report.tensors:
            w.write_tensor_data(spool.read(record.name))
        w.close()
        stamp_metadata_digest(tmp)


def export_gguf(ckpt: Checkpoint, out, *, asym4: str = "Q5_0", float_type: str = "F16", kquant: bool = False,
                tokenizer_pre_name: str | None = None, progress: bool = False) -> GGUFExport:
    """Write ckpt as one GGUF file at out (atomically); the report lists every tensor's type and error.

    asym4: Q5_0 or Q4_1 for 4-bit asymmetric layers; float_type: F16, F32 or Q8_0 for float matrices;
    kquant: integer-zero layers of at most 4 bits as Q4_K (not exact); tokenizer_pre_name: llama.cpp's
    pre-tokenizer name, needed when a byte-level tokenizer's vocabulary and split are not recognised.
    Memory: one tensor at a time (spool.py); the encoded tensors wait in a temporary file beside out."""
    asym4, float_type = check_options(asym4, float_type)
    hf = ckpt.hf_config
    cfg = ModelConfig.from_hf(hf)
    check_llama_cpp(cfg)
    vocab = read_vocab(Path(ckpt.path), hf, tokenizer_pre_name)
    check_linears(cfg.family, [*ckpt.qweights, *ckpt.tensors], GGUFExportError)
    check_names(ckpt, cfg)
    report = GGUFExport(path=Path(out))
    with TensorSpool(Path(out).parent) as spool:
        for record, tensor in encoded_tensors(ckpt, cfg, asym4, float_type, kquant, progress):
            report.tensors.append(record)
            spool.add(record.name, tensor)
            del tensor  # before the next one is encoded
        report.tensors.sort(key=lambda r: r.source)  # the file's order: by checkpoint name, as always
        for record, tensor in rope_tensors(cfg):
            report.tensors.append(record)
            spool.add(record.name, tensor)
        report.file_type = file_type_of(report.tensors, float_type)
        given = hf.get("_name_or_path")  # transformers' record of where the model came from; not a name if not text
        name = given if isinstance(given, str) and given else Path(ckpt.path).name
        write_file(out, cfg, file_name(name, vocab), report, vocab, spool)
    report.bytes = Path(out).stat().st_size
    return report
