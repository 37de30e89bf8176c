"""A QuantWeight as the inputs of onnxruntime's MatMulNBits (com.microsoft), exactly.

MatMulNBits computes Y = A @ dequant(B).T with, for output row n and block b of `block` columns:

| input        | dtype   | shape                              | layout                                         |
| ------------ | ------- | ---------------------------------- | ---------------------------------------------- |
| B            | uint8   | [N, k_blocks, block * bits / 8]    | codes along K, low bits first within each byte |
| scales       | float32 | [N, k_blocks]                      | one step per block                             |
| zero_points  | uint8   | [N, ceil(k_blocks * bits / 8)]     | packed like B, each row padded on its own      |

weight[n, k] = (code - zero) * scale of block k // block; without zero_points, zero = 2^(bits-1).
k_blocks = ceil(K / block): K is padded with zero codes to whole blocks (A has no such columns,
so the padding multiplies nothing). The CPU kernel takes bits 2, 4, 8 and blocks 16..256.

From a checkpoint group of g columns:
- g in 16..256 (a power of two): block = g.
- g larger (one group per row, 512 ...): block = the largest supported power of two dividing g; each
  scale and zero point repeats over the g / block blocks of its group.
- 3-bit codes go into 4-bit containers, 5- and 6-bit codes into 8-bit ones: same codes, explicit
  zero points.
- float offsets (weights tuned for GGUF's asymmetric K-quants, W = q * scale - offset): zero points
  unpacked as float32 offset / scale, which MatMulNBits also takes (a slower kernel); exact to float32
  rounding, not bit for bit.
- codes on a non-uniform grid (`tune --gguf iq4_nl`, W = levels[q] * scale) have no (code - zero) * scale
  form: refused (grid_error), never written as if they were evenly spaced integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...checkpoint.packing import pack_bits
from ...checkpoint.qweight import UNIFORM, QuantWeight
from ...errors import MatMulNBitsError

KERNEL_BITS = (2, 4, 8)
CONTAINER = {2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 8: 8}  # checkpoint bits -> the kernel's bits that hold them
BLOCK_SIZES = (256, 128, 64, 32, 16)


@dataclass
class NBitsWeight:
    b: np.ndarray  # uint8 [N, k_blocks, block * bits / 8]
    scales: np.ndarray  # float32 [N, k_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(k_blocks * bits / 8)] or float32 [N, k_blocks]; None: 2^(bits-1)
    bits: int
    block: int
    k: int
    n: int


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes [..., L] into bytes along the last axis, low bits first ([..., ceil(L*bits/8)]).

    This is the checkpoint's GPTQ bit stream (packing.pack_bits) read as little-endian bytes."""
    words = pack_bits(codes, bits, axis=-1).astype("<i4")
    return np.ascontiguousarray(words).view(np.uint8)[..., : -(-codes.shape[-1] * bits // 8)]


def block_for(group: int, max_block: int = 256, name: str = "weight") -> int:
    """The largest MatMulNBits block, at most max_block, that carries groups of `group` columns exactly."""
    for block in BLOCK_SIZES:
        if block <= max_block and group % block == 0:
            return block
    raise MatMulNBitsError(f"{name}: group size {group} is not a multiple of a MatMulNBits block size "
                           f"({', '.join(map(str, sorted(BLOCK_SIZES)))}); quantize with a group_size that is "
                           "(group_size -1 makes each whole row one group)")


def grid_error(names: list[str], grid: str) -> MatMulNBitsError:
    """The refusal of layers whose codes index a non-uniform grid's levels."""
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return MatMulNBitsError(f"{names[0]}{more}: codes on the non-uniform grid {grid!r} (weight = levels[code] * "
                            "scale); MatMulNBits holds evenly spaced integers only, (code - zero) * scale, so no ONNX "
                            "file can carry them. Export this checkpoint with `signround export gguf` (llama.cpp's "
                            f"{grid.upper()}), or tune for ONNX without --gguf (e.g. --bits 4 --group-size 32 --sym)")


def to_nbits(qw: QuantWeight, name: str = "weight", max_block: int = 256) -> NBitsWeight:
    """qw as MatMulNBits inputs. max_block caps the block: smaller blocks repeat each scale over more
    blocks (still exact), and at accuracy level 4 they also quantize activations in smaller blocks."""
    if qw.grid != UNIFORM:
        raise grid_error([name], qw.grid)
    n, k = qw.shape
    bits = CONTAINER.get(qw.bits)
    if bits not in KERNEL_BITS:
        raise MatMulNBitsError(f"{name}: {qw.bits}-bit weights have no MatMulNBits CPU kernel; quantize with bits "
                               f"{', '.join(map(str, sorted(CONTAINER)))}")
    block = block_for(qw.group_size, max_block, name)
    repeat = qw.group_size // block
    k_blocks = -(-k // block)
    scales = np.repeat(qw.scale, repeat, axis=1)[:, :k_blocks]
    zeros = np.repeat(qw.zero, repeat, axis=1)[:, :k_blocks]
    codes = np.zeros((n, k_blocks * block), dtype=np.uint8)
    codes[:, :k] = qw.q
    b = pack_codes(codes.reshape(n, k_blocks, block), bits)
    if qw.offset is not None:
        zero_points = np.ascontiguousarray(np.repeat(qw.offset / qw.scale, repeat, axis=1)[:, :k_blocks],
                                           dtype=np.float32)
    elif np.all(zeros == 2 ** (bits - 1)):
        zero_points = None
    else:
        zero_points = pack_codes(zeros, bits)
    return NBitsWeight(b=b, scales=np.ascontiguousarray(scales, dtype=np.float32), zero_points=zero_points,
                       bits=bits, block=block, k=k, n=n)


def unpack_codes(packed: np.ndarray, bits: int, length: int) -> np.ndarray:
    """pack_codes undone: the first `length` codes of each row of bytes [..., L] (low bits first)."""
    shifts = np.arange(8 // bits, dtype=np.uint8) * np.uint8(bits)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], -1)[..., :length]


def dequantize_nbits(w: NBitsWeight) -> np.ndarray:
    """float32 [N, K] as MatMulNBits reads the inputs (the contract above, for tests)."""
    k_blocks = w.scales.shape[1]
    codes = unpack_codes(w.b, w.bits, w.block).reshape(w.n, k_blocks, w.block).astype(np.float32)
    if w.zero_points is None:
        zeros = np.full(w.scales.shape, 2 ** (w.bits - 1), dtype=np.float32)
    elif w.zero_points.dtype == np.float32:
        zeros = w.zero_points
    else:
        zeros = unpack_codes(w.zero_points, w.bits, k_blocks).astype(np.float32)
    codes -= zeros[..., None]
    codes *= w.scales[..., None]
    return codes.reshape(w.n, -1)[:, : w.k]
