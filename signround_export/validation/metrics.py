"""Perplexity with one fixed protocol: non-overlapping windows, no BOS added, the first N windows."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model.forward import Model


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    windows: int
    window: int
    tokens: int  # predicted tokens

    def protocol(self) -> str:
        return f"{self.windows} non-overlapping windows of {self.window} tokens, no BOS, {self.tokens} predicted tokens"

    def to_dict(self) -> dict:
        return asdict(self) | {"protocol": self.protocol()}


def windows(ids: torch.Tensor, window: int, max_windows: int | None) -> torch.Tensor:
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {window}")
    return ids[: n * window].view(n, window)


def perplexity(model: Model, ids: torch.Tensor, window: int = 512, max_windows: int | None = 40,
               batch: int = 4, progress: bool = True) -> Perplexity:
    w = windows(ids, window, max_windows)
    total, count = 0.0, 0
    for start in tqdm(range(0, len(w), batch), desc="perplexity", unit="batch", disable=not progress):
        x = w[start : start + batch]
        logits = model.logits(x)
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    nll = total / count
    return Perplexity(ppl=math.exp(nll), nll=nll, windows=len(w), window=window, tokens=count)
