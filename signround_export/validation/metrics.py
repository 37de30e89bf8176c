"""The figures computed from logits: perplexity, top-1 agreement and KL against a reference.

One protocol everywhere: non-overlapping windows of the token ids, no BOS added, the first N windows;
every position but a window's last predicts the next token.

| figure   | definition                                                              |
| -------- | ----------------------------------------------------------------------- |
| ppl      | exp(mean next-token negative log-likelihood) of the model itself        |
| top1     | fraction of positions where argmax equals the reference's argmax        |
| kl_mean  | mean over positions of KL(reference || model) of the next-token softmax |
| kl_max   | the largest of those                                                    |
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data import evaluation_ids
from ..errors import DataError
from ..model.folder import resolve_model_dir
from ..model.forward import Model
from ..model.load import load_any


def windows(ids: torch.Tensor, window: int, max_windows: int | None) -> torch.Tensor:
    """The first max_windows (all when None) non-overlapping windows of the ids: [n, window]."""
    n = ids.numel() // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise DataError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {window}; "
                        "give a longer text or a smaller window", param="text")
    return ids[: n * window].view(n, window)


def next_token_logp(logits: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of the logits [..., T, V] at every position but the last: [N, V]."""
    return F.log_softmax(logits[..., :-1, :].reshape(-1, logits.shape[-1]).float(), dim=-1)


def next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """The tokens those positions predict: [N]."""
    return ids[..., 1:].reshape(-1)


@dataclass
class NLL:
    """Running sum of next-token negative log-likelihoods; perplexity = exp(total / count).

    Each sum is a float32 reduction, so its order shows in the last digits. `add` sums with nll_loss's
    cascaded order (how `perplexity` sums a batch of windows), `add_gathered` is a plain tensor sum of the
    gathered log-probabilities (how validation sums one window): each figure keeps its own order, so
    published figures reproduce to the last digit."""

    total: float = 0.0
    count: int = 0

    def add(self, logp: torch.Tensor, targets: torch.Tensor) -> None:
        self.total += F.nll_loss(logp, targets, reduction="sum").item()
        self.count += len(targets)

    def add_gathered(self, logp: torch.Tensor) -> None:
        """The log-probabilities of the targets, gathered: [N]."""
        self.total += float(-logp.sum())
        self.count += len(logp)

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def ppl(self) -> float:
        return math.exp(self.mean)


@dataclass
class Scores:
    ppl: float
    top1: float | None = None  # None for the reference itself
    kl_mean: float | None = None
    kl_max: float | None = None
    tokens: int = 0


class Accumulator:
    """Running figures of one model over windows, against a reference's logits when given."""

    def __init__(self):
        self.nll = NLL()
        self.agree = 0
        self.kl_sum = 0.0
        self.kl_max = 0.0

    def add(self, ids: torch.Tensor, logits: torch.Tensor, ref_logits: torch.Tensor | None) -> None:
        """One window: token ids [T], logits [T, V], the reference's logits [T, V] or None.

        Positions are taken ROWS at a time (a log-softmax and the KL terms of a whole window are several
        [T, V] temporaries: 1.3 GB at T = 512 and a 128k vocabulary); each position's figures are
        computed as for the whole window and summed once, so the figures do not depend on ROWS."""
        targets = next_tokens(ids)
        nll, kl, agree = torch.empty(len(targets)), torch.empty(len(targets)), 0
        for a in range(0, len(targets), self.ROWS):
            b = min(a + self.ROWS, len(targets))
            logp = next_token_logp(logits[a : b + 1])
            nll[a:b] = logp.gather(1, targets[a:b, None])[:, 0]
            if ref_logits is not None:
                ref = next_token_logp(ref_logits[a : b + 1])
                kl[a:b] = (ref.exp() * (ref - logp)).sum(-1).clamp(min=0)
                agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        self.nll.add_gathered(nll)
        if ref_logits is not None:
            self.kl_sum += float(kl.sum())
            self.kl_max = max(self.kl_max, float(kl.max()))
            self.agree += agree

    ROWS = 64

    def scores(self, against_reference: bool) -> Scores:
        count = self.nll.count
        if not against_reference:
            return Scores(ppl=self.nll.ppl, tokens=count)
        n = max(count, 1)
        return Scores(ppl=self.nll.ppl, top1=self.agree / n, kl_mean=self.kl_sum / n, kl_max=self.kl_max, tokens=count)


