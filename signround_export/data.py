"""Text for calibration and evaluation, and the tokenizer that turns it into ids.

The default calibration text is CPython's own `pydoc_data.topics` (the help() pages), present in
every Python, so tuning needs no download. Every tenth topic is held out of calibration and serves
as the default evaluation text.
"""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics as PYDOC_TOPICS

import torch
from tokenizers import Tokenizer

from .errors import DataError


def _topics() -> list[str]:
    return [PYDOC_TOPICS[k] for k in sorted(PYDOC_TOPICS)]


def default_calibration_text() -> str:
    return "\n\n".join(t for i, t in enumerate(_topics()) if i % 10 != 9)


def heldout_text() -> str:
    return "\n\n".join(t for i, t in enumerate(_topics()) if i % 10 == 9)


def read_text(path: str | Path) -> str:
    """A plain text file, or JSON lines with a "text" field per line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"text file {path} does not exist")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
    return "\n\n".join(texts)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{folder} has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for a file it cannot parse
        raise DataError(f"{path} is not a readable tokenizer ({str(e)[:200]}); the file is damaged: copy it "
                        "again from the source model") from None


def encode(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """Token ids of the text, with no BOS or other special tokens added."""
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False).ids, dtype=torch.long)


def calibration_samples(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples distinct non-overlapping windows of seqlen tokens, chosen with the seed: [nsamples, seqlen]."""
    n_windows = ids.numel() // seqlen
    if n_windows < nsamples:
        raise DataError(
            f"the calibration text gives {n_windows} windows of {seqlen} tokens, fewer than `nsamples` {nsamples}; "
            "lower `nsamples` or `seqlen`, or give a longer `calib` file", param="nsamples"
        )
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n_windows, generator=g)[:nsamples].sort().values
    return ids[: n_windows * seqlen].view(n_windows, seqlen)[pick]


def calibration_ids(folder: str | Path, nsamples: int, seqlen: int, seed: int,
                    path: str | Path | None = None) -> torch.Tensor:
    """calibration_samples of the text at path (default: default_calibration_text), tokenized with the
    tokenizer of the model folder."""
    tokenizer = load_tokenizer(folder)
    text = read_text(path) if path else default_calibration_text()
    return calibration_samples(encode(tokenizer, text), nsamples, seqlen, seed)


def evaluation_ids(folder: str | Path, path: str | Path | None = None) -> torch.Tensor:
    """Token ids of the text at path (default: heldout_text), tokenized with the tokenizer of the
    model folder."""
    return encode(load_tokenizer(folder), read_text(path) if path else heldout_text())
