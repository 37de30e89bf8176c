"""Logits of each kind of model over windows of token ids, each window from an empty cache.

| runner    | model                                                               |
| --------- | ------------------------------------------------------------------- |
| torch     | a PyTorch Model: the float source, or a checkpoint's reference      |
| onnx      | an exported ONNX folder through onnxruntime (signround_runtime)     |
| llama.cpp | a GGUF file through llama-cpp-python                                |
| numpy     | a GGUF file's weights dequantized by gguf-py, run in the PyTorch forward |

A runner takes every window at once and yields their logits one window at a time: the PyTorch models
run block by block over all windows (one block's weights in memory), the files window by window.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from signround_runtime import Model as RuntimeModel
from signround_runtime import RuntimeModelError

from ..errors import ValidationError
from ..model.config import ModelConfig
from ..model.forward import Model
from ..model.store import Lazy

GGUF_RUNNERS = ("auto", "llama.cpp", "numpy")


@dataclass
class Runner:
    logits: Callable[[torch.Tensor], Iterator[torch.Tensor]]  # windows [n, T] -> float32 logits [T, V] of each
    description: str  # what produces the logits, with versions


def torch_runner(model: Model, description: str, progress: bool = False) -> Runner:
    """A PyTorch model over the windows block by block, each window a batch of one as a forward of that
    window alone runs it (the same figures), the head applied to one window at a time."""
    def logits(windows: torch.Tensor) -> Iterator[torch.Tensor]:
        for x in model.stream_logits([ids[None] for ids in windows], progress):
            yield x[0]
            del x  # before the next window's logits are made

    return Runner(logits, description)


def onnx_runner(folder) -> Runner:
    """An exported ONNX folder, the whole window in one run; the session is made when the windows come
    and released after the last one (validation runs one model at a time). Its files' digests are not
    checked here: validate checks them once, before any model runs."""
    import onnxruntime as ort

    def logits(windows: torch.Tensor) -> Iterator[torch.Tensor]:
        try:
            model = RuntimeModel(folder, verify=False)
        except RuntimeModelError as e:
            raise ValidationError(f"onnx: {e}", param="onnx") from None
        for ids in windows:
            yield torch.from_numpy(np.asarray(model.logits(ids.numpy()), dtype=np.float32))

    return Runner(logits, f"onnxruntime {ort.__version__}")


def llama_cpp_runner(path, n_ctx: int) -> Runner:
    """A GGUF file in llama.cpp, the cache reset before each window; loaded when the windows come and
    released after the last one."""
    import llama_cpp

    def logits(windows: torch.Tensor) -> Iterator[torch.Tensor]:
        try:
            llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, n_batch=n_ctx,
                                  verbose=False)
        except Exception as e:  # llama-cpp-python raises ValueError/RuntimeError with little detail
            raise ValidationError(f"gguf {path}: llama.cpp cannot load the file ({e})", param="gguf") from None
        for ids in windows:
            llm.reset()
            llm.eval(ids.tolist())
            yield torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        llm.close()

    return Runner(logits, f"llama.cpp (llama-cpp-python {llama_cpp.__version__})")


def numpy_gguf_runner(cfg: ModelConfig, weights: Mapping[str, np.ndarray], progress: bool = False) -> Runner:
    """A GGUF file's own weights (gguf-py dequantization, a tensor when the forward reaches it) in the
    PyTorch forward: checks the file's contents without llama.cpp's 8-bit activations."""
    model = Model(cfg, Lazy(weights, lambda name: torch.from_numpy(np.array(weights[name], dtype=np.float32))))
    return torch_runner(model, f"gguf-py {version('gguf')} dequantization + PyTorch (float32)", progress)


def gguf_runner_kind(choice: str) -> str:
    """"llama.cpp" or "numpy" for gguf_runner=choice: auto takes llama.cpp when it is installed."""
    if choice not in GGUF_RUNNERS:
        raise ValidationError(f"gguf_runner {choice!r}: choose one of {', '.join(GGUF_RUNNERS)}", param="gguf_runner")
    try:
        import llama_cpp  # noqa: F401

        have_llama = True
    except ImportError:
        have_llama = False
    if choice == "llama.cpp" and not have_llama:
        raise ValidationError("gguf_runner 'llama.cpp': llama-cpp-python is not installed (make setup installs it)",
                              param="gguf_runner")
    return "llama.cpp" if choice in ("auto", "llama.cpp") and have_llama else "numpy"


def check_gguf_path(path) -> None:
    if not Path(path).is_file():
        raise ValidationError(f"gguf {path}: no such file", param="gguf")
