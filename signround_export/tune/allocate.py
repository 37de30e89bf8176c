"""A grid per layer under a byte budget of the deployed file, chosen by the measured end-to-end loss.

Each decoder-block linear l picks one choice c of its target's table (costs.py: a (bits, block) of
ONNX MatMulNBits or a GGUF type), costing c[l, c] bytes in the file. The loss is KL(float || rounded
model) on a few calibration windows (kl_probe.py), measured, not assumed additive:

1. base: of the uniform choices that fit the budget, the one of least measured KL (or, where none
   fits, each layer's cheapest); its KL, K0.
2. sensitivity: for each layer alone, the KL when it drops one step to its next cheaper choice (the
   next dearer one where the base is its cheapest) with every other layer at the base: the layer's
   loss per unit of its own output error, lambda_l = dKL / d(output error). Measured in the context
   of the other layers rounded, so that it sees how errors compound.
3. predicted loss e[l, c] = lambda_l * (output error of l at c) (the layer's input-weighted rounding
   error, kl_probe.output_error), for the choices no cheaper than the measured step (the model does
   not extrapolate below it: a 2-bit type's loss is not a 3-bit type's scaled by their weight
   errors), and the exact multiple-choice knapsack on it: minimise sum e[l, c_l]
   under sum c[l, c_l] <= budget, by dynamic programming over the budget cut into `resolution` units,
   costs rounded up (the answer always fits). Predicted KL = K0 * sum e[l, c_l] / sum e[l, base_l]
   (the summed model scaled to the base's measured KL); the Lagrangian dual, scaled alike, bounds it
   from below.
4. correction: measure the answer's KL; then, from it or the base, whichever measured less, greedily
   try the moves the model thinks cheapest
   (one layer a step up and another a step down, or one step up into slack), `tries` per round, and
   keep the best one while the measured KL falls.
5. the answer: the assignment of least measured KL among the base, the knapsack's and the corrected
   one, so it is never worse, by the measured loss, than any uniform choice that fits.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..checkpoint.qweight import SUPPORTED_BITS
from ..errors import TuneError
from .costs import Choice

# a layer's cost table: {label: (choice, bytes)}, cheapest first (costs.layer_costs)
Table = dict[str, dict[str, tuple[Choice, int]]]


@dataclass
class Allocation:
    choices: dict[str, str]  # layer name -> choice label
    target: str  # "onnx" or "gguf"
    nbytes: int  # the chosen layers' bytes in the target file
    budget: int  # the bytes asked
    n_weights: int
    bpw: dict[str, float]  # layer name -> its bits per weight in the file
    uniform: str | None  # the base's label, when the base is one choice for all
    uniform_kl: float  # measured KL of the base
    predicted: float  # predicted KL of the knapsack's answer
    knapsack_kl: float  # its measured KL
    measured: float  # measured KL of `choices`
    lower_bound: float  # no assignment within the budget has a smaller predicted KL
    moves: list[dict] = field(default_factory=list)  # the correction pass's kept moves
    uniform_kls: dict[str, float] = field(default_factory=dict)  # measured KL of each uniform choice that fits
    evaluations: int = 0  # KL measurements made

    @property
    def avg_bits(self) -> float:
        return 8 * self.nbytes / self.n_weights

    def counts(self) -> dict[str, int]:
        values = list(self.choices.values())
        return {c: values.count(c) for c in sorted(set(values))}

    def table(self) -> str:
        lines = [f"{'layer':48s} choice"] + [f"{n:48s} {c}" for n, c in self.choices.items()]
        lines.append(
            f"{len(self.choices)} layers: " + ", ".join(f"{n} {c}" for c, n in self.counts().items())
            + f"; {self.nbytes / 1e6:.3f} MB, {self.avg_bits:.4f} bits per weight in the {self.target} file "
              f"(budget {self.budget / 1e6:.3f} MB). KL on the calibration windows: uniform {self.uniform} "
              f"{self.uniform_kl:.5g}; knapsack predicted {self.predicted:.5g} (bound {self.lower_bound:.5g}), "
              f"measured {self.knapsack_kl:.5g}; after {len(self.moves)} moves {self.measured:.5g} "
              f"({self.evaluations} measurements)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return asdict(self) | {"avg_bits": self.avg_bits}

    @classmethod
    def from_json(cls, d: dict) -> "Allocation":
        return cls(**{k: v for k, v in d.items() if k != "avg_bits"})


def read_allocation(path: str | Path, layers: list[str]) -> dict[str, int]:
    """Bits per layer from a JSON file {"bits": {layer: bits}}; every name must be one of `layers`."""
    try:
        record = json.loads(Path(path).read_text())
        bits = {str(k): int(v) for k, v in record["bits"].items()}
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


def knapsack(cost: np.ndarray, error: np.ndarray, budget: float, resolution: int = 20000) -> np.ndarray:
    """The column per row of least summed error whose summed cost fits the budget, exactly on the grid of
    `resolution` units with costs rounded up. cost, error: [layers, choices], inf where a layer does not
    admit a choice (or may not take it). The caller has checked that the cheapest allowed choices fit."""
    unit = budget / resolution
    admissible = np.isfinite(cost) & np.isfinite(error)
    units = np.where(admissible, np.ceil(np.where(admissible, cost, 0) / unit - 1e-9), resolution + 1).astype(np.int64)
    best = np.zeros(resolution + 1)  # best[u]: least error of the layers so far within u units
    pick = np.zeros((len(cost), resolution + 1), dtype=np.int16)
    for l in range(len(cost)):
        cur, arg = np.full(resolution + 1, np.inf), np.zeros(resolution + 1, dtype=np.int16)
        for j in np.flatnonzero(units[l] <= resolution):
            cand = np.full(resolution + 1, np.inf)
            cand[units[l, j]:] = best[: resolution + 1 - units[l, j]] + error[l, j]
            better = cand < cur
            cur[better], arg[better] = cand[better], j
        best, pick[l] = cur, arg
    if not np.isfinite(best[resolution]):  # the grid's rounding ate the slack: the cheapest choices fit
        return np.where(admissible, cost, np.inf).argmin(axis=1)
    chosen, u = np.zeros(len(cost), dtype=np.int64), resolution
    for l in range(len(cost) - 1, -1, -1):
        chosen[l] = pick[l, u]
        u -= units[l, chosen[l]]
    return chosen


def lagrangian_bound(cost: np.ndarray, error: np.ndarray, budget: float) -> float:
    """max over lambda >= 0 of sum_l min_c (e + lambda c) - lambda * budget: a lower bound on the optimum.

    The dual is concave and piecewise linear in lambda; its maximum is where the chosen cost crosses the
    budget, found by bisection on log lambda. Inadmissible choices (inf cost) are never taken."""
    admissible = np.isfinite(cost)
    cost0, rows = np.where(admissible, cost, 0.0), np.arange(len(cost))

    def dual(lam: float) -> tuple[float, float]:
        v = np.where(admissible, error + lam * cost0, np.inf)
        j = v.argmin(axis=1)
        return float(v[rows, j].sum() - lam * budget), float(cost0[rows, j].sum())

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


@dataclass
class Problem:
    """A cost table as arrays: layers x the union of their choices' labels, cheapest labels first."""

    names: list[str]
    labels: list[str]
    cost: np.ndarray  # bytes [layers, labels], inf where the layer does not admit the label
    table: Table
    order: list[list[int]]  # each layer's admissible columns, cheapest first

    @classmethod
    def of(cls, table: Table) -> "Problem":
        names = list(table)
        labels = sorted({c for costs in table.values() for c in costs},
                        key=lambda c: (min(costs[c][1] for costs in table.values() if c in costs), c))
        cost = np.array([[table[n][c][1] if c in table[n] else np.inf for c in labels] for n in names])
        order = [[int(c) for c in np.argsort(row, kind="stable") if np.isfinite(row[c])] for row in cost]
        return cls(names, labels, cost, table, order)

    def total(self, chosen: np.ndarray) -> int:
        return int(self.cost[np.arange(len(self.names)), chosen].sum())

    def schemes(self, chosen: np.ndarray) -> dict:
        return {n: self.table[n][self.labels[j]][0].scheme for n, j in zip(self.names, chosen)}

    def step(self, l: int, j: int, up: bool) -> int | None:
        """Layer l's next dearer (up) or cheaper choice than column j, if it has one."""
        order = self.order[l]
        i = order.index(j) + (1 if up else -1)
        return order[i] if 0 <= i < len(order) else None

    def check_budget(self, budget: float, unit: str, param: str = "size_mb") -> None:
        """Refuse a budget below the smallest or at or above the largest file the choices make."""
        small, large = np.where(np.isfinite(self.cost), self.cost, np.inf).min(1).sum(), \
            np.where(np.isfinite(self.cost), self.cost, -np.inf).max(1).sum()
        if budget < small:
            raise TuneError(f"the budget ({unit}) is below the smallest file the choices make: "
                            f"{small / 1e6:.3f} MB of decoder-block linears with each at its cheapest; raise it",
                            param=param)
        if budget >= large:
            raise TuneError(f"the budget ({unit}) is at or above the largest file the choices make: "
                            f"{large / 1e6:.3f} MB with each layer at its dearest, which leaves nothing to choose; "
                            "give less, or tune every layer at its dearest choice", param=param)


