"""The byte layouts of GGUF blocks (ggml-common.h), packed from integer codes and float16 scales: nothing
is rounded here. Every packer takes the stored codes (types.py: code range, zero, sub-block scales)
and refuses values out of their ranges.

Legacy blocks: 32 consecutive weights of one row and a float16 step `d` (and minimum `m`):

| type | bytes | layout (in file order)            | weight            |
| ---- | ----- | --------------------------------- | ----------------- |
| Q4_0 | 18    | d f16, qs[16]                     | (c - 8) * d       |
| Q4_1 | 20    | d f16, m f16, qs[16]              | c * d + m         |
| Q5_0 | 22    | d f16, qh u32, qs[16]             | (c - 16) * d      |
| Q5_1 | 24    | d f16, m f16, qh u32, qs[16]      | c * d + m         |
| Q8_0 | 34    | d f16, qs[32] int8                | c * d             |

qs: byte j holds the low 4 bits of element j (low nibble) and of element j + 16 (high nibble).
qh: little-endian uint32 whose bit j is bit 4 of element j.
"""

from __future__ import annotations

import numpy as np

from .types import GGUF_TYPES, QK, QK_K, GGUFType


def _check_codes(t: GGUFType, codes: np.ndarray) -> tuple[int, int]:
    """(rows, blocks per row) of codes [rows, K]; ValueError when K is not whole blocks of t or a code
    lies outside t's range."""
    rows, k = codes.shape
    if k % t.block:
        raise ValueError(f"{t.name} needs rows whose length is a multiple of {t.block}, got {k}")
    lo, hi = t.codes
    if codes.size and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"{t.name}: codes {int(codes.min())}..{int(codes.max())} outside {lo}..{hi}")
    return rows, k // t.block


