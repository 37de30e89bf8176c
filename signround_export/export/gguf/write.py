"""GGUF export for llama.cpp: the checkpoint's integers repacked into GGUF blocks, and read back.

Each quantized linear goes to the smallest legacy block type that holds its integers exactly
(blocks.py has the layouts). With c = q - zero, per 32-weight block of a group:

| checkpoint layer          | GGUF type | code stored | exact                                    |
| ------------------------- | --------- | ----------- | ---------------------------------------- |
| 2-, 3-bit; 4-bit symmetric | Q4_0     | c + 8       | yes                                      |
| 4-bit asymmetric; 5-bit symmetric | Q5_0 | c + 16   | yes                                      |
| 4-bit asymmetric, --asym4 q4_1 | Q4_1 | q (m = -d * zero in float16) | no: m is rounded, error reported |
| 5-bit asymmetric, 6-bit; 8-bit with -128 <= c <= 127 | Q8_0 | c | yes                       |
| anything else             | F16       | W           | no: float16 rounding, error reported     |

Symmetric 3- and 6-bit layers go to Q3_K and Q6_K instead where those hold them exactly: rows a
multiple of 256, and in every 256-weight super-block, scales that are one float16 step times small
signed integers (6-bit for Q3_K, 8-bit for Q6_K). `tune --gguf q3_k|q6_k` puts them on that grid;
`encode_sym_k` finds the step again from the stored scales.

Layers with float offsets (W = q * scale - offset) tuned on an asymmetric K-quant grid (`tune --gguf
q4_k|q5_k|q2_k`) go to Q4_K, Q5_K or Q2_K exactly (`encode_offsets`: d, sc and dmin, m found again
from the stored scales and offsets); other 4- and 5-bit ones (`tune --gguf q4_1|q5_1`, or rows not a
multiple of 256) to Q4_1 and Q5_1, exact too: those store a float16 step and minimum per 32 weights.

With --type q4_k, integer-zero layers of at most 4 bits whose rows are a multiple of 256 long go to Q4_K instead
(encode_q4_k; not exact: the scales become 6-bit sub-block multiples, error reported); the rest keep
the exact types above, where llama.cpp's own quantizer would fall back to Q5_0.

"Anything else" is a group size that is not a multiple of 32, a row length that is not, or 8-bit
asymmetric codes out of int8 range. Float matrices (the embedding, a float lm_head) are written as
--float-type (F16 by default, or Q8_0 rounded to nearest), norms as F32.

llama.cpp's "llama" architecture rotates q and k in interleaved pairs, HF's in halves: the rows of
q_proj and k_proj are permuted per head (`_rope_permute`), which reorders rows only, so it applies
exactly to the integers, scales and zero points.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...checkpoint.format import Checkpoint
from ...checkpoint.qweight import QuantWeight
from ...errors import GGUFExportError
from ...fileio import atomic_file
from ...model.config import ModelConfig
from .blocks import (
    ASYM_K_TYPES,
    BLOCK_TYPES,
    K_SUB,
    QK,
    QK_K,
    SYM_K_TYPES,
    pack_blocks,
    pack_q2_k,
    pack_q3_k,
    pack_q4_k,
    pack_q5_k,
    pack_q6_k,
)

# HF model type -> (llama.cpp architecture, whether q/k rows need the RoPE permutation)
ARCHS = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

# HF tensor name (with {i} for the block) -> GGUF tensor name
TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed by every runtime

# The pre-tokenizer names llama.cpp knows, by the sha256 of the vocabulary (tokens by id, joined by
# newlines). Families that share a vocabulary share the pre-tokenizer.
KNOWN_VOCABS = {
    "d1f2ce856b324081b621d9e2e8dbd22879f462329f3fd4aa39fa758dddb2ce55": "smollm",  # SmolLM, SmolLM2
}

# most common block type of the file -> general.file_type (llama.cpp's LLAMA_FTYPE_*)
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 11,
              "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}

# the types that carry a checkpoint's integers and float16 scales without rounding (see the table above):
# for integer zero points, and for float offsets
EXACT_TYPES = ("Q4_0", "Q5_0", "Q8_0", "Q3_K", "Q6_K")
OFFSET_EXACT_TYPES = ("Q2_K", "Q4_K", "Q5_K", "Q4_1", "Q5_1")


def holds_exactly(type_name: str, qw: QuantWeight) -> bool:
    """Whether a GGUF type holds this layer's integers exactly (Q4_K does for float offsets only)."""
    return type_name in (OFFSET_EXACT_TYPES if qw.offset is not None else EXACT_TYPES)

