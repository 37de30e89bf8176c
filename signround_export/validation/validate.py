"""How far each deployed file is from the PyTorch reference of its checkpoint.

Every model (the reference, the float source when present, each artifact) runs over the same token
windows; metrics.py defines the figures, report.py the thresholds an artifact must meet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from signround_runtime.manifest import damaged

from ..checkpoint.format import Checkpoint
from ..data import evaluation_ids
from ..errors import GGUFExportError, ValidationError
from ..export.gguf.read import check_digests as check_gguf_digests
from ..model.config import ModelConfig
from ..model.load import load_float_model, open_checkpoint, reference_from_checkpoint
from .metrics import compare, windows
from .readback import LayerErrors, gguf_layer_errors, onnx_layer_errors, read_gguf
from .report import ArtifactReport, Thresholds, ValidationResult, judge, versions
from .runners import (
    Runner,
    check_gguf_path,
    gguf_runner_kind,
    llama_cpp_runner,
    numpy_gguf_runner,
    onnx_runner,
    torch_runner,
)

DEFAULT_TEXT = "the held-out slice of pydoc_data.topics"


@dataclass
class Candidate:
    """A model run over the windows, and how to read its weights back when it is an exported file."""

    name: str  # "reference", "float", "onnx", "gguf"
    path: str
    runner: Runner
    read_back: Callable[[], LayerErrors] | None = None


def validate(checkpoint, *, onnx=None, gguf=None, float_model=None, text=None, tokens: int = 2048,
             window: int = 512, thresholds: Thresholds = Thresholds(), gguf_runner: str = "auto",
             progress: bool = True, verify: bool = True) -> ValidationResult:
    """Run the checkpoint's reference, the float model (float_model, else the tuning log's source when
    that folder exists) and each artifact given over the first `tokens` tokens of text (default: the
    held-out slice of the calibration text) in windows of `window`; judge each artifact. verify: check
    the ONNX folder's files and the GGUF file's tensors against the digests written with them before any
    model runs, and the checkpoint's tensors as they are read; a damaged one is refused by name."""
    t0 = time.perf_counter()
    check_settings(tokens, window, gguf_runner)
    ckpt = open_checkpoint(checkpoint, verify)
    if verify:
        check_artifact_digests(onnx, gguf)
    w = evaluation_windows(checkpoint, text, tokens, window)
    models = candidates(ckpt, checkpoint, onnx, gguf, float_model, window, gguf_runner, progress)
    names = [m.name for m in models]
    scores = compare({m.name: m.runner.logits for m in models}, comparisons(names), w, progress)
    reports = [ArtifactReport(m.name, m.path, m.runner.description,
                              scores[(m.name, None if m.name == "reference" else "reference")],
                              vs_float=scores.get((m.name, "float"))) for m in models]
    for report, model in zip(reports, models):
        if model.read_back is not None:
            found = model.read_back()
            report.layer_errors, report.exact_layers, report.notes = found.errors, found.exact, found.notes
        if report.judged:
            report.failures = judge(report, reports[0].scores, thresholds)
    protocol = (f"{len(w)} non-overlapping windows of {window} tokens, no BOS, from {text or DEFAULT_TEXT}; "
                f"{sum(len(x) - 1 for x in w)} predicted tokens")
    return ValidationResult(str(checkpoint), protocol, thresholds, reports,
                            tuning_blocks=(ckpt.tuning_log or {}).get("blocks", []), versions=versions(),
                            seconds=round(time.perf_counter() - t0, 1), date=time.strftime("%Y-%m-%d %H:%M:%S"))


def check_artifact_digests(onnx, gguf) -> None:
    """The ONNX folder's files against its sha256sums.txt and the GGUF file's tensors against the digests
    in its metadata, before either is loaded (artifacts without digests pass)."""
    problem = damaged(onnx) if onnx is not None and Path(onnx).is_dir() else None
    if problem is not None:
        raise ValidationError(f"onnx: {problem}", param="onnx")
    if gguf is not None:
        check_gguf_path(gguf)
        try:
            check_gguf_digests(gguf)
        except GGUFExportError as e:
            raise ValidationError(f"gguf: {e}", param="gguf") from None


def check_settings(tokens: int, window: int, gguf_runner: str) -> None:
    if window < 1:
        raise ValidationError(f"window {window}: a window holds at least one token", param="window")
    if tokens < window:
        raise ValidationError(f"tokens {tokens} is less than one window of {window}; give more tokens or a "
                              "smaller window", param="tokens")
    gguf_runner_kind(gguf_runner)


def evaluation_windows(checkpoint, text, tokens: int, window: int) -> torch.Tensor:
    """The first tokens // window windows of the text, in the checkpoint's tokenizer: [n, window]."""
    ids = evaluation_ids(checkpoint, text)
    return windows(ids, window, tokens // window)


def comparisons(names: list[str]) -> list[tuple[str, str | None]]:
    """(model, against): the reference alone (perplexity only), every other model against the reference,
    and every artifact against the float model when present."""
    pairs = [("reference", None)] + [(n, "reference") for n in names if n != "reference"]
    if "float" in names:
        pairs += [(n, "float") for n in names if n not in ("reference", "float")]
    return pairs


def candidates(ckpt: Checkpoint, checkpoint, onnx, gguf, float_model, window: int, gguf_runner: str,
               progress: bool = False) -> list[Candidate]:
    """The reference, then the float model when there is one, then the ONNX folder and the GGUF file.
    The PyTorch models read each weight when their block-by-block forward reaches it."""
    out = [Candidate("reference", str(checkpoint), torch_runner(reference_from_checkpoint(ckpt),
                                                                "PyTorch (float32, dequantized integers)", progress))]
    source = float_source(ckpt, float_model)
    if source is not None:
        float_runner = torch_runner(load_float_model(source)[0], "PyTorch (float32)", progress)
        out.append(Candidate("float", str(source), float_runner))
    if onnx is not None:
        out.append(Candidate("onnx", str(onnx), onnx_runner(onnx), lambda: onnx_layer_errors(onnx, ckpt)))
    if gguf is not None:
        out.append(gguf_candidate(gguf, ckpt, window, gguf_runner, progress))
    return out


def float_source(ckpt: Checkpoint, float_model):
    """float_model, else the source the tuning log names when that folder is here; None without one."""
    if float_model is not None:
        if not Path(float_model).is_dir():
            raise ValidationError(f"float_model {float_model}: no such folder; give the float model the "
                                  "checkpoint was tuned from", param="float_model")
        return float_model
    source = (ckpt.tuning_log or {}).get("source_model")
    return source if source and Path(source).is_dir() else None


def gguf_candidate(path, ckpt: Checkpoint, window: int, gguf_runner: str, progress: bool = False) -> Candidate:
    """A GGUF file in llama.cpp (read back after the windows), or as its dequantized weights in PyTorch
    (the file opened once for both; each weight dequantized when it is used)."""
    check_gguf_path(path)
    if gguf_runner_kind(gguf_runner) == "llama.cpp":
        return Candidate("gguf", str(path), llama_cpp_runner(path, window),
                         lambda: gguf_layer_errors(path, ckpt, *read_gguf(path, ckpt)))
    weights, types = read_gguf(path, ckpt)
    return Candidate("gguf", str(path), numpy_gguf_runner(ModelConfig.from_hf(ckpt.hf_config), weights, progress),
                     lambda: gguf_layer_errors(path, ckpt, weights, types))