class SpooledLogits:
    """One model's logits of every window, in a temporary file: appended a window at a time, read back a
    window at a time, so that the models compared against it need not run beside it."""

    def __init__(self, folder: Path, name: str):
        self.path = folder / f"{name}.logits"
        self.shapes: list[tuple[int, ...]] = []
        self.offsets: list[int] = []

    def append(self, logits: torch.Tensor) -> None:
        array = logits.numpy()
        self.offsets.append(self.path.stat().st_size if self.offsets else 0)
        self.shapes.append(array.shape)
        with self.path.open("ab") as f:
            array.tofile(f)

    def __getitem__(self, i: int) -> torch.Tensor:
        shape = self.shapes[i]
        array = np.fromfile(self.path, dtype=np.float32, count=math.prod(shape), offset=self.offsets[i])
        return torch.from_numpy(array.reshape(shape))


def compare(models: dict[str, Callable[[torch.Tensor], Iterator[torch.Tensor]]], pairs: list[tuple[str, str | None]],
            windows: torch.Tensor, progress: bool = False) -> dict[tuple[str, str | None], Scores]:
    """Scores of each (model, against) pair over the windows [n, T], each model yielding the float32 logits
    [T, V] of one window at a time (validation.runners): against None gives the perplexity alone, against
    another model adds top-1 and KL against that model's logits. The models run one after another, in
    the order given (a model compared against comes before the models compared with it): the logits of
    those compared against are spooled to a temporary file and read back a window at a time, so one model
    is loaded and one window's logits of each model exist at once."""
    accs = {pair: Accumulator() for pair in pairs}
    bar = tqdm(total=len(models) * len(windows), desc="validate", unit="window", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="signround-logits-") as tmp:
        spooled = {other: SpooledLogits(Path(tmp), other) for _, other in pairs if other is not None}
        for name, run in models.items():
            bar.set_postfix_str(name)
            for i, logits in enumerate(run(windows)):
                for (model, other), acc in accs.items():
                    if model == name:
                        acc.add(windows[i], logits, None if other is None else spooled[other][i])
                if name in spooled:
                    spooled[name].append(logits)
                del logits
                bar.update()
    bar.close()
    return {pair: acc.scores(pair[1] is not None) for pair, acc in accs.items()}


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


def perplexity(model: Model, ids: torch.Tensor, window: int = 512, max_windows: int | None = 40,
               batch: int = 4, progress: bool = True) -> Perplexity:
    """Perplexity of a PyTorch model over the first max_windows windows of ids, batch windows per forward
    pass of a block: every batch goes through the model block by block (one block's weights in memory),
    then through the head one batch at a time."""
    w = windows(ids, window, max_windows)
    batches = [w[start : start + batch] for start in range(0, len(w), batch)]
    nll = NLL()
    for x, logits in zip(batches, model.stream_logits(batches, progress)):
        nll.add(next_token_logp(logits), next_tokens(x))
        del logits
    return Perplexity(ppl=nll.ppl, nll=nll.mean, windows=len(w), window=window, tokens=nll.count)


def folder_perplexity(model, text=None, *, window: int = 512, max_windows: int | None = 40,
                      progress: bool = True, verify: bool = True) -> tuple[Perplexity, str]:
    """Perplexity of a float model (folder or hub id) or of a checkpoint's reference over text (a file;
    default: the held-out slice of the calibration text), with "float model" or "checkpoint reference"."""
    folder = resolve_model_dir(model)
    loaded, kind = load_any(folder, verify)
    ids = evaluation_ids(folder, text)
    return perplexity(loaded, ids, window, max_windows, progress=progress), kind
