"""A checkpoint's layers and float tensors as GGUF blocks: the type that holds each, and its bytes.

Each quantized linear goes to the smallest legacy block type that holds its integers exactly
(blocks.py has the layouts). With c = q - zero, per 32-weight block of a group:

| checkpoint layer          | GGUF type | code stored | exact                                    |
| ------------------------- | --------- | ----------- | ---------------------------------------- |
| 2-, 3-bit; 4-bit symmetric | Q4_0     | c + 8       | yes                                      |
| 4-bit asymmetric; 5-bit symmetric | Q5_0 | c + 16   | yes                                      |
| 4-bit asymmetric, asym4="Q4_1" | Q4_1 | q (m = -d * zero in float16) | no: m is rounded, error reported |
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

With kquant, integer-zero layers of at most 4 bits whose rows are a multiple of 256 long go to Q4_K
instead (encode_q4_k; not exact: the scales become 6-bit sub-block multiples, error reported); the
rest keep the exact types above, where llama.cpp's own quantizer would fall back to Q5_0.

Layers on a non-uniform grid (`tune --gguf iq4_nl`) go to the block type whose codes index the same
levels (IQ4_NL: code q, d = scale), exactly, where rows and groups are multiples of 32; never to an
integer type.

"Anything else" is a group size that is not a multiple of 32, a row length that is not, or 8-bit
asymmetric codes out of int8 range. Float matrices (the embedding, a float lm_head) are written as
float_type (F16 by default, or Q8_0 rounded to nearest), norms as F32.
"""

from __future__ import annotations

import numpy as np

from ...checkpoint.qweight import UNIFORM, QuantWeight
from .blocks import PACK_K, pack_blocks, pack_q4_k
from .types import GGUF_TYPES, QK, QK_K, GGUFType, grid_type, k_quant, legacy_types

ROW_SLICE = 1 << 22  # weights worked on at once in row_slices
Encoded = tuple[str, np.ndarray]  # (GGUF type name, packed rows uint8 [N, bytes], or float data)


