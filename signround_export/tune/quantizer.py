"""Group-wise integer quantization of a weight, with SignRound's tunable rounding and clipping.

For a weight W [N, K] cut into groups of `group_size` along K (the last group zero-padded):

    asymmetric   lo = min(W_g, 0) * min_scale      hi = max(W_g, 0) * max_scale
                 scale = (hi - lo) / (2^b - 1)     zero = round(-lo / scale)
                 q = clamp(round(W / scale + V) + zero, 0, 2^b - 1)

    symmetric    m = 2^(b-1); the larger of |lo|, |hi| maps to -m, so the full range [-m, m-1] is used
                 scale = (|lo| >= |hi| ? |lo| : -|hi|) / m          zero = m
                 q = clamp(round(W / scale + V), -m, m - 1) + m

    dequantized  W_q = (q - zero) * scale

With sub_scale_bits = B, the scales of each 256-weight super-block of a row are further held to one
float16 step d times B-bit integers sc, as GGUF's K-quants store them:
    symmetric (Q3_K, B = 6; Q6_K, B = 8): sc signed, |sc| <= L = 2^(B-1) - 1
    asymmetric (Q2_K, B = 4; Q4_K and Q5_K, B = 6): sc in 1..L = 2^B - 1, and the float offset -lo
        of each group (below) is held the same way to dmin * m, m in 0..L
    d = max |scale| / L, rounded up so that d * sc needs at most 11 significant bits
    scale = d * round(scale / d)
The float16 scale (and offset) the checkpoint stores is then the K-quant's own d * sc (dmin * m), and
the GGUF export recovers d and sc exactly.

With float_offset (GGUF's Q4_1, Q5_1 and the asymmetric K-quants), the minimum is not rounded to a
whole step: offset = -lo in float16, q = clamp(round((W + offset) / scale + V), 0, 2^b - 1), and
W_q = q * scale - offset.

On a non-uniform grid (scheme.grid, e.g. IQ4_NL: 16 signed integer levels L_0 < ... < L_15, weight =
L[code] * scale) the symmetric rule holds with m = -L_0: the larger of |lo|, |hi| maps to L_0, the end
of the table with the larger magnitude (IQ4_NL: -127 against +113), so the step is the finest that
covers that side; the other side ends at L_15 (113/127 of it), clipping only what lies beyond. The
rounding runs in level-index space, where the levels sit at whole numbers:

    x = W / scale       i: L_i <= x < L_i+1 (the end intervals extended beyond the table)
    t = i + (x - L_i) / (L_i+1 - L_i)
    code = clamp(round(t + V), 0, 15)       W_q = L[code] * scale

so V moves a weight between its two neighbouring levels, and V = 0 is the nearest level. Gradients
pass straight through round() and through the table lookup (L read as the line through its levels,
whose slope is the local spacing).

V (per weight, in [-0.5, 0.5]) and min_scale / max_scale (per group, in [0, 1], or somewhat above 1
where the clipping search starts them there) are what SignRound tunes; V = 0 and both factors 1 is plain round-to-nearest (RTN). Scales are rounded to float16
inside the computation, because that is what the checkpoint stores: the tuned loss is the loss of
the stored weight. round() passes gradients straight through.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from ..checkpoint.qweight import SUPER_BLOCK, QuantWeight, Scheme
from ..errors import TuneError

SCALE_EPS = 1e-5  # smallest |scale|; keeps a group of zeros from dividing by zero


class FakeQuant(NamedTuple):
    """A weight on its grid: the dequantized weight and what it is made of ([N, G] per group)."""

    weight: torch.Tensor  # W_q [N, K] float32, differentiable in V, min_scale and max_scale
    q: torch.Tensor  # the integers [N, G, group] (padding included), as floats
    scale: torch.Tensor
    zero: torch.Tensor | None  # the integer zero point (unused by non-uniform grids); None on float-offset grids
    offset: torch.Tensor | None  # the float minimum -lo on float-offset grids; None elsewhere


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.round()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() forward, identity backward. The same values and gradients as the usual x + (round(x) -
    x).detach() (round(x) - x is exact in float, so adding x back gives round(x), up to the sign of a
    zero), in one pass over the weight instead of three."""
    return _RoundSTE.apply(x)


