"""Choosing the next token from logits: greedy, or sampling with temperature, top-k, top-p and a
repetition penalty, all in numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence
    seed: int | None = None

    def check(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty}")


def penalize(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL's repetition penalty: positive logits of seen tokens divided by it, negative multiplied."""
    if penalty == 1.0 or seen.size == 0:
        return logits
    out = logits.copy()
    ids = np.unique(seen)
    out[ids] = np.where(out[ids] > 0, out[ids] / penalty, out[ids] * penalty)
    return out


def choose(logits: np.ndarray, s: Sampling, rng: np.random.Generator, seen: np.ndarray) -> int:
    """The next token from float logits [V]."""
    with np.errstate(over="ignore"):
        logits = penalize(np.asarray(logits, dtype=np.float64), seen, s.repetition_penalty)
        if s.temperature == 0:
            return int(logits.argmax())
        scaled = logits / s.temperature
    if not np.isfinite(scaled.max()):  # overflow (a temperature or penalty near 0): take the limit, greedy
        return int(logits.argmax())
    logits = scaled
    if s.top_k:
        kth = np.partition(logits, -min(s.top_k, logits.size))[-min(s.top_k, logits.size)]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if s.top_p < 1:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < s.top_p  # the smallest prefix reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
