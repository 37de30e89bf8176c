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

Memory is a tuning run's: one block's weights, rounding errors and gradients at a time. The gradient
measures take one batch at a time: a forward pass keeps each block's input, the head's gradient is taken a
sequence at a time (one sequence's logits at once), and the backward runs one block at a time from the
block's kept input, its weights read again and its layers' errors rounded when it is reached. The
activation measure runs every batch through one block before the next block's weights are read.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint.qweight import Scheme
from ..errors import TuneError
from ..model.forward import Model, block_forward
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
    names = block_linear_names(model)
    row = {n: li for li, n in enumerate(names)}
    batches = [calib[i : i + batch_size] for i in range(0, len(calib), batch_size)]
    scores = np.zeros((len(names), len(choices)))

    def errors(i: int, weights: dict[str, torch.Tensor]):
        """(row in scores, the layer's statistic name, its rounding error at each choice) of block i's
        linears, rounded now: one block's errors exist at a time."""
        for n, w in weights.items():
            yield row[f"model.layers.{i}.{n}"], n, [rtn_error(w, b, group_size, sym) for b in choices]

    if measure == "activation":
        blocks = tqdm(range(model.cfg.n_layers), desc="importance (activation)", unit="block", disable=not progress)
        for i, moments, weights in _input_second_moments(model, batches, blocks):
            for li, n, dws in errors(i, weights):
                for j, dw in enumerate(dws):
                    scores[li, j] = float((dw.pow(2).sum(0) * moments[n]).sum())
        return names, scores
    for ids in tqdm(batches, desc=f"importance ({measure})", unit="batch", disable=not progress):
        for i, grads, weights in _loss_gradients(model, ids):
            for li, n, dws in errors(i, weights):
                for j, dw in enumerate(dws):
                    d = float((grads[n] * dw).sum())
                    scores[li, j] += abs(d) if measure == "gradient" else d * d
    return names, scores


def _block_leaves(model: Model, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Block i's tensors read (by name relative to the block), and its linears' weights among them made leaves
    that gradients reach (by linear name)."""
    p = model.block_params(i)
    leaves = {n: p[n + ".weight"].detach().requires_grad_(True) for n in model.cfg.family.linears}
    p.update({n + ".weight": w for n, w in leaves.items()})
    return p, leaves


def _block_inputs(model: Model, ids: torch.Tensor, ropes) -> list[torch.Tensor]:
    """Each block's input for the token ids, and the last block's output: the forward the backward starts
    from. Each block runs with its linears' weights as gradient leaves (the graph dropped at once), so
    that it takes the same kernels as the backward's rerun of it."""
    xs = [model.embed(ids)]
    for i in range(model.cfg.n_layers):
        p, _ = _block_leaves(model, i)
        with torch.enable_grad():
            xs.append(block_forward(model.cfg, p, xs[-1], *ropes[i], window=model.cfg.window(i)).detach())
    return xs


def _head_gradient(model: Model, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """d loss / d x for the last block's output x [B, T, H], loss the mean next-token cross-entropy of the
    batch, taken one sequence at a time: one sequence's logits exist at once (a batch of 8 x 512 tokens
    over a 49152-token vocabulary would be 0.8 GB, and as much again for their gradient)."""
    weights = model.head_weights()
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    grad = torch.zeros_like(x)
    for s in range(x.shape[0]):
        xs = x[s : s + 1].detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model.head(xs, weights)
            loss = F.cross_entropy(logits[0, :-1].float(), ids[s, 1:], reduction="sum") / tokens
            loss.backward()
        grad[s] = xs.grad[0]
    return grad


def _loss_gradients(model: Model, ids: torch.Tensor):
    """(block index, {linear: d loss / d weight}, {linear: weight}) of each block, last block first, for the
    next-token loss of one batch of token ids: the backward one block at a time from its kept input."""
    ropes = model.ropes(ids.shape[1])
    xs = _block_inputs(model, ids, ropes)
    g = _head_gradient(model, xs.pop(), ids)
    for i in reversed(range(model.cfg.n_layers)):
        p, leaves = _block_leaves(model, i)
        x = xs.pop().requires_grad_(True)
        with torch.enable_grad():
            block_forward(model.cfg, p, x, *ropes[i], window=model.cfg.window(i)).backward(g)
        g = x.grad
        yield i, {n: w.grad for n, w in leaves.items()}, {n: w.detach() for n, w in leaves.items()}
        del p, leaves


@torch.no_grad()
def _input_second_moments(model: Model, batches: list[torch.Tensor], blocks):
    """(block index, {linear: E[x_k^2] over every token it reads}, {linear: weight}) of each block in order:
    every batch through one block before the next block's weights are read."""
    xs = [model.embed(ids) for ids in batches]
    tokens = sum(ids.numel() for ids in batches)
    ropes = {t: model.ropes(t) for t in sorted({ids.shape[1] for ids in batches})}
    for i in blocks:
        p = model.block_params(i)
        sums: dict[str, torch.Tensor] = {}

        def tap(name: str, x: torch.Tensor) -> None:
            square = x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)
            sums[name] = sums[name] + square if name in sums else torch.zeros(x.shape[-1]) + square

        for j, x in enumerate(xs):
            xs[j] = block_forward(model.cfg, p, x, *ropes[x.shape[1]][i], tap=tap, window=model.cfg.window(i))
        yield i, {n: s / tokens for n, s in sums.items()}, {n: p[n + ".weight"] for n in model.cfg.family.linears}
        del p