def to_fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value, identity backward."""
    return x + (x.half().float() - x).detach()


def grouped(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] -> [N, G, group], zero-padding K up to a whole number of groups."""
    n, k = w.shape
    pad = -k % group
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.view(n, -1, group)


def group_range(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """min(W_g, 0) and max(W_g, 0) per group, [N, G]. Padding zeros do not change them."""
    wg = grouped(w, group)
    return wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)


def sub_scale_grid(scale: torch.Tensor, group: int, bits: int, signed: bool = True,
                   allow_zero: bool = False) -> torch.Tensor:
    """Scales [N, G] held to d * sc per super-block, sc `bits`-bit integers (see above). A scale never
    rounds to zero; the offsets of asymmetric K-quants (allow_zero) may."""
    n, g = scale.shape
    if (g * group) % SUPER_BLOCK or SUPER_BLOCK % group:
        raise TuneError(f"K-quant scales need groups that divide {SUPER_BLOCK} and rows a multiple of it; this "
                        f"layer has {g} groups of {group}")
    s = scale.view(n, -1, SUPER_BLOCK // group)
    magnitude_bits = bits - 1 if signed else bits
    limit = 2**magnitude_bits - 1
    d = (s.detach().abs().amax(-1, keepdim=True) / limit).clamp(min=2.0**-24)
    quantum = torch.exp2(torch.floor(torch.log2(d)) - (10 - magnitude_bits)).clamp(min=2.0**-24)
    d = torch.ceil(d / quantum) * quantum  # 11 - magnitude_bits significant bits: d * sc fits float16
    sc = round_ste(s / d)
    sc = torch.where(s < 0, sc.clamp(-limit, -1), sc.clamp(0 if allow_zero else 1, limit))
    return (d * sc).view(n, g)


def level_index(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """x in level-index space, t = i + (x - L_i) / (L_i+1 - L_i), the end intervals extended outward."""
    i = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for level in levels[1:-1].tolist():  # L_i <= x < L_i+1, 0..14: 3x faster than searchsorted on a CPU
        i += x.detach() >= level
    i = i.long()
    lo = levels[i]
    return i + (x - lo) / (levels[i + 1] - lo)


def level_value(code: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """L[code] for whole-number codes (exactly), read as the line through the levels so that the
    gradient in code is the local spacing L_j+1 - L_j."""
    j = code.detach().floor().clamp(0, len(levels) - 2).long()
    lo = levels[j]
    return lo + (code - j) * (levels[j + 1] - lo)


def signed_codes(fq: FakeQuant, scheme: Scheme) -> torch.Tensor:
    """The integer each weight of a symmetric grid is a multiple of its scale by: q - zero, or L[q]."""
    if scheme.levels is not None:
        return torch.tensor(scheme.levels, dtype=fq.scale.dtype, device=fq.q.device)[fq.q.long()]
    return fq.q - fq.zero[..., None]


def top_level(scheme: Scheme) -> int:
    """m: the magnitude of a symmetric grid's negative end, to which the larger side of a group maps."""
    return 2 ** (scheme.bits - 1) if scheme.levels is None else -scheme.levels[0]


def quantize(w: torch.Tensor, scheme: Scheme, v=None, min_scale=None, max_scale=None, w_range=None) -> FakeQuant:
    """W on the scheme's grid under the tuning parameters (None: round to nearest over the full range).
    w_range is group_range(w) when the caller has it at hand."""
    n, k = w.shape
    group = scheme.resolved_group(k)
    wg = grouped(w, group)
    lo, hi = w_range if w_range is not None else group_range(w, group)
    if min_scale is not None:
        lo, hi = lo * min_scale, hi * max_scale
    if scheme.sym:
        m = top_level(scheme)
        scale = torch.where(-lo >= hi, -lo, -hi) / m
        scale = torch.where(scale < 0, scale.clamp(max=-SCALE_EPS), scale.clamp(min=SCALE_EPS))
        if scheme.sub_scale_bits:
            scale = sub_scale_grid(scale, group, scheme.sub_scale_bits)
        scale = to_fp16_ste(scale)
        if scheme.levels is not None:
            return on_levels(wg, scale, torch.tensor(scheme.levels, dtype=wg.dtype, device=wg.device), v, scheme, k)
        zero = torch.full_like(scale, m)
        lo_q, hi_q = -m, m - 1
    elif scheme.float_offset:
        maxq = 2**scheme.bits - 1
        scale, offset = ((hi - lo) / maxq).clamp(min=SCALE_EPS), -lo
        if scheme.sub_scale_bits:
            scale = sub_scale_grid(scale, group, scheme.sub_scale_bits, signed=False)
            offset = sub_scale_grid(offset, group, scheme.sub_scale_bits, signed=False, allow_zero=True)
        scale, offset = to_fp16_ste(scale), to_fp16_ste(offset)
        q = torch.clamp(round_ste((wg + offset[..., None]) / scale[..., None] + (0 if v is None else v)), 0, maxq)
        wq = q * scale[..., None] - offset[..., None]
        return FakeQuant(wq.view(n, -1)[:, :k], q, scale, None, offset)
    else:
        maxq = 2**scheme.bits - 1
        scale = to_fp16_ste(((hi - lo) / maxq).clamp(min=SCALE_EPS))
        zero = round_ste(-lo / scale).clamp(0, maxq)
        lo_q, hi_q = 0, maxq
    r = wg / scale[..., None]
    if v is not None:
        r = r + v
    if scheme.sym:
        q = torch.clamp(round_ste(r), lo_q, hi_q) + zero[..., None]
    else:
        q = torch.clamp(round_ste(r) + zero[..., None], lo_q, hi_q)
    wq = (q - zero[..., None]) * scale[..., None]
    return FakeQuant(wq.view(n, -1)[:, :k], q, scale, zero, None)


def on_levels(wg: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor, v, scheme: Scheme, k: int) -> FakeQuant:
    """Groups wg [N, G, group] on a non-uniform grid of the given (float16) scales (see above)."""
    t = level_index(wg / scale[..., None], levels)
    if v is not None:
        t = t + v
    code = torch.clamp(round_ste(t), 0, len(levels) - 1)
    wq = level_value(code, levels) * scale[..., None]
    zero = torch.full_like(scale, 2 ** (scheme.bits - 1))  # stored, unused: the checkpoint's symmetric zero point
    return FakeQuant(wq.view(wg.shape[0], -1)[:, :k], code, scale, zero, None)


def to_qweight(w: torch.Tensor, scheme: Scheme, v=None, min_scale=None, max_scale=None,
               bias: torch.Tensor | None = None) -> QuantWeight:
    """The integers, float16 scales and zero points of W under the given tuning parameters."""
    with torch.no_grad():
        fq = quantize(w.float(), scheme, v, min_scale, max_scale)
    n, k = w.shape
    zero = torch.zeros_like(fq.scale) if fq.zero is None else fq.zero  # float-offset grids store zero points 0
    qw = QuantWeight(
        q=fq.q.reshape(n, -1)[:, :k].round().to(torch.uint8).contiguous().cpu().numpy(),
        scale=fq.scale.half().float().cpu().numpy(),
        zero=zero.round().to(torch.uint8).cpu().numpy(),
        offset=None if fq.offset is None else fq.offset.half().float().cpu().numpy(),
        bits=scheme.bits,
        group_size=scheme.resolved_group(k),
        sym=scheme.sym,
        bias=None if bias is None else bias.detach().float().cpu().numpy(),
        grid=scheme.grid,
    )
    qw.check()
    return qw


def dequantize(qw: QuantWeight, device=None) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(qw.dequantize())).to(device)
