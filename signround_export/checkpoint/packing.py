"""Packing small unsigned integers into int32 words, the two layouts quantized checkpoints use.

GPTQ layout (auto-round "auto_round" and "auto_round:auto_gptq"): a little-endian bit stream.
Along the packed axis, element i occupies bits [i*bits, (i+1)*bits) of the stream, and the stream is
cut into 32-bit words, word 0 first. Each block of 32 elements fills exactly `bits` words:

    bits | elements per word | block of 32 elements
    -----+-------------------+-------------------------------------------------------------
      2  | 16                | 2 words:  word w holds elements 16w .. 16w+15, element j at bit 2j
      4  |  8                | 4 words:  word w holds elements 8w .. 8w+7, element j at bit 4j
      8  |  4                | 8 words:  word w holds elements 4w .. 4w+3, element j at bit 8j
      3  | 10 2/3            | 3 words:  word 0 = e0..e9 at bits 0..29, low 2 bits of e10 at 30..31
         |                   |           word 1 = high bit of e10 at 0, e11..e20 at 1..30, low bit of e21 at 31
         |                   |           word 2 = high 2 bits of e21 at 0..1, e22..e31 at 2..31
      5  |  6 2/5            | 5 words, and 6 bits: 6 words; elements cross word boundaries as with 3

A length that does not fill whole words is padded with zero elements (ceil). Words are returned as
int32 (the dtype checkpoints store); the bits are the same as uint32.

AWQ layout (auto-round "auto_round:auto_awq", 4-bit only): 8 nibbles per word, but the word's
nibbles hold the 8 consecutive elements in an interleaved order:

    nibble (bits)      0 (0-3)  1 (4-7)  2 (8-11)  3 (12-15)  4 (16-19)  5 (20-23)  6 (24-27)  7 (28-31)
    element of the 8     0        2        4         6          1          3          5          7
"""

from __future__ import annotations

import numpy as np

from ..errors import CheckpointError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ_ORDER[j]: which of 8 consecutive elements sits in nibble j


def words_for(count: int, bits: int) -> int:
    """Number of 32-bit words that hold `count` values of `bits` bits (the last one zero-padded)."""
    return -(-count * bits // 32)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise CheckpointError(f"cannot pack {bits}-bit values (1 to 8 bits)")


def pack_bits(values: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """Pack unsigned `bits`-bit integers along `axis` into int32 words (GPTQ bit stream, see above)."""
    _check_bits(bits)
    v = np.moveaxis(np.asarray(values), axis, -1).astype(np.uint64)
    if v.size and int(v.max()) >= 1 << bits:
        raise CheckpointError(f"value {int(v.max())} does not fit in {bits} bits")
    count = v.shape[-1]
    blocks = -(-count // 32)
    pad = blocks * 32 - count
    v = np.concatenate([v, np.zeros(v.shape[:-1] + (pad,), np.uint64)], axis=-1)
    v = v.reshape(v.shape[:-1] + (blocks, 32))

    # A block of 32 values is exactly `bits` words; place each value at its bit offset in the block,
    # spilling its high part into the next word when it crosses a word boundary (3 bits only).
    words = np.zeros(v.shape[:-1] + (bits,), np.uint64)
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        words[..., word] |= (v[..., i] << np.uint64(offset)) & np.uint64(0xFFFFFFFF)
        if offset + bits > 32:
            words[..., word + 1] |= v[..., i] >> np.uint64(32 - offset)

    words = words.reshape(words.shape[:-2] + (blocks * bits,))[..., : words_for(count, bits)]
    return np.ascontiguousarray(np.moveaxis(words.astype(np.uint32).view(np.int32), -1, axis))


def unpack_bits(words: np.ndarray, bits: int, count: int, axis: int = 0) -> np.ndarray:
    """The first `count` values along `axis` of a GPTQ bit stream, as uint8 (a view with the values'
    axis moved back to `axis` of an array contiguous along it: the transpose of a [K, N] result is a
    contiguous [N, K])."""
    _check_bits(bits)
    w = np.moveaxis(np.asarray(words), axis, -1)
    if w.shape[-1] < words_for(count, bits):
        raise CheckpointError(f"{w.shape[-1]} words hold fewer than {count} values of {bits} bits")
    w = w.view(np.uint32) if w.dtype.itemsize == 4 else w.astype(np.int64).astype(np.uint32)
    mask = np.uint32((1 << bits) - 1)
    if 32 % bits == 0:  # 1, 2, 4, 8 bits: whole values per word, element j of a word at bit j * bits
        shifts = np.arange(32 // bits, dtype=np.uint32) * np.uint32(bits)
        v = ((w[..., None] >> shifts) & mask).astype(np.uint8)
        return np.moveaxis(v.reshape(w.shape[:-1] + (-1,))[..., :count], -1, axis)

    blocks = -(-w.shape[-1] // bits)  # values cross word boundaries: a block of 32 fills `bits` words
    pad = blocks * bits - w.shape[-1]
    w = np.concatenate([w, np.zeros(w.shape[:-1] + (pad,), np.uint32)], axis=-1)
    w = w.reshape(w.shape[:-1] + (blocks, bits))
    v = np.empty(w.shape[:-1] + (32,), np.uint8)
    for i in range(32):
        word, offset = divmod(i * bits, 32)
        x = w[..., word] >> np.uint32(offset)
        if offset + bits > 32:
            x = x | (w[..., word + 1] << np.uint32(32 - offset))
        v[..., i] = x & mask
    return np.moveaxis(v.reshape(v.shape[:-2] + (blocks * 32,))[..., :count], -1, axis)


def pack_awq(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values along the last axis into int32 words in AWQ's nibble order (length % 8 == 0)."""
    v = np.asarray(values).astype(np.uint32)
    if v.shape[-1] % 8:
        raise CheckpointError(f"AWQ packing needs a multiple of 8 values along the packed axis, got {v.shape[-1]}")
    if v.size and int(v.max()) > 15:
        raise CheckpointError(f"value {int(v.max())} does not fit in 4 bits")
    v = v.reshape(v.shape[:-1] + (-1, 8))
    words = np.zeros(v.shape[:-1], np.uint32)
    for nibble, element in enumerate(AWQ_ORDER):
        words |= v[..., element] << np.uint32(4 * nibble)
    return words.view(np.int32)


def unpack_awq(words: np.ndarray) -> np.ndarray:
    """4-bit values from int32 words in AWQ's nibble order, along the last axis (8 per word), as uint8."""
    w = np.asarray(words).astype(np.int64) & 0xFFFFFFFF
    v = np.empty(w.shape + (8,), np.uint8)
    for nibble, element in enumerate(AWQ_ORDER):
        v[..., element] = (w >> (4 * nibble)) & 0xF
    return v.reshape(w.shape[:-1] + (w.shape[-1] * 8,))