TOKEN_NORMAL, TOKEN_UNUSED, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 5, 3, 4


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


# ---------------------------------------------------------------------------------------------
# tensors


def _rope_permute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder rows (axis 0) from HF's half-split rotary layout to llama.cpp's interleaved one."""
    r = rows.shape[0]
    return rows.reshape(n_heads, 2, r // n_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _rope_unpermute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    r = rows.shape[0]
    return rows.reshape(n_heads, r // n_heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def block_groups(k: int, block: int, group_size: int) -> np.ndarray:
    """The checkpoint group of every block of `block` weights along a row of k (block divides the group)."""
    return (np.arange(k // block) * block) // group_size


CONTAINERS = ("Q4_0", "Q5_0", "Q8_0")  # the exact legacy types for c = q - zero, smallest first


def _c_range(type_name: str) -> tuple[int, int]:
    t = BLOCK_TYPES[type_name]
    return t.code_min - t.offset, t.code_max - t.offset


def code_range(bits: int, sym: bool) -> tuple[int, int]:
    """The range of c = q - zero that a (bits, sym) scheme can produce."""
    if sym:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return -(2**bits - 1), 2**bits - 1


def container_for(bits: int, sym: bool) -> str:
    """The smallest legacy type holding every code of the scheme (8-bit asymmetric: Q8_0, checked per tensor)."""
    lo, hi = code_range(bits, sym)
    return next((t for t in CONTAINERS if _c_range(t)[0] <= lo and hi <= _c_range(t)[1]), "Q8_0")


def encode_quantized(qw: QuantWeight, asym4: str = "Q5_0") -> tuple[str, np.ndarray] | None:
    """(type, packed rows) holding qw in a legacy block type, or None when no such type fits."""
    n, k = qw.shape
    if k % QK or qw.group_size % QK:
        return None
    nb = k // QK
    group = block_groups(k, QK, qw.group_size)
    d = qw.scale[:, group]
    zero = qw.zero[:, group].astype(np.int16)
    c = (qw.q.reshape(n, nb, QK).astype(np.int16) - zero[..., None]).reshape(n, k)  # q - zero, per block
    if qw.bits == 4 and not qw.sym and asym4 == "Q4_1":
        return "Q4_1", pack_blocks("Q4_1", qw.q, d, _f16(-d * zero))
    type_name = container_for(qw.bits, qw.sym)
    lo, hi = _c_range(type_name)
    if c.min() < lo or c.max() > hi:
        return None  # 8-bit asymmetric codes out of int8 range
    return type_name, pack_blocks(type_name, c + BLOCK_TYPES[type_name].offset, d)


def sub_scale_steps(s: np.ndarray, smin: int, smax: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Sub-block scales s [rows, nb, 16] as float16 steps d [rows, nb] times integers sc in smin..smax,
    exactly in float32 (d * sc == s), or None when some super-block has no such decomposition.

    A checkpoint stores only the products; this finds a d for each super-block, trying the largest
    integer for the largest |s| first (every valid d gives the same weights)."""
    s64 = s.astype(np.float64)
    top = np.abs(s64).max(-1)
    d = np.zeros(top.shape)
    found = top == 0  # all-zero super-blocks cannot happen (scales are nonzero), but keep d = 0 there
    for m in range(max(-smin, smax), 0, -1):
        cand = top / m
        sc = np.round(s64 / np.where(cand == 0, 1, cand)[..., None])
        ok = ((_f16(cand) == cand) & np.all((sc >= smin) & (sc <= smax), -1)
              & np.all((cand.astype(np.float32)[..., None] * sc.astype(np.float32)) == s, -1))
        new = ok & ~found
        d[new] = cand[new]
        found |= ok
        if found.all():
            break
    if not found.all():
        return None
    sc = np.round(s64 / np.where(d == 0, 1, d)[..., None])
    return d.astype(np.float32), sc.astype(np.int16)


