"""How much each linear layer's quantization error at each bit width would cost, from calibration data.

For layer l with float weight W and its round-to-nearest weight Q_b(W) at b bits, dW = W - Q_b(W):

| measure    | score e[l, b]                                   | needs                               |
| ---------- | ----------------------------------------------- | ----------------------------------- |
| gradient   | sum over batches s of |g_s . dW|                | a backward pass of the LM loss per batch |
| fisher     | sum over batches s of (g_s . dW)^2              | the same pass (computed alongside)  |
| activation | sum over k of E[x_k^2] * sum over n of dW[n,k]^2 | forward passes only                 |

g_s is the gradient of the next-token loss of batch s with respect to W; g_s . dW is the first-order
change of that batch's loss when W is replaced by Q_b(W). `fisher` is the second-order (empirical
Fisher) estimate of the same change. `activation` is the layer's own output error for the inputs it
sees, which ignores how much the loss cares about that layer's output: cheap, and not comparable
across layers as well. docs/benchmarks.md says which one the allocation uses by default and why.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint.qweight import Scheme
from ..errors import TuneError
from ..model.forward import Model, block_forward
from ..model.load import in_memory
from .quantizer import quantize

MEASURES = ("gradient", "fisher", "activation")


def block_linear_names(model: Model) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(model.cfg.n_layers) for n in model.cfg.family.linears]


def rtn_error(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    with torch.no_grad():
        return w - quantize(w, Scheme(bits, group_size, sym)).weight


def importance(model: Model, calib: torch.Tensor, choices: list[int], group_size: int, sym: bool,
               measure: str, batch_size: int = 4, progress: bool = True) -> tuple[list[str], np.ndarray]:
    """(layer names, scores [layers, choices]) of every decoder-block linear."""
    if measure not in MEASURES:
        raise TuneError(f"`importance` {measure!r}: choose one of {', '.join(MEASURES)}", param="importance")
    model = in_memory(model)  # the weights read once: the activation measure finds them again by identity
    names = block_linear_names(model)
    weights = {n: model.tensors[n + ".weight"] for n in names}
    errors = {n: [rtn_error(w, b, group_size, sym) for b in choices] for n, w in weights.items()}
    batches = [calib[i : i + batch_size] for i in range(0, len(calib), batch_size)]
    scores = np.zeros((len(names), len(choices)))
    bar = tqdm(batches, desc=f"importance ({measure})", unit="batch", disable=not progress)
    if measure == "activation":
        sq = _input_second_moments(model, weights, bar)
        for li, n in enumerate(names):
            for j, dw in enumerate(errors[n]):
                scores[li, j] = float((dw.pow(2).sum(0) * sq[n]).sum())
        return names, scores
    for ids in bar:
        grads = _loss_gradients(model, weights, ids)
        for li, n in enumerate(names):
            for j, dw in enumerate(errors[n]):
                d = float((grads[n] * dw).sum())
                scores[li, j] += abs(d) if measure == "gradient" else d * d
    return names, scores


def _forward(model: Model, p_override: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Logits with some weights replaced (so that gradients reach the replacements)."""
    cfg = model.cfg
    x = model.embed(ids)
    ropes = model.ropes(ids.shape[1], x.device)
    for i in range(cfg.n_layers):
        p = model.block_params(i)
        prefix = f"model.layers.{i}."
        p.update({n[len(prefix):]: t for n, t in p_override.items() if n.startswith(prefix)})
        x = block_forward(cfg, p, x, *ropes[i], window=cfg.window(i))
    return model.head(x)


def _loss_gradients(model: Model, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> dict[str, torch.Tensor]:
    leaves = {n + ".weight": w.detach().requires_grad_(True) for n, w in weights.items()}
    logits = _forward(model, leaves, ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    loss.backward()
    return {n: leaves[n + ".weight"].grad for n in weights}


class _LinearInputs(torch.overrides.TorchFunctionMode):
    """Sums x_k^2 over every token that enters F.linear with one of the watched weights."""

    def __init__(self, weights: dict[str, torch.Tensor]):
        super().__init__()
        self.by_id = {id(w): n for n, w in weights.items()}
        self.sums = {n: torch.zeros(w.shape[1]) for n, w in weights.items()}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.linear and id(args[1]) in self.by_id:
            x = args[0].detach()
            self.sums[self.by_id[id(args[1])]] += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def _input_second_moments(model: Model, weights: dict[str, torch.Tensor], batches) -> dict[str, torch.Tensor]:
    counter = _LinearInputs(weights)
    tokens = 0
    with counter:
        for ids in batches:
            _forward(model, {}, ids)
            tokens += ids.numel()
    return {n: s / tokens for n, s in counter.sums.items()}
