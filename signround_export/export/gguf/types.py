"""The GGUF tensor types this project writes, one record each: what ggml-common.h says of their blocks,
the tuning grid each holds exactly, and llama.cpp's fallback.

Block sizes and bytes come from gguf-py (GGML_QUANT_SIZES), the 256-weight super-block of the
K-quants is checkpoint.qweight.SUPER_BLOCK (asserted equal to gguf.QK_K). A quantized block stores
integer codes and a float16 step d; weight = d * (code - zero) + min, where `zero` is a fixed code
and `min` a float16 minimum per block that only the types with float minima store. The K-quants
split each 256-weight super-block into sub-blocks with an integer scale sc (and minimum m) of their
own: weight = d * sc * (code - zero) - dmin * m.

| type | weights per block | codes     | zero | float min | sub-block | sc (and m) | grid                       | fallback |
| ---- | ----------------- | --------- | ---- | --------- | --------- | ---------- | -------------------------- | -------- |
| Q4_0 | 32                | 0..15     | 8    |           |           |            | W4G32 sym                  |          |
| Q4_1 | 32                | 0..15     | 0    | yes       |           |            | W4G32 asym, offsets        |          |
| Q5_0 | 32                | 0..31     | 16   |           |           |            | W5G32 sym                  |          |
| Q5_1 | 32                | 0..31     | 0    | yes       |           |            | W5G32 asym, offsets        |          |
| Q8_0 | 32                | -128..127 | 0    |           |           |            | W8G32 sym                  |          |
| Q2_K | 256               | 0..3      | 0    | yes       | 16        | 0..15      | W2G16 asym, 4-bit, offsets | Q4_0     |
| Q3_K | 256               | 0..7      | 4    |           | 16        | -32..31    | W3G16 sym, 6-bit           | Q4_0     |
| Q4_K | 256               | 0..15     | 0    | yes       | 32        | 0..63      | W4G32 asym, 6-bit, offsets | Q5_0     |
| Q5_K | 256               | 0..31     | 0    | yes       | 32        | 0..63      | W5G32 asym, 6-bit, offsets | Q5_1     |
| Q6_K | 256               | 0..63     | 32   |           | 16        | -128..127  | W6G16 sym, 8-bit           | Q8_0     |
| IQ4_NL | 32              | 0..15     |      |           |           |            | W4G32 sym, grid iq4_nl     |          |

The grid (a tuning Scheme, checkpoint/qweight.py) follows from the record: bits = width of the
codes, group = the (sub-)block, symmetric unless the type stores float minima, sub-scale bits =
width of sc. A layer tuned on it reaches the file bit for bit: types without float minima hold
integer zero points exactly (c = q - zero), types with them hold float offsets exactly (the
checkpoint's W = q * scale - offset). "fallback": llama.cpp's type for rows that are not a multiple
of 256, where a K-quant cannot go. "file type": general.file_type of a file mostly of this type.

IQ4_NL's codes index a table of 16 signed levels (checkpoint/qweight.py's GRIDS["iq4_nl"]), weight =
d * levels[code]; its blocks are laid out as Q4_0's. Its grid is non-uniform: it holds exactly the
layers tuned on that grid, and no integer layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ...checkpoint.qweight import SUPER_BLOCK, UNIFORM, Scheme

QK_K = SUPER_BLOCK  # weights per K-quant super-block
assert QK_K == gguf.QK_K, (QK_K, gguf.QK_K)


def _width(values: tuple[int, int]) -> int:
    """Bits of an integer range: 0..15 and -8..7 are 4 bits."""
    return (values[1] - values[0]).bit_length()


@dataclass(frozen=True)
class GGUFType:
    name: str  # gguf.GGMLQuantizationType member
    file_type: LlamaFileType  # general.file_type of a file mostly of this type
    codes: tuple[int, int] | None = None  # range of the stored integer codes; None: a float type
    zero: int = 0  # the code of weight 0 where there is no float minimum
    float_min: bool = False  # stores a float16 minimum per block (K-quants: dmin * m per sub-block)
    sub_block: int = 0  # K-quants: weights per sub-block with its own integer scale sc (and minimum m)
    sub_scales: tuple[int, int] | None = None  # K-quants: range of sc (and m)
    fallback: str | None = None  # llama.cpp's type for rows that are not a multiple of 256
    grid: str = UNIFORM  # a non-uniform grid (qweight.GRIDS) whose levels the codes index

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        return GGMLQuantizationType[self.name]

    @property
    def block(self) -> int:
        """Weights per block (K-quants: per super-block)."""
        return GGML_QUANT_SIZES[self.ggml_type][0]

    @property
    def nbytes(self) -> int:
        """Bytes per block."""
        return GGML_QUANT_SIZES[self.ggml_type][1]

    @property
    def quantized(self) -> bool:
        return self.codes is not None

    @property
    def k_quant(self) -> bool:
        return self.block == QK_K

    @property
    def bits(self) -> int:
        return _width(self.codes)

    @property
    def c_range(self) -> tuple[int, int]:
        """Range of c = code - zero, the integer each weight is a multiple of."""
        return self.codes[0] - self.zero, self.codes[1] - self.zero

    @property
    def scheme(self) -> Scheme | None:
        """The tuning grid whose every layer this type holds exactly (None for float types)."""
        if not self.quantized:
            return None
        return Scheme(self.bits, self.sub_block or self.block, not self.float_min,
                      _width(self.sub_scales) if self.sub_scales else 0, self.float_min, self.grid)


GGUF_TYPES = {t.name: t for t in (
    GGUFType("F32", LlamaFileType.ALL_F32),
    GGUFType("F16", LlamaFileType.MOSTLY_F16),
    GGUFType("Q4_0", LlamaFileType.MOSTLY_Q4_0, (0, 15), zero=8),
    GGUFType("Q4_1", LlamaFileType.MOSTLY_Q4_1, (0, 15), float_min=True),
    GGUFType("Q5_0", LlamaFileType.MOSTLY_Q5_0, (0, 31), zero=16),
    GGUFType("Q5_1", LlamaFileType.MOSTLY_Q5_1, (0, 31), float_min=True),
    GGUFType("Q8_0", LlamaFileType.MOSTLY_Q8_0, (-128, 127)),
    GGUFType("Q2_K", LlamaFileType.MOSTLY_Q2_K, (0, 3), float_min=True, sub_block=16, sub_scales=(0, 15),
             fallback="Q4_0"),
    GGUFType("Q3_K", LlamaFileType.MOSTLY_Q3_K_S, (0, 7), zero=4, sub_block=16, sub_scales=(-32, 31),
             fallback="Q4_0"),
    GGUFType("Q4_K", LlamaFileType.MOSTLY_Q4_K_M, (0, 15), float_min=True, sub_block=32, sub_scales=(0, 63),
             fallback="Q5_0"),
    GGUFType("Q5_K", LlamaFileType.MOSTLY_Q5_K_M, (0, 31), float_min=True, sub_block=32, sub_scales=(0, 63),
             fallback="Q5_1"),
    GGUFType("Q6_K", LlamaFileType.MOSTLY_Q6_K, (0, 63), zero=32, sub_block=16, sub_scales=(-128, 127),
             fallback="Q8_0"),
    GGUFType("IQ4_NL", LlamaFileType.MOSTLY_IQ4_NL, (0, 15), grid="iq4_nl"),
)}

QK = GGUF_TYPES["Q8_0"].block  # weights per block of the legacy (non-K) types
assert all(t.block in (1, QK, QK_K) for t in GGUF_TYPES.values())


def legacy_types(float_min: bool) -> list[GGUFType]:
    """The 32-weight integer block types with (or without) float minima, smallest first."""
    return sorted((t for t in GGUF_TYPES.values() if t.block == QK and t.float_min == float_min and t.grid == UNIFORM),
                  key=lambda t: t.nbytes)


def k_quant(bits: int, float_min: bool) -> GGUFType | None:
    """The K-quant with codes of `bits` bits and (or without) float minima, if there is one."""
    return next((t for t in GGUF_TYPES.values() if t.k_quant and t.bits == bits and t.float_min == float_min), None)


def grid_type(grid: str) -> GGUFType | None:
    """The block type whose codes index the levels of a non-uniform grid, if there is one."""
    return next((t for t in GGUF_TYPES.values() if t.grid == grid and grid != UNIFORM), None)
