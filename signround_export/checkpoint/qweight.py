"""The quantized weight of one linear layer: the contract between tuning, the checkpoint and exporters.

A linear layer's HF weight W has shape [N, K] (out_features, in_features). Quantization groups run
along K: group g covers columns [g*group_size, (g+1)*group_size). When K is not a multiple of the
group size the last group is shorter (it is treated as zero-padded to a whole group everywhere, so
its scale and zero point are computed from the real columns only).

    W[n, k] ~= (q[n, k] - zero[n, k // group_size]) * scale[n, k // group_size]

q and zero are unsigned integers in [0, 2**bits - 1]. Symmetric weights have zero == 2**(bits-1)
everywhere. Scales are float16 values (the checkpoint stores them as float16; we keep them in
float32 arrays holding exactly representable float16 numbers).

Asymmetric weights may instead carry a float offset per group (GGUF's K-quants Q2_K, Q4_K, Q5_K
store their minimum that way; `tune --gguf q4_k` tunes on that grid); zero is then all 0 and

    W[n, k] ~= q[n, k] * scale[n, k // group_size] - offset[n, k // group_size]

with offsets float16 values too, computed in float32 like every consumer does.

A weight on a non-uniform grid (`grid`, auto-round's data_type, other than "int": GGUF's IQ4_NL, `tune
--gguf iq4_nl`) stores codes q that index a fixed table of signed integer levels instead:

    W[n, k] ~= levels[q[n, k]] * scale[n, k // group_size]

It is symmetric (zero points stored as 2**(bits-1), unused) and its levels are GRIDS[grid].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError, TuneError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
SUPER_BLOCK = 256  # weights per K-quant super-block
UNIFORM = "int"  # the grid of evenly spaced integers, auto-round's data_type "int"
# Non-uniform grids: code q means levels[q] * scale. IQ4_NL's are ggml-common.h's kvalues_iq4nl; its
# negative end is the longer one, which the largest-magnitude weight of a group maps to (quantizer.py).
GRIDS = {"iq4_nl": (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)}


def grid_levels(grid: str) -> tuple[int, ...] | None:
    """The levels of a non-uniform grid; None for the uniform one."""
    return None if grid == UNIFORM else GRIDS[grid]


def check_grid(grid: str, bits: int, sym: bool, error=TuneError, name: str = "weight") -> None:
    """`error` naming the problem when `grid` is unknown or does not fit bits and sym."""
    if grid == UNIFORM:
        return
    if grid not in GRIDS:
        raise error(f"{name}: grid (data_type) {grid!r} is unknown; known: {', '.join((UNIFORM, *GRIDS))}")
    if not sym or 2**bits != len(GRIDS[grid]):
        raise error(f"{name}: grid {grid!r} has {len(GRIDS[grid])} levels and a signed scale: it needs "
                    f"{len(GRIDS[grid]).bit_length() - 1}-bit symmetric weights, got {bits}-bit "
                    f"{'symmetric' if sym else 'asymmetric'}")


@dataclass(frozen=True)
class Scheme:
    bits: int
    group_size: int  # -1: one group per row
    sym: bool
    sub_scale_bits: int = 0  # > 0: scales on a K-quant grid (tune/quantizer.py; K % 256 == 0)
    float_offset: bool = False  # asymmetric with a float16 minimum per group instead of an integer zero point
    grid: str = UNIFORM  # or a non-uniform grid of GRIDS: code q means levels[q] * scale

    def __post_init__(self):
        if self.float_offset and self.sym:
            raise TuneError("a float offset is for asymmetric weights (sym=False)")
        if self.sub_scale_bits and not self.sym and not self.float_offset:
            raise TuneError("asymmetric K-quant grids hold float offsets (float_offset=True)")
        check_grid(self.grid, self.bits, self.sym, name="scheme")
        if self.grid != UNIFORM and self.sub_scale_bits:
            raise TuneError(f"scheme: grid {self.grid!r} has one float16 scale per group, no K-quant sub-scales")

    @property
    def levels(self) -> tuple[int, ...] | None:
        return grid_levels(self.grid)

    def resolved_group(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size


def n_groups(k: int, group_size: int) -> int:
    return math.ceil(k / group_size)


@dataclass
class QuantWeight:
    q: np.ndarray  # uint8 [N, K]
    scale: np.ndarray  # float32 [N, G], values exactly representable in float16
    zero: np.ndarray  # uint8 [N, G]
    bits: int
    group_size: int  # the resolved size (K for per-channel "-1")
    sym: bool
    bias: np.ndarray | None = None  # float32 [N]
    offset: np.ndarray | None = None  # float32 [N, G] float16 values: W = q * scale - offset (zero unused, 0)
    grid: str = UNIFORM  # a non-uniform grid of GRIDS: W = levels[q] * scale (zero unused, 2**(bits-1))

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def check(self, name: str = "weight") -> None:
        """Raise CheckpointError naming the problem when the fields are inconsistent."""
        if self.bits not in SUPPORTED_BITS:
            raise CheckpointError(f"{name}: {self.bits}-bit weights are not supported (supported: {SUPPORTED_BITS})")
        if self.q.ndim != 2:
            raise CheckpointError(f"{name}: integer weight must be 2-D, got shape {self.q.shape}")
        n, k = self.q.shape
        g = n_groups(k, self.group_size)
        if self.scale.shape != (n, g) or self.zero.shape != (n, g):
            raise CheckpointError(
                f"{name}: scales {self.scale.shape} / zero points {self.zero.shape} do not match "
                f"{n} rows x {g} groups of {self.group_size} (K={k})"
            )
        maxq = 2**self.bits - 1
        if self.q.size and int(self.q.max()) > maxq:
            raise CheckpointError(f"{name}: integer value {int(self.q.max())} does not fit in {self.bits} bits")
        if self.zero.size and int(self.zero.max()) > maxq:
            raise CheckpointError(f"{name}: zero point {int(self.zero.max())} does not fit in {self.bits} bits")
        if not np.all(np.isfinite(self.scale)):
            raise CheckpointError(f"{name}: scales contain NaN or infinity")
        if np.any(self.scale == 0):
            raise CheckpointError(f"{name}: scales contain zeros")
        check_grid(self.grid, self.bits, self.sym, CheckpointError, name)
        if self.offset is not None:
            if self.sym:
                raise CheckpointError(f"{name}: a symmetric weight cannot carry float offsets")
            if self.offset.shape != (n, g) or not np.all(np.isfinite(self.offset)):
                raise CheckpointError(f"{name}: offsets must be {n} x {g} finite values, got {self.offset.shape}")
            if self.zero.size and int(self.zero.max()) != 0:
                raise CheckpointError(f"{name}: a weight with float offsets keeps its zero points at 0")

    def group_index(self) -> np.ndarray:
        """Group of every column k: k // group_size."""
        return np.arange(self.q.shape[1]) // self.group_size

    def step_error(self, w: np.ndarray) -> float:
        """max over weights of |w - W| in units of each weight's own quantization step |scale| (0 when w
        holds the integers exactly). |scale|: symmetric groups can have negative scales. (Each group's
        largest difference is divided once: division by a positive number keeps the order.)"""
        if not self.q.size:
            return 0.0
        diff = self.by_group(np.abs(w - self.dequantize()))
        return float(np.max(diff.max(-1) / np.abs(self.scale)))

    def dequantize(self) -> np.ndarray:
        """float32 [N, K] weight."""
        levels = grid_levels(self.grid)
        if levels is not None:  # levels[q] * scale: an integer of 8 bits times a float16 is exact in float32
            w = np.asarray(levels, dtype=np.float32)[self.by_group(self.q)]
            w *= self.scale[..., None]
        elif self.offset is not None:
            w = self.by_group(self.q).astype(np.float32)
            w *= self.scale[..., None]
            w -= self.offset[..., None]
        else:
            w = self.by_group(self.q).astype(np.float32)
            w -= self.zero[..., None].astype(np.float32)
            w *= self.scale[..., None]
        n, k = self.q.shape
        return np.ascontiguousarray(w.reshape(n, -1)[:, :k])  # a copy only when the last group is short

    def by_group(self, a: np.ndarray) -> np.ndarray:
        """[N, K] as [N, G, group_size], a short last group padded with zeros."""
        n, k = a.shape
        pad = self.scale.shape[1] * self.group_size - k
        return (np.pad(a, ((0, 0), (0, pad))) if pad else a).reshape(n, -1, self.group_size)
