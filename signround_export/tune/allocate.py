"""Bits per layer under an average-bits budget: a multiple-choice knapsack, solved exactly on a grid.

Each quantizable linear l picks one bit width b from the choices. Choosing b costs c[l, b] bits of
the checkpoint file (integers, scales and zero points as written, see `layer_file_bits`) and
predicts a loss increase e[l, b] (an importance measure, see importance.py). We minimise

    sum_l e[l, b_l]   subject to   sum_l c[l, b_l] <= avg_bits * (weights in all quantized linears)

by dynamic programming over the budget cut into `resolution` equal units, with every cost rounded
*up* to whole units: the answer always fits the true budget. The Lagrangian dual gives a lower bound
on the true optimum, so the report states how far from optimal the answer can be at most.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..checkpoint.qweight import SUPPORTED_BITS, n_groups
from ..errors import TuneError


def layer_file_bits(n: int, k: int, bits: int, group_size: int) -> int:
    """Bits one [N, K] linear takes in the checkpoint (checkpoint/format.py's layout, either packing format):

    | tensor  | dtype | shape                | bits                       |
    | qweight | int32 | [K * bits / 32, N]   | K * bits * N               |
    | qzeros  | int32 | [G, ceil(N*bits/32)] | G * ceil(N * bits / 32) * 32 |
    | scales  | fp16  | [G, N]               | G * N * 16                 |
    """
    g = n_groups(k, k if group_size == -1 else group_size)
    return k * bits * n + g * math.ceil(n * bits / 32) * 32 + g * n * 16


@dataclass
class Allocation:
    bits: dict[str, int]  # layer name -> chosen bits
    avg_bits: float  # file bits per weight of the chosen allocation
    budget: float  # the asked average
    error: float  # sum of the chosen layers' predicted errors
    lower_bound: float  # no allocation within the budget has a smaller predicted error

    def gap(self) -> float:
        """How much larger the chosen error may be than the true optimum's, relative."""
        return (self.error - self.lower_bound) / self.error if self.error > 0 else 0.0

    def table(self) -> str:
        lines = [f"{'layer':48s} bits"] + [f"{n:48s} {b:4d}" for n, b in self.bits.items()]
        counts = {b: sum(1 for x in self.bits.values() if x == b) for b in sorted(set(self.bits.values()))}
        lines.append(f"{len(self.bits)} layers: " + ", ".join(f"{c} at {b} bits" for b, c in counts.items())
                     + f"; {self.avg_bits:.4f} bits per weight (budget {self.budget}); predicted error "
                       f"{self.error:.6g}, within {100 * self.gap():.2f}% of optimal")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"bits": self.bits, "avg_bits": self.avg_bits, "budget": self.budget, "error": self.error,
                "lower_bound": self.lower_bound}

    @classmethod
    def from_json(cls, d: dict) -> "Allocation":
        return cls(bits={k: int(v) for k, v in d["bits"].items()}, avg_bits=d["avg_bits"], budget=d["budget"],
                   error=d["error"], lower_bound=d["lower_bound"])