def holds_exactly(type_name: str, qw: QuantWeight) -> bool:
    """Whether a GGUF type holds this layer's integers exactly: the types without float minima hold
    integer zero points, those with them float offsets (so Q4_K holds float offsets only), and a
    non-uniform grid's type that grid's codes only."""
    t = GGUF_TYPES.get(type_name)
    return t is not None and t.quantized and t.float_min == (qw.offset is not None) and t.grid == qw.grid


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def block_groups(k: int, block: int, group_size: int) -> np.ndarray:
    """The checkpoint group of every block of `block` weights along a row of k (block divides the group)."""
    return (np.arange(k // block) * block) // group_size


def code_range(bits: int, sym: bool) -> tuple[int, int]:
    """The range of c = q - zero that a (bits, sym) scheme can produce."""
    if sym:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return -(2**bits - 1), 2**bits - 1


def container_for(bits: int, sym: bool) -> GGUFType:
    """The smallest legacy type holding every c of the scheme (8-bit asymmetric: Q8_0, checked per tensor)."""
    lo, hi = code_range(bits, sym)
    containers = legacy_types(float_min=False)
    return next((t for t in containers if t.c_range[0] <= lo and hi <= t.c_range[1]), containers[-1])


def encode_quantized(qw: QuantWeight, asym4: str = "Q5_0") -> Encoded | None:
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
    t = container_for(qw.bits, qw.sym)
    lo, hi = t.c_range
    if c.min() < lo or c.max() > hi:
        return None  # 8-bit asymmetric codes out of int8 range
    return t.name, pack_blocks(t.name, c + t.zero, d)


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


def _on_grid(t: GGUFType, values: np.ndarray, k: int, group_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-group scales or offsets [rows, groups] of a row of k as the K-quant t stores them: float16
    steps [rows, k/256] times sub-block integers [rows, k/sub] in t's range; None where that fails."""
    n = values.shape[0]
    sub = block_groups(k, t.sub_block, group_size)
    steps = sub_scale_steps(values[:, sub].reshape(n, k // QK_K, QK_K // t.sub_block), *t.sub_scales)
    return None if steps is None else (steps[0], steps[1].reshape(n, -1))


def encode_sym_k(qw: QuantWeight) -> Encoded | None:
    """qw as Q3_K (3-bit) or Q6_K (6-bit), exactly, or None: it needs symmetric weights, rows a multiple
    of 256, groups a multiple of 16, and scales that are, per super-block, one float16 step times
    small integers (what `tune --gguf q3_k|q6_k` produces)."""
    n, k = qw.shape
    t = k_quant(qw.bits, float_min=False)
    if t is None or not qw.sym or k % QK_K or qw.group_size % t.sub_block:
        return None
    steps = _on_grid(t, qw.scale, k, qw.group_size)
    if steps is None:
        return None
    d, sc = steps
    return t.name, PACK_K[t.name](qw.q, sc, d)  # symmetric: the codes are q, zero 2**(bits-1) = t.zero


def encode_offsets(qw: QuantWeight) -> Encoded | None:
    """A layer with float offsets (W = q * scale - offset) as Q2_K, Q4_K or Q5_K, exactly, where its rows
    are a multiple of 256 and its scales and offsets lie on the K-quant's sub-block grid (what `tune
    --gguf q4_k` produces); else as Q4_1 or Q5_1, exact for groups a multiple of 32; else None."""
    n, k = qw.shape
    if qw.offset is None:
        return None
    t = k_quant(qw.bits, float_min=True)
    if t is not None and k % QK_K == 0 and qw.group_size % t.sub_block == 0:
        steps, mins = _on_grid(t, qw.scale, k, qw.group_size), _on_grid(t, qw.offset, k, qw.group_size)
        if steps is not None and mins is not None:
            (d, sc), (dmin, m) = steps, mins
            return t.name, PACK_K[t.name](qw.q, sc, m, d, dmin)
    t = next((t for t in legacy_types(float_min=True) if t.bits == qw.bits), None)
    if t is not None and k % QK == 0 and qw.group_size % QK == 0:
        group = block_groups(k, QK, qw.group_size)
        return t.name, pack_blocks(t.name, qw.q, qw.scale[:, group], -qw.offset[:, group])
    return None


def encode_q4_k(qw: QuantWeight) -> Encoded | None:
    """qw as Q4_K, or None where it does not fit (rows not a multiple of 256, groups not a multiple of
    32, more than 4 bits). Not exact: each sub-block's step and offset become 6-bit multiples of the
    super-block's float16 steps. The codes are the checkpoint's integers, mirrored (maxq - q) in
    sub-blocks whose scale is negative, since Q4_K's steps are positive:
    s * (q - z) = |s| * ((maxq - q) - (maxq - z))."""
    t = GGUF_TYPES["Q4_K"]
    n, k = qw.shape
    if k % QK_K or qw.group_size % t.sub_block or qw.bits > t.bits:
        return None
    nsub, per_super, maxq, top = k // t.sub_block, QK_K // t.sub_block, 2**qw.bits - 1, t.sub_scales[1]
    group = block_groups(k, t.sub_block, qw.group_size)
    s, z = qw.scale[:, group], qw.zero[:, group].astype(np.float32)
    flip = s < 0
    codes = qw.q.reshape(n, nsub, t.sub_block)
    codes = np.where(flip[..., None], maxq - codes, codes).reshape(n, k)
    step = np.abs(s).reshape(n, nsub // per_super, per_super)
    # weight = step * code - offset
    offset = (np.abs(s) * np.where(flip, maxq - z, z)).reshape(n, nsub // per_super, per_super)
    d, dmin = _f16(step.max(-1) / top), _f16(offset.max(-1) / top)
    sc = np.round(step / np.where(d == 0, 1, d)[..., None]).clip(1, top)  # a nonzero step never rounds to nothing
    m = np.round(offset / np.where(dmin == 0, 1, dmin)[..., None]).clip(0, top)
    return t.name, pack_q4_k(codes, sc.reshape(n, nsub), m.reshape(n, nsub), d, dmin)


def encode_grid(qw: QuantWeight) -> Encoded | None:
    """A layer on a non-uniform grid as the block type indexing the same levels (its codes and scales as
    they are), or None where rows or groups are not whole blocks of it."""
    t = grid_type(qw.grid)
    n, k = qw.shape
    if t is None or qw.bits != t.bits or k % t.block or qw.group_size % t.block:
        return None
    return t.name, pack_blocks(t.name, qw.q, qw.scale[:, block_groups(k, t.block, qw.group_size)])


def encode_layer(qw: QuantWeight, asym4: str = "Q5_0", kquant: bool = False) -> Encoded:
    """(type, data) of a quantized layer: the first of the encoders above that holds it, else float16."""
    if qw.grid != UNIFORM:
        enc = encode_grid(qw)
    elif qw.offset is not None:
        enc = encode_offsets(qw)
    else:
        enc = encode_sym_k(qw) or (encode_q4_k(qw) if kquant else None) or encode_quantized(qw, asym4)
    return enc or ("F16", qw.dequantize().astype(np.float16))


def encode_float(w: np.ndarray, float_type: str) -> Encoded:
    """(type, data) of a float tensor: 1-D always F32; matrices as float_type (F16, F32 or Q8_0)."""
    if w.ndim == 1 or float_type == "F32":
        return "F32", np.ascontiguousarray(w, dtype=np.float32)
    if float_type == "F16" or w.shape[1] % QK:
        with np.errstate(over="ignore"):  # values past float16 become inf, which export_gguf refuses by name
            return "F16", np.ascontiguousarray(w, dtype=np.float16)
    n, k = w.shape
    data = np.empty((n, k // QK * GGUF_TYPES["Q8_0"].nbytes), dtype=np.uint8)
    for rows in row_slices(w.shape):  # blocks lie within rows: a slice at a time, byte for byte the same
        data[rows] = _q8_0(w[rows])
    return "Q8_0", data


def _q8_0(w: np.ndarray) -> np.ndarray:
    """Q8_0 blocks of a float matrix, rounded to nearest."""
    lo, hi = GGUF_TYPES["Q8_0"].codes
    n, k = w.shape
    blocks = w.reshape(n, k // QK, QK)
    d = _f16(np.abs(blocks).max(-1) / hi)
    codes = np.round(blocks / np.where(d == 0, 1, d)[..., None]).clip(lo, hi)
    return pack_blocks("Q8_0", codes.reshape(n, k).astype(np.int16), d)


def row_slices(shape: tuple[int, ...]) -> list[slice]:
    """Slices of about ROW_SLICE weights along a tensor's rows (one for a 1-D tensor): work on a large
    embedding a slice at a time makes temporaries of a slice's size, not several times the matrix's."""
    if len(shape) < 2:
        return [slice(None)]
    step = max(1, ROW_SLICE // max(1, int(np.prod(shape[1:]))))
    return [slice(i, i + step) for i in range(0, shape[0], step)]
