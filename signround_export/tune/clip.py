"""Clip search: per group, the clipping of the weight range whose rounded weight has the least output error.

The output error of rounding a weight W [N, K] to Q(W) is weighted by the mean squared input of each
column (the input power p[k], from calibration data): sum over k of p[k] * (W[n, k] - Q(W)[n, k])^2,
the error measure of importance-matrix quantizers. SignRound starts its clipping factors where this
search ends (signround.py); with iters 0 the search's result is the checkpoint.
"""

from __future__ import annotations

import torch

from ..checkpoint.qweight import Scheme
from .quantizer import grouped, quantize, signed_codes, top_level


def clip_candidates(scheme: Scheme, w_range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (factor of lo, factor of hi) pairs per group that clip_search tries: the step becomes
    range / (n + 0.1 i), the range end moving by at most about one code, as importance-matrix
    quantizers search it. Deeper clipping lowers the input-weighted error further but measured worse
    perplexity (docs/benchmarks.md).
    Symmetric (n = 2^(bits-1), i in -9..9): both ends scale together. On a non-uniform grid n is the
    magnitude of its negative end and "one code" the spacing there (IQ4_NL: range / (127 + 2.3 i)).
    Asymmetric (n = 2^bits - 1, i in -10..10): lo stays, hi moves (hi stays where it is 0); this
    includes, at i = -1, the grid of half the step, where a model shipped on a coarser grid lies."""
    lo, hi = w_range
    if scheme.sym:
        m = top_level(scheme)
        code = 1 if scheme.levels is None else scheme.levels[1] - scheme.levels[0]
        return [(torch.full_like(lo, m / (m + 0.1 * i * code)),) * 2 for i in range(-9, 10)]
    maxq = 2**scheme.bits - 1
    out = []
    for i in range(-10, 11):
        r = maxq / (maxq + 0.1 * i)  # new range / old range
        f_hi = ((lo + (hi - lo) * r) / torch.where(hi > 0, hi, 1)).clamp(min=0)
        out.append((torch.where(hi > 0, 1.0, r), torch.where(hi > 0, f_hi, 1.0)))
    return out


def group_power(power: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """Per-column input power [K] as per-weight weights [N, G, group] (padding weighs 0)."""
    return grouped(power.expand(n, -1), group)


def ls_factor(w: torch.Tensor, scheme: Scheme, f: torch.Tensor, power_g: torch.Tensor, w_range) -> torch.Tensor:
    """The factor whose scale is the input-weighted least-squares scale for the codes that f gives:
    s = sum p * w * c / sum p * c^2 over a group, c the signed codes (symmetric grids only: q - zero, or
    the levels of a non-uniform grid)."""
    fq = quantize(w, scheme, None, f, f, w_range)
    c = signed_codes(fq, scheme)
    wg = grouped(w, scheme.resolved_group(w.shape[1]))
    den = (power_g * c * c).sum(-1)
    s = torch.where(den > 0, (power_g * wg * c).sum(-1) / den.clamp(min=1e-30), fq.scale)
    return (f * s / fq.scale).clamp(0.3, 1.5)


def ls_range(w: torch.Tensor, scheme: Scheme, f_lo: torch.Tensor, f_hi: torch.Tensor, power_g: torch.Tensor,
             w_range):
    """Asymmetric grids: the factors (of lo, of hi) of the input-weighted least-squares line through the
    codes q that (f_lo, f_hi) give, w ~ s * q - o: the range it spans is lo = -o, hi = s * (2^b - 1) - o."""
    q = quantize(w, scheme, None, f_lo, f_hi, w_range).q
    wg = grouped(w, scheme.resolved_group(w.shape[1]))
    sp, sq, sqq = power_g.sum(-1), (power_g * q).sum(-1), (power_g * q * q).sum(-1)
    sw, sqw = (power_g * wg).sum(-1), (power_g * q * wg).sum(-1)
    det = sp * sqq - sq * sq
    ok = det > 1e-12 * sp * sqq  # codes that are all alike fit no line: keep f there
    s = (sp * sqw - sq * sw) / torch.where(ok, det, 1)
    o = (s * sq - sw) / sp.clamp(min=1e-30)
    lo, hi = w_range
    f_lo = torch.where(ok & (lo < 0), -o / torch.where(lo < 0, lo, -1), f_lo)
    f_hi = torch.where(ok & (hi > 0), (s * (2**scheme.bits - 1) - o) / torch.where(hi > 0, hi, 1), f_hi)
    return f_lo.clamp(0.3, 1.5), f_hi.clamp(0.3, 1.5)


@torch.no_grad()
def clip_search(w: torch.Tensor, scheme: Scheme, power: torch.Tensor, w_range) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the clipping factors (of the range's low end, of its high end) whose rounded weight has
    the least output error, sum over k of power[k] * (W - Q(W))^2: the weighted scale search that
    importance-matrix quantizers do, used here as SignRound's starting point. Candidates:
    clip_candidates, and each one's least-squares refinement (ls_factor, ls_range)."""
    group = scheme.resolved_group(w.shape[1])
    power_g = group_power(power, w.shape[0], group)
    best_err = best = None
    for f_lo, f_hi in clip_candidates(scheme, w_range):
        if scheme.sym:
            refined = ls_factor(w, scheme, f_lo, power_g, w_range)
            cands = ((f_lo, f_hi), (refined, refined))
        else:
            cands = ((f_lo, f_hi), ls_range(w, scheme, f_lo, f_hi, power_g, w_range))
        for cand in cands:
            err = ((grouped(w - quantize(w, scheme, None, *cand, w_range).weight, group)) ** 2 * power_g).sum(-1)
            if best is None:
                best_err, best = err, cand
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = tuple(torch.where(better, c, b) for c, b in zip(cand, best))
    return best