def allocate(probe, table: Table, shapes: dict[str, tuple[int, int]], budget: float, target: str,
             tries: int = 6, rounds: int = 4, note=lambda message: None) -> Allocation:
    """The steps of the module's docstring, on a KLProbe over the layers of `table` ([N, K] in shapes);
    budget in bytes, checked by the caller (Problem.check_budget)."""
    prob = Problem.of(table)
    rows, L = np.arange(len(prob.names)), len(prob.names)
    uniform = [j for j in range(len(prob.labels))
               if np.isfinite(prob.cost[:, j]).all() and prob.cost[:, j].sum() <= budget]
    uniform_kls = {prob.labels[j]: probe.pin(prob.schemes(np.full(L, j))) for j in uniform}
    if uniform:  # a dearer grid is not always better (a model published on one grid favours it)
        base_label = min(uniform_kls, key=uniform_kls.get)
        base = np.full(L, prob.labels.index(base_label))
    else:
        base_label, base = None, np.where(np.isfinite(prob.cost), prob.cost, np.inf).argmin(1)
    base_kl = probe.pin(prob.schemes(base))
    note(f"allocation: base {base_label or 'cheapest per layer'}, KL {base_kl:.5g}; measuring each layer one step off it")

    out_err = np.full(prob.cost.shape, np.inf)
    for l, n in enumerate(prob.names):
        for j in np.flatnonzero(np.isfinite(prob.cost[l])):
            out_err[l, j] = probe.output_error(n, table[n][prob.labels[j]][0].scheme)
    scale, floor = np.zeros(L), prob.cost[rows, base].copy()  # floor: each layer's cheapest measured cost
    for l, n in enumerate(prob.names):
        ref = prob.step(l, base[l], up=False)
        floor[l] = prob.cost[l, ref] if ref is not None else floor[l]
        ref = ref if ref is not None else prob.step(l, base[l], up=True)
        if ref is None:  # one choice only: nothing to scale
            continue
        d_kl = probe.kl({n: table[n][prob.labels[ref]][0].scheme}) - base_kl
        d_err = out_err[l, ref] - out_err[l, base[l]]
        # a rounding error that happens to help is not a layer that errors cannot hurt: floor at a hair
        scale[l] = max(d_kl / d_err if d_err else 0.0, 0.0) or 1e-12 / max(abs(d_err), 1e-30)
    error = np.where(np.isfinite(prob.cost), scale[:, None] * np.where(np.isfinite(out_err), out_err, 0), np.inf)
    # no extrapolation below what was measured: a layer goes at most one step under the base
    error[np.isfinite(prob.cost) & (prob.cost < floor[:, None])] = np.inf

    chosen = knapsack(prob.cost, error, budget)
    # the model's summed errors, scaled to the base's measured KL
    calibrate = base_kl / max(float(error[rows, base].sum()), 1e-300)
    predicted = calibrate * float(error[rows, chosen].sum())
    bound = calibrate * lagrangian_bound(prob.cost, error, budget)
    knapsack_kl = probe.pin(prob.schemes(chosen))
    note(f"allocation: knapsack predicts KL {predicted:.5g}, measured {knapsack_kl:.5g}")
    current, current_kl, moves, tried = chosen.copy(), knapsack_kl, [], set()
    if base_kl < knapsack_kl:  # the model misled the knapsack: correct from the base instead
        current, current_kl = base.copy(), probe.pin(prob.schemes(base))
    for _ in range(rounds):
        candidates = []
        slack = budget - prob.total(current)
        for i in range(L):
            up = prob.step(i, current[i], up=True)
            if up is None:
                continue
            extra, gain = prob.cost[i, up] - prob.cost[i, current[i]], error[i, up] - error[i, current[i]]
            if extra <= slack:
                candidates.append((gain, ((i, up),)))
            for j in range(L):
                down = prob.step(j, current[j], up=False) if j != i else None
                if down is not None and extra + prob.cost[j, down] - prob.cost[j, current[j]] <= slack:
                    candidates.append((gain + error[j, down] - error[j, current[j]], ((i, up), (j, down))))
        candidates = [c for c in sorted(candidates, key=lambda c: c[0]) if (tuple(current), c[1]) not in tried][:tries]
        best = None
        for predicted_change, move in candidates:
            tried.add((tuple(current), move))
            kl = probe.kl({prob.names[l]: table[prob.names[l]][prob.labels[j]][0].scheme for l, j in move})
            if kl < current_kl and (best is None or kl < best[0]):
                best = (kl, move)
        if best is None:
            break
        for l, j in best[1]:
            moves.append({"layer": prob.names[l], "from": prob.labels[current[l]], "to": prob.labels[j]})
            current[l] = j
        moves[-1]["kl"] = best[0]
        current_kl = probe.pin(prob.schemes(current))
        note(f"allocation: move {' and '.join(f'{prob.names[l]} -> {prob.labels[j]}' for l, j in best[1])}: "
             f"KL {current_kl:.5g}")
    final, final_kl = min(((base, base_kl), (chosen, knapsack_kl), (current, current_kl)), key=lambda a: a[1])
    return Allocation(
        choices={n: prob.labels[j] for n, j in zip(prob.names, final)}, target=target, nbytes=prob.total(final),
        budget=int(budget), n_weights=sum(n * k for n, k in shapes.values()),
        bpw={n: 8 * float(prob.cost[l, final[l]]) / math.prod(shapes[n]) for l, n in enumerate(prob.names)},
        uniform=base_label, uniform_kl=base_kl, predicted=predicted, knapsack_kl=knapsack_kl, measured=final_kl,
        lower_bound=bound, moves=moves if final is current else [], uniform_kls=uniform_kls,
        evaluations=probe.evaluations)