def read_allocation(path: str | Path, layers: list[str]) -> dict[str, int]:
    """Bits per layer from a JSON file {"bits": {layer: bits}}, or a tuning log whose "allocation" holds
    them; every name must be one of `layers`."""
    try:
        record = json.loads(Path(path).read_text())
        bits = record.get("allocation", record)["bits"]
        bits = {str(k): int(v) for k, v in bits.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TuneError(f"`allocation` {path}: expected a JSON object {{\"bits\": {{layer: bits}}}} ({e})",
                        param="allocation") from None
    unknown = sorted(set(bits) - set(layers))
    if unknown:
        raise TuneError(f"`allocation` {path}: {len(unknown)} names are not decoder-block linears of this model, "
                        f"e.g. {unknown[0]!r}", param="allocation")
    bad = sorted({b for b in bits.values() if b not in SUPPORTED_BITS})
    if bad:
        raise TuneError(f"`allocation` {path}: bits {bad} are not among {', '.join(map(str, SUPPORTED_BITS))}",
                        param="allocation")
    return bits


def solve(names: list[str], choices: list[int], cost: np.ndarray, error: np.ndarray, n_weights: int,
          avg_bits: float, resolution: int = 20000) -> Allocation:
    """cost, error: [layers, choices]. Exact DP on the rounded-up grid, plus the Lagrangian bound."""
    cost, error = np.asarray(cost, dtype=np.float64), np.asarray(error, dtype=np.float64)
    budget = avg_bits * n_weights
    if cost.min(axis=1).sum() > budget:
        cheapest = cost.min(axis=1).sum() / n_weights
        raise TuneError(f"`avg_bits` {avg_bits} is below the smallest possible size, {cheapest:.3f} bits per "
                        f"weight with {min(choices)} bits everywhere; raise it or add smaller `bits_choices`",
                        param="avg_bits")
    unit = budget / resolution
    units = np.ceil(cost / unit - 1e-9).astype(np.int64)
    inf = np.inf
    best_prev = np.zeros(resolution + 1)  # best_prev[u]: least error of the layers so far within u units
    pick = np.zeros((len(names), resolution + 1), dtype=np.int8)
    for l in range(len(names)):
        cur = np.full(resolution + 1, inf)
        arg = np.zeros(resolution + 1, dtype=np.int8)
        for j in range(len(choices)):
            u = units[l, j]
            if u > resolution:
                continue
            cand = np.full(resolution + 1, inf)
            cand[u:] = best_prev[: resolution + 1 - u] + error[l, j]
            better = cand < cur
            cur[better], arg[better] = cand[better], j
        best_prev, pick[l] = cur, arg
    if not np.isfinite(best_prev[resolution]):  # the grid's rounding ate the slack: fall back to cheapest
        chosen = cost.argmin(axis=1)
    else:
        chosen, u = np.zeros(len(names), dtype=np.int64), resolution
        for l in range(len(names) - 1, -1, -1):
            chosen[l] = pick[l, u]
            u -= units[l, chosen[l]]
    rows = np.arange(len(names))
    return Allocation(
        bits={n: choices[j] for n, j in zip(names, chosen)},
        avg_bits=float(cost[rows, chosen].sum() / n_weights), budget=avg_bits,
        error=float(error[rows, chosen].sum()), lower_bound=lagrangian_bound(cost, error, budget),
    )


def lagrangian_bound(cost: np.ndarray, error: np.ndarray, budget: float) -> float:
    """max over lambda >= 0 of sum_l min_b (e + lambda c) - lambda * budget: a lower bound on the optimum.

    The dual is concave and piecewise linear in lambda; its maximum is where the chosen cost crosses the
    budget, found by bisection on log lambda."""
    def dual(lam: float) -> tuple[float, float]:
        v = error + lam * cost
        j = v.argmin(axis=1)
        rows = np.arange(len(cost))
        return float(v[rows, j].sum() - lam * budget), float(cost[rows, j].sum())

    lo, hi = 1e-30, 1.0
    while dual(hi)[1] > budget and hi < 1e30:
        hi *= 10
    if dual(lo)[1] <= budget:  # the budget does not bind: every layer at its least error
        return dual(0.0)[0]
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if dual(mid)[1] > budget:
            lo = mid
        else:
            hi = mid
    return max(dual(lo)[0], dual(hi)[0])


def depth_allocation(names: list[str], block_of: list[int], choices: list[int], cost: np.ndarray,
                     n_weights: int, avg_bits: float) -> dict[str, int]:
    """The naive baseline: one width everywhere (the largest that fits), then whole blocks raised to the
    next width from the ends inwards (first, last, second, second to last, ...) while the budget allows."""
    budget = avg_bits * n_weights
    order = sorted(range(len(choices)), key=lambda j: choices[j])
    fits = [j for j in order if cost[:, j].sum() <= budget]
    if not fits:
        raise TuneError(f"`avg_bits` {avg_bits} is below the smallest uniform size", param="avg_bits")
    base = fits[-1]
    chosen = np.full(len(names), base)
    if base != order[-1]:
        up = order[order.index(base) + 1]
        blocks = sorted(set(block_of))
        ends = [b for pair in zip(blocks, reversed(blocks)) for b in pair]
        seen = []
        for b in ends:
            if b in seen:
                continue
            seen.append(b)
            trial = chosen.copy()
            trial[[i for i, x in enumerate(block_of) if x == b]] = up
            if cost[np.arange(len(names)), trial].sum() > budget:
                break
            chosen = trial
    return {n: choices[j] for n, j in zip(names, chosen)}