def _check_sub_scales(t: GGUFType, rows: int, nb: int, ints: dict[str, np.ndarray], steps: dict[str, np.ndarray]
                      ) -> None:
    """A K-quant's sub-block integers (sc, and m) [rows, K/sub] within t's range, and its float16 steps
    (d, and dmin) [rows, K/256]; ValueError naming what does not fit."""
    subs = (rows, nb * (QK_K // t.sub_block))
    if any(x.shape != subs for x in ints.values()) or any(x.shape != (rows, nb) for x in steps.values()):
        raise ValueError(f"{t.name}: {' and '.join(ints)} must be {list(subs)} and {' and '.join(steps)} "
                         f"{[rows, nb]}, got " + ", ".join(str(x.shape) for x in [*ints.values(), *steps.values()]))
    lo, hi = t.sub_scales
    values = np.concatenate([x.ravel() for x in ints.values()])
    if values.size and (int(values.min()) < lo or int(values.max()) > hi):
        raise ValueError(f"{t.name}: sub-block {'scales' if len(ints) == 1 else 'scales or minima'} outside {lo}..{hi}")


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """[rows, nb] float16 values as [rows, nb, 2] little-endian bytes."""
    return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[rows, nb, 32] codes -> [rows, nb, 16] bytes: element j low, element j + 16 high."""
    low = codes[..., :16].astype(np.uint8) & 0x0F
    high = codes[..., 16:].astype(np.uint8) & 0x0F
    return low | (high << 4)


def _fifth_bits(codes: np.ndarray) -> np.ndarray:
    """[rows, nb, 32] codes -> [rows, nb, 4] bytes of the uint32 whose bit j is bit 4 of element j."""
    bits = ((codes.astype(np.uint32) >> 4) & 1) << np.arange(QK, dtype=np.uint32)
    return np.ascontiguousarray(bits.sum(-1, dtype=np.uint32).astype("<u4")).view(np.uint8).reshape(*codes.shape[:-1], 4)


def pack_blocks(type_name: str, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Pack codes [rows, K] with per-block d (and m) [rows, K/32] into uint8 [rows, K/32 * nbytes].

    The codes must already lie in the type's code range and d, m must hold float16 values: this is a
    byte layout, nothing is rounded here.
    """
    t = GGUF_TYPES[type_name]
    rows, nb = _check_codes(t, codes)
    if d.shape != (rows, nb) or (t.float_min and (m is None or m.shape != (rows, nb))):
        raise ValueError(f"{type_name}: d/m must be [{rows}, {nb}], got {d.shape} / {None if m is None else m.shape}")
    c = codes.reshape(rows, nb, QK)
    parts = [_f16_bytes(d)]
    if t.float_min:
        parts.append(_f16_bytes(m))
    if type_name == "Q8_0":
        parts.append(c.astype(np.int8).view(np.uint8))
    else:
        if type_name in ("Q5_0", "Q5_1"):
            parts.append(_fifth_bits(c))
        parts.append(_nibbles(c))
    out = np.concatenate(parts, axis=-1)
    assert out.shape[-1] == t.nbytes
    return out.reshape(rows, nb * t.nbytes)


# ---------------------------------------------------------------------------------------------
# Asymmetric K-quants: super-blocks of 256 weights, a float16 d and dmin per super-block and
# unsigned integer sub-block scales sc[j] and minima m[j]; weight = d * sc[j] * code - dmin * m[j].
#
# | type | bytes | sub-block | code  | sc, m |
# | ---- | ----- | --------- | ----- | ----- |
# | Q2_K | 84    | 16        | 0..3  | 0..15 |
# | Q4_K | 144   | 32        | 0..15 | 0..63 |
# | Q5_K | 176   | 32        | 0..31 | 0..63 |
#
# Q4_K, 8 sub-blocks of 32:
#
# | bytes | field      | meaning                                                                |
# | ----- | ---------- | ---------------------------------------------------------------------- |
# | 2     | d f16      | step of the sub-block scales                                           |
# | 2     | dmin f16   | step of the sub-block minima                                           |
# | 12    | scales     | sc[8], m[8], 6 bits each (packing below)                               |
# | 128   | qs         | pair p of sub-blocks: byte l = code[2p][l] | code[2p+1][l] << 4         |
#
# Q5_K, 8 sub-blocks of 32 (Q4_K with the codes' bit 4 in qh, before qs):
#
# | bytes | field      | meaning                                                                |
# | ----- | ---------- | ---------------------------------------------------------------------- |
# | 2     | d f16      | as Q4_K                                                                |
# | 2     | dmin f16   | as Q4_K                                                                |
# | 12    | scales     | as Q4_K                                                                |
# | 32    | qh         | byte l, bit j = bit 4 of code[j][l]                                    |
# | 128   | qs         | bits 0-3 of the codes, as Q4_K                                         |
#
# Q2_K, 16 sub-blocks of 16 (code[e] is element e of the super-block, e = 128 h + i):
#
# | bytes | field      | meaning                                                                |
# | ----- | ---------- | ---------------------------------------------------------------------- |
# | 16    | scales     | byte j = sc[j] | m[j] << 4                                             |
# | 64    | qs         | code[128 h + i] at bits 2 * (i // 32) and up of byte 32 h + i % 32     |
# | 2     | d f16      | step of the sub-block scales                                           |
# | 2     | dmin f16   | step of the sub-block minima                                           |
#
# Q4_K and Q5_K scales bytes, i in 0..3:
#   byte i     = sc[i] | (sc[i+4] >> 4) << 6        byte 4 + i = m[i] | (m[i+4] >> 4) << 6
#   byte 8 + i = (sc[i+4] & 15) | (m[i+4] & 15) << 4

def _crumbs(u: np.ndarray) -> np.ndarray:
    """[..., 256] 2-bit values -> [..., 64] bytes: element 128 h + i at bits 2 * (i // 32) of byte 32 h + i % 32."""
    q = (u.astype(np.uint8) & 3).reshape(*u.shape[:-1], 2, 4, 32)
    return (q[..., 0, :] | (q[..., 1, :] << 2) | (q[..., 2, :] << 4) | (q[..., 3, :] << 6)).reshape(*u.shape[:-1], 64)


def _bit_planes(b: np.ndarray) -> np.ndarray:
    """[..., 256] bits -> [..., 32] bytes: element e at bit e // 32 of byte e % 32."""
    planes = (b.astype(np.uint8) & 1).reshape(*b.shape[:-1], 8, 32) << np.arange(8, dtype=np.uint8)[:, None]
    return planes.sum(-2, dtype=np.uint8)  # distinct bits: the sum is their OR


def _k_nibbles(c: np.ndarray) -> np.ndarray:
    """[..., 256] codes -> [..., 128] bytes: byte 32 p + l = code[64 p + l] | code[64 p + 32 + l] << 4 (low 4 bits)."""
    q = (c.astype(np.uint8) & 15).reshape(*c.shape[:-1], 4, 2, 32)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(*c.shape[:-1], 128)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """[..., 8] sc and m in 0..63 -> [..., 12] bytes (Q4_K and Q5_K packing, table above)."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    return np.concatenate([
        (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
        (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
        (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
    ], axis=-1)


def _check_asym_k(type_name: str, codes: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray,
                  dmin: np.ndarray) -> tuple[GGUFType, int, int]:
    t = GGUF_TYPES[type_name]
    rows, nb = _check_codes(t, codes)
    _check_sub_scales(t, rows, nb, {"sc": sc, "m": m}, {"d": d, "dmin": dmin})
    return t, rows, nb


def pack_q4_k(codes: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """codes [rows, K] in 0..15, sc and m [rows, K/32] in 0..63, d and dmin [rows, K/256] float16 values
    -> uint8 [rows, K/256 * 144]."""
    t, rows, nb = _check_asym_k("Q4_K", codes, sc, m, d, dmin)
    c = codes.reshape(rows, nb, QK_K)
    scales = _k_scales(sc.reshape(rows, nb, 8), m.reshape(rows, nb, 8))
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, _k_nibbles(c)], axis=-1)
    return out.reshape(rows, nb * t.nbytes)


def pack_q5_k(codes: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """codes [rows, K] in 0..31, sc and m [rows, K/32] in 0..63, d and dmin [rows, K/256] float16 values
    -> uint8 [rows, K/256 * 176]."""
    t, rows, nb = _check_asym_k("Q5_K", codes, sc, m, d, dmin)
    c = codes.reshape(rows, nb, QK_K)
    scales = _k_scales(sc.reshape(rows, nb, 8), m.reshape(rows, nb, 8))
    out = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), scales, _bit_planes(c >> 4), _k_nibbles(c)], axis=-1)
    return out.reshape(rows, nb * t.nbytes)


def pack_q2_k(codes: np.ndarray, sc: np.ndarray, m: np.ndarray, d: np.ndarray, dmin: np.ndarray) -> np.ndarray:
    """codes [rows, K] in 0..3, sc and m [rows, K/16] in 0..15, d and dmin [rows, K/256] float16 values
    -> uint8 [rows, K/256 * 84]."""
    t, rows, nb = _check_asym_k("Q2_K", codes, sc, m, d, dmin)
    scales = sc.reshape(rows, nb, 16).astype(np.uint8) | (m.reshape(rows, nb, 16).astype(np.uint8) << 4)
    out = np.concatenate([scales, _crumbs(codes.reshape(rows, nb, QK_K)), _f16_bytes(d), _f16_bytes(dmin)], axis=-1)
    return out.reshape(rows, nb * t.nbytes)


# ---------------------------------------------------------------------------------------------
# Symmetric K-quants: super-blocks of 256 weights = 16 sub-blocks of 16, one float16 step d per
# super-block and a signed integer sub-scale sc[j] per sub-block; weight = d * sc[j] * (u - zero).
#
# | type | bytes | layout (file order)                    | u     | zero | sc stored as        |
# | ---- | ----- | -------------------------------------- | ----- | ---- | ------------------- |
# | Q3_K | 110   | hmask[32], qs[64], scales[12], d f16   | 0..7  | 4    | sc + 32, 6 bits     |
# | Q6_K | 210   | ql[128], qh[64], scales[16] i8, d f16  | 0..63 | 32   | sc, int8            |
#
# Element e of a super-block, in halves h of 128 (e = 128 h + i):
#   Q6_K  low 4 bits of u in ql[64 h + i % 64], nibble i // 64;
#         high 2 bits in qh[32 h + i % 32], bits 2 * (i // 32) and up.
#   Q3_K  low 2 bits of u in qs[32 h + i % 32], bits 2 * (i // 32) and up;
#         bit 2 in hmask[e % 32], bit e // 32.
#   Q3_K scales: byte i < 8 = (s[i] & 15) | (s[i + 8] & 15) << 4; byte 8 + i (i < 4) holds bits 4-5
#                of s[i], s[i + 4], s[i + 8], s[i + 12] at bits 0, 2, 4, 6.

def _check_sym_k(type_name: str, codes: np.ndarray, sc: np.ndarray, d: np.ndarray) -> tuple[GGUFType, int, int]:
    t = GGUF_TYPES[type_name]
    rows, nb = _check_codes(t, codes)
    _check_sub_scales(t, rows, nb, {"sc": sc}, {"d": d})
    return t, rows, nb


def pack_q6_k(codes: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes [rows, K] in 0..63, sc [rows, K/16] in -128..127, d [rows, K/256] float16 values
    -> uint8 [rows, K/256 * 210]."""
    t, rows, nb = _check_sym_k("Q6_K", codes, sc, d)
    u = codes.astype(np.uint8).reshape(rows, nb, 2, 128)  # halves
    low, high = u & 15, u >> 4
    ql = (low[..., :64] | (low[..., 64:] << 4)).reshape(rows, nb, 128)
    qh = _crumbs(high.reshape(rows, nb, QK_K))
    scales = sc.reshape(rows, nb, 16).astype(np.int8).view(np.uint8)
    out = np.concatenate([ql, qh, scales, _f16_bytes(d)], axis=-1)
    return out.reshape(rows, nb * t.nbytes)


def pack_q3_k(codes: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes [rows, K] in 0..7, sc [rows, K/16] in -32..31, d [rows, K/256] float16 values
    -> uint8 [rows, K/256 * 110]."""
    t, rows, nb = _check_sym_k("Q3_K", codes, sc, d)
    u = codes.astype(np.uint8).reshape(rows, nb, QK_K)
    hmask, qs = _bit_planes(u >> 2), _crumbs(u)
    s = (sc.reshape(rows, nb, 16) + 32).astype(np.uint8)
    lo = (s[..., :8] & 15) | ((s[..., 8:] & 15) << 4)
    hi = (s >> 4).reshape(rows, nb, 4, 4)  # [.., group of 4 sub-blocks t, i]: bits 4-5 of s[4 t + i]
    hi = hi[..., 0, :] | (hi[..., 1, :] << 2) | (hi[..., 2, :] << 4) | (hi[..., 3, :] << 6)
    out = np.concatenate([hmask, qs, lo, hi, _f16_bytes(d)], axis=-1)
    return out.reshape(rows, nb * t.nbytes)


# the packer of each K-quant: pack(codes, sc, d) without float minima, pack(codes, sc, m, d, dmin) with
PACK_K = {"Q2_K": pack_q2_k, "Q3_K": pack_q3_k, "Q4_K": pack_q4_k, "Q5_K": pack_q5_k, "Q6_K": pack_q6_k}