SYM_K_BITS = {3: "Q3_K", 6: "Q6_K"}  # symmetric widths with a K-quant of their own


def encode_sym_k(qw: QuantWeight) -> tuple[str, np.ndarray] | None:
    """qw as Q3_K (3-bit) or Q6_K (6-bit), exactly, or None: it needs symmetric weights, rows a multiple
    of 256, groups a multiple of 16, and scales that are, per super-block, one float16 step times
    small integers (what `tune --gguf q3_k|q6_k` produces)."""
    n, k = qw.shape
    type_name = SYM_K_BITS.get(qw.bits)
    if type_name is None or not qw.sym or k % QK_K or qw.group_size % K_SUB:
        return None
    _, _, (smin, smax) = SYM_K_TYPES[type_name]
    sub = block_groups(k, K_SUB, qw.group_size)
    steps = sub_scale_steps(qw.scale[:, sub].reshape(n, k // QK_K, QK_K // K_SUB), smin, smax)
    if steps is None:
        return None
    d, sc = steps
    c = qw.q.astype(np.int16) - 2 ** (qw.bits - 1)
    pack = pack_q3_k if type_name == "Q3_K" else pack_q6_k
    return type_name, pack(c, sc.reshape(n, -1), d)


ASYM_K = {2: ("Q2_K", pack_q2_k), 4: ("Q4_K", pack_q4_k), 5: ("Q5_K", pack_q5_k)}  # layouts: ASYM_K_TYPES
OFFSET_BLOCKS = {4: "Q4_1", 5: "Q5_1"}  # float16 step and minimum per 32 weights


def encode_offsets(qw: QuantWeight) -> tuple[str, np.ndarray] | None:
    """A layer with float offsets (W = q * scale - offset) as Q2_K, Q4_K or Q5_K, exactly, where its rows
    are a multiple of 256 and its scales and offsets lie on the K-quant's sub-block grid (what `tune
    --gguf q4_k` produces); else as Q4_1 or Q5_1, exact for groups a multiple of 32; else None."""
    n, k = qw.shape
    if qw.offset is None:
        return None
    if qw.bits in ASYM_K and k % QK_K == 0:
        type_name, pack = ASYM_K[qw.bits]
        _, sub, _, limit = ASYM_K_TYPES[type_name]
        if qw.group_size % sub == 0:
            group = block_groups(k, sub, qw.group_size)
            per_super = (n, k // QK_K, QK_K // sub)
            steps = sub_scale_steps(qw.scale[:, group].reshape(per_super), 0, limit)
            mins = sub_scale_steps(qw.offset[:, group].reshape(per_super), 0, limit)
            if steps is not None and mins is not None:
                (d, sc), (dmin, m) = steps, mins
                return type_name, pack(qw.q, sc.reshape(n, -1), m.reshape(n, -1), d, dmin)
    if qw.bits in OFFSET_BLOCKS and k % QK == 0 and qw.group_size % QK == 0:
        group = block_groups(k, QK, qw.group_size)
        type_name = OFFSET_BLOCKS[qw.bits]
        return type_name, pack_blocks(type_name, qw.q, qw.scale[:, group], -qw.offset[:, group])
    return None


def encode_q4_k(qw: QuantWeight) -> tuple[str, np.ndarray] | None:
    """qw as Q4_K, or None where it does not fit (rows not a multiple of 256, groups not a multiple of
    32, more than 4 bits). Not exact: each sub-block's step and offset become 6-bit multiples of the
    super-block's float16 steps. The codes are the checkpoint's integers, mirrored (maxq - q) in
    sub-blocks whose scale is negative, since Q4_K's steps are positive:
    s * (q - z) = |s| * ((maxq - q) - (maxq - z))."""
    n, k = qw.shape
    if k % QK_K or qw.group_size % QK or qw.bits > 4:
        return None
    nsub, maxq = k // QK, 2**qw.bits - 1
    group = block_groups(k, QK, qw.group_size)
    s, z = qw.scale[:, group], qw.zero[:, group].astype(np.float32)
    flip = s < 0
    codes = qw.q.reshape(n, nsub, QK)
    codes = np.where(flip[..., None], maxq - codes, codes).reshape(n, k)
    step = np.abs(s).reshape(n, nsub // 8, 8)
    offset = (np.abs(s) * np.where(flip, maxq - z, z)).reshape(n, nsub // 8, 8)  # weight = step * code - offset
    d, dmin = _f16(step.max(-1) / 63), _f16(offset.max(-1) / 63)
    sc = np.round(step / np.where(d == 0, 1, d)[..., None]).clip(1, 63)  # a nonzero step never rounds to nothing
    m = np.round(offset / np.where(dmin == 0, 1, dmin)[..., None]).clip(0, 63)
    return "Q4_K", pack_q4_k(codes, sc.reshape(n, nsub), m.reshape(n, nsub), d, dmin)


def encode_float(w: np.ndarray, float_type: str) -> tuple[str, np.ndarray]:
    """(type, data) of a float tensor: 1-D always F32; matrices as float_type (F16, F32 or Q8_0)."""
    if w.ndim == 1 or float_type == "F32":
        return "F32", np.ascontiguousarray(w, dtype=np.float32)
    if float_type == "F16" or w.shape[1] % QK:
        with np.errstate(over="ignore"):  # values past float16 become inf, which export_gguf refuses by name
            return "F16", np.ascontiguousarray(w, dtype=np.float16)
    n, k = w.shape
    blocks = w.reshape(n, k // QK, QK)
    amax = np.abs(blocks).max(-1)
    d = _f16(amax / 127)
    codes = np.round(blocks / np.where(d == 0, 1, d)[..., None]).clip(-128, 127)
    return "Q8_0", pack_blocks("Q8_0", codes.reshape(n, k).astype(np.int16), d)


def dequantize(type_name: str, data: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 values of one tensor as llama.cpp reads them (gguf-py's reference dequantization)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    if type_name in ("F32", "F16"):
        return np.asarray(data, dtype=np.float32).reshape(shape)
    return gguf_dequantize(np.asarray(data).reshape(shape[0], -1), GGMLQuantizationType[type_name]).reshape(shape)


def _gguf_name(hf_name: str) -> str | None:
    parts = hf_name.split(".")
    key = hf_name
    if hf_name.startswith("model.layers.") and len(parts) > 3 and parts[2].isdigit():
        key = ".".join(parts[:2] + ["{i}"] + parts[3:])
        return TENSOR_NAMES[key].replace("{i}", parts[2]) if key in TENSOR_NAMES else None
    return TENSOR_NAMES.get(key)


# ---------------------------------------------------------------------------------------------
# tokenizer and metadata


def _vocab_tokens(tok: dict, vocab_size: int) -> tuple[list[str], list[int]]:
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(f"tokenizer.json has a {model.get('type')!r} model; the GGUF exporter writes "
                              "byte-level BPE (gpt2-style) tokenizers only")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    types = {i: TOKEN_NORMAL for i in by_id}
    for added in tok.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = TOKEN_CONTROL if added.get("special") else TOKEN_USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    return tokens, [types.get(i, TOKEN_UNUSED) for i in range(size)]


def _token_id(value, tokens: list[str]) -> int | None:
    if isinstance(value, dict):  # tokenizer_config's AddedToken form
        value = value.get("content")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value in tokens:
        return tokens.index(value)
    return None


def tokenizer_pre(tokens: list[str]) -> str | None:
    return KNOWN_VOCABS.get(hashlib.sha256("\n".join(tokens).encode()).hexdigest())


def _add_tokenizer(w, folder: Path, hf: dict, pre: str | None) -> None:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json; the GGUF file must carry the tokenizer "
                              "(copy the source model's tokenizer files into the checkpoint)")
    tok = json.loads(path.read_text())
    tcfg_path = folder / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.is_file() else {}
    tokens, types = _vocab_tokens(tok, hf["vocab_size"])
    pre = pre or tokenizer_pre(tokens)
    if pre is None:
        raise GGUFExportError("this vocabulary is not one whose llama.cpp pre-tokenizer is known here; pass "
                              "--tokenizer-pre NAME with the name llama.cpp uses for the model family "
                              "(for example llama-bpe, qwen2, smollm, gpt-2)")
    merges = tok["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    if not merges:
        raise GGUFExportError(f"{path} has no BPE merges; llama.cpp cannot load a BPE tokenizer without them")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    ids = {}
    for key in ("bos", "eos", "unk", "pad"):
        ids[key] = _token_id(tcfg.get(f"{key}_token"), tokens)
        if ids[key] is None:
            ids[key] = _token_id(hf.get(f"{key}_token_id"), tokens)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                     ("unk", w.add_unk_token_id), ("pad", w.add_pad_token_id)):
        if ids[key] is not None:
            add(ids[key])
    w.add_add_bos_token(bool(tcfg.get("add_bos_token", False)))
    template = tcfg.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    if template:
        w.add_chat_template(template)


def _add_hparams(w, cfg: ModelConfig, hf: dict, name: str, file_type: int) -> None:
    w.add_name(name)
    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_heads != cfg.hidden_size:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(2)


# ---------------------------------------------------------------------------------------------
# export


def export_gguf(ckpt: Checkpoint, out, *, asym4: str = "Q5_0", float_type: str = "F16", kquant: bool = False,
                tokenizer_pre_name: str | None = None, progress: bool = False) -> GGUFExport:
    """Write ckpt as one GGUF file at out (atomically); the report lists every tensor's type and error."""
    import gguf
    from tqdm import tqdm

    asym4, float_type = asym4.upper(), float_type.upper()
    if asym4 not in ("Q5_0", "Q4_1"):
        raise GGUFExportError(f"--asym4 {asym4}: choose q5_0 (exact) or q4_1 (smaller, near exact)")
    if float_type not in ("F16", "F32", "Q8_0"):
        raise GGUFExportError(f"--float-type {float_type}: choose f16, f32 or q8_0")
    hf = ckpt.hf_config
    cfg = ModelConfig.from_hf(hf)
    arch, permute = ARCHS[cfg.model_type]
    heads = {"self_attn.q_proj": cfg.n_heads, "self_attn.k_proj": cfg.n_kv_heads} if permute else {}

    def rope_heads(hf_name: str) -> int | None:
        return next((n for key, n in heads.items() if f".{key}." in hf_name + "."), None)

    # every tensor of the model, by HF name: a QuantWeight or a float array
    items: dict[str, QuantWeight | np.ndarray] = {}
    for module, qw in ckpt.qweights.items():
        items[module + ".weight"] = qw
        if qw.bias is not None:
            items[module + ".bias"] = np.asarray(qw.bias, dtype=np.float32)
    for tname, t in ckpt.tensors.items():
        if not tname.endswith(IGNORED_SUFFIXES):
            items[tname] = t
    unknown = [n for n in items if _gguf_name(n) is None]
    if unknown:
        raise GGUFExportError(f"tensors with no llama.cpp name: {', '.join(unknown[:5])}; this checkpoint "
                              f"does not look like a {cfg.model_type} model")

    report = GGUFExport(path=Path(out))
    records: list[tuple[str, str, np.ndarray, tuple]] = []  # (gguf name, type, data, logical shape)
    for hf_name in tqdm(sorted(items), desc="gguf", unit="tensor", disable=not progress):
        item, name, nh = items[hf_name], _gguf_name(hf_name), rope_heads(hf_name)
        if isinstance(item, QuantWeight):
            qw = item
            if nh:
                qw = QuantWeight(_rope_permute(qw.q, nh), _rope_permute(qw.scale, nh), _rope_permute(qw.zero, nh),
                                 qw.bits, qw.group_size, qw.sym,
                                 offset=None if qw.offset is None else _rope_permute(qw.offset, nh))
            want = qw.dequantize()
            if qw.offset is not None:
                enc = encode_offsets(qw)
            else:
                enc = encode_sym_k(qw) or (encode_q4_k(qw) if kquant else None) or encode_quantized(qw, asym4)
            type_name, data = enc if enc else ("F16", want.astype(np.float16))
            got = dequantize(type_name, data, want.shape)
            err = qw.step_error(got)
        else:
            want = np.asarray(item, dtype=np.float32)
            if nh:
                want = _rope_permute(want, nh)
            type_name, data = encode_float(want, float_type)
            got = dequantize(type_name, data, want.shape)
            scale = float(np.max(np.abs(want))) or 1.0
            err = float(np.max(np.abs(got - want))) / scale if want.size else 0.0
        if not np.all(np.isfinite(got)):
            raise GGUFExportError(f"{hf_name}: {type_name} encoding gives NaN or infinity (values out of float16 "
                                  "range?); use --float-type f32")
        report.tensors.append(TensorRecord(name, hf_name, type_name, err == 0.0, isinstance(item, QuantWeight), err))
        records.append((name, type_name, data, want.shape))

    block_counts: dict[str, int] = {}
    for r in report.tensors:
        if r.quantized:
            block_counts[r.type] = block_counts.get(r.type, 0) + 1
    report.file_type = max(block_counts, key=block_counts.get) if block_counts else \
        ("F32" if float_type == "F32" else "F16")

    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        _add_hparams(w, cfg, hf, hf.get("_name_or_path") or Path(ckpt.path).name, FILE_TYPES[report.file_type])
        _add_tokenizer(w, Path(ckpt.path), hf, tokenizer_pre_name)
        for name, type_name, data, shape in records:
            if type_name in ("F32", "F16"):
                w.add_tensor(name, data)
            else:
                w.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[type_name])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=False)
        w.close()
    report.bytes = Path(out).stat().st_size
    return report


# ---------------------------------------------------------------------------------------------
# reading back


def read_gguf_weights(path, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The float32 weights of a GGUF file under their HF names (q/k rows back in HF order), and each
    tensor's GGUF type. GGUFExportError when the file is unreadable or does not match cfg."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError, struct errors, memmap errors for broken files
        raise GGUFExportError(f"{path} is not a readable GGUF file ({str(e)[:200]}); it is truncated or corrupt") from None
    arch_field = reader.fields.get("general.architecture")
    arch = arch_field.contents() if arch_field is not None else None
    want_arch, permute = ARCHS[cfg.model_type]
    if arch != want_arch:
        raise GGUFExportError(f"{path} is a {arch!r} model, expected {want_arch!r}")
    for key, value in (("block_count", cfg.n_layers), ("embedding_length", cfg.hidden_size),
                       ("attention.head_count", cfg.n_heads), ("attention.head_count_kv", cfg.n_kv_heads)):
        f = reader.fields.get(f"{arch}.{key}")
        if f is None or int(f.contents()) != value:
            raise GGUFExportError(f"{path}: {arch}.{key} is {None if f is None else f.contents()}, the checkpoint "
                                  f"has {value}; the file belongs to another model")
    to_hf = {}
    for hf_pattern, g_pattern in TENSOR_NAMES.items():
        for i in (range(cfg.n_layers) if "{i}" in hf_pattern else [None]):
            to_hf[g_pattern.replace("{i}", str(i))] = hf_pattern.replace("{i}", str(i))
    weights, types = {}, {}
    for t in reader.tensors:
        if t.name not in to_hf:
            raise GGUFExportError(f"{path}: tensor {t.name} is not one of a {arch} model's")
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        w = dequantize(t.tensor_type.name, t.data, shape)
        hf_name = to_hf[t.name]
        if permute and ".q_proj." in hf_name:
            w = _rope_unpermute(w, cfg.n_heads)
        elif permute and ".k_proj." in hf_name:
            w = _rope_unpermute(w, cfg.n_kv_heads)
        weights[hf_name] = w
        types[hf_name] = t.tensor_type.name
    return weights, types
