"""The measured loss of a mixed allocation: KL of the rounded model against the float model on a few
calibration windows, end to end.

KL = mean over the windows' positions of sum_v p(v) (log p(v) - log q(v)), p the float model's
next-token distribution, q the model whose linears are rounded to nearest on each layer's chosen grid.
The blocks run over every position; the KL is read at every STRIDE-th one, since the head costs as
much as several blocks (SmolLM2's 49152 x 576 head, about eight of its blocks) and neighbouring
positions tell much the same.

The probe keeps the float log-probabilities, each linear's input second moments E[x_k^2] (read on the
float pass), and the block inputs of one pinned assignment: a measurement that changes a few layers
reruns only the blocks from the first changed one, with the pinned layers' rounded weights kept. It
holds the rounded weights of every linear in float32 (the model's linears, four bytes a weight) and
one window's logits at a time.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..checkpoint.qweight import Scheme
from ..model.forward import Model, block_forward
from .quantizer import quantize

STRIDE = 4  # the KL is read at positions 0, 4, 8, ... of each window


def block_linear_names(model: Model) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(model.cfg.n_layers) for n in model.cfg.family.linears]


def block_of(name: str) -> int:
    return int(name.split(".")[2])


class KLProbe:
    def __init__(self, model: Model, ids: torch.Tensor):
        """ids [B, T]: the calibration windows the loss is measured on."""
        self.model, self.ids = model, ids
        self.ropes = model.ropes(ids.shape[1])
        self.moments: dict[str, torch.Tensor] = {}
        self.pinned: dict[str, Scheme] = {}
        self.weights: dict[str, torch.Tensor] = {}  # the pinned assignment's rounded weights
        self.inputs: list[torch.Tensor] = []  # the pinned assignment's input of each block, and the last output
        self.evaluations = 0
        with torch.inference_mode():
            x, sums = model.embed(ids), {}
            for i in range(model.cfg.n_layers):
                def tap(name, inp, i=i):
                    key = f"model.layers.{i}.{name}"
                    sq = inp.reshape(-1, inp.shape[-1]).float().pow(2).sum(0)
                    sums[key] = sums[key] + sq if key in sums else sq
                x = block_forward(model.cfg, model.block_params(i), x, *self.ropes[i], tap=tap,
                                  window=model.cfg.window(i))
            self.moments = {n: s / ids.numel() for n, s in sums.items()}
            self.float_logp = [F.log_softmax(model.head(x[s : s + 1, ::STRIDE]).float(), -1) for s in range(len(ids))]

    def rounded(self, name: str, scheme: Scheme) -> torch.Tensor:
        if self.pinned.get(name) == scheme:
            return self.weights[name]
        return quantize(self.model.tensors[name + ".weight"], scheme).weight.detach()

    def output_error(self, name: str, scheme: Scheme) -> float:
        """sum over k of E[x_k^2] * sum over n of dW[n, k]^2: the layer's own output error on the float
        model's inputs, rounded to nearest on the scheme's grid."""
        with torch.no_grad():
            dw = self.model.tensors[name + ".weight"] - self.rounded(name, scheme)
            return float((dw.pow(2).sum(0) * self.moments[name]).sum())

    def pin(self, assignment: Mapping[str, Scheme]) -> float:
        """Measure an assignment (a scheme for every block linear) and keep it as the one later
        measurements start from; its KL."""
        self.weights = {n: self.rounded(n, s) for n, s in assignment.items()}
        self.pinned, self.inputs = dict(assignment), []
        return self._run(assignment, 0, keep=True)

    def kl(self, changes: Mapping[str, Scheme]) -> float:
        """KL of the pinned assignment with some layers changed to other schemes."""
        changes = {n: s for n, s in changes.items() if self.pinned[n] != s}
        if not changes:
            return self._kl(self.inputs[-1])
        return self._run(self.pinned | changes, min(block_of(n) for n in changes), keep=False)

    @torch.inference_mode()
    def _run(self, assignment: Mapping[str, Scheme], start: int, keep: bool) -> float:
        self.evaluations += 1
        model = self.model
        x = self.inputs[start] if start else model.embed(self.ids)
        if keep:
            self.inputs = [x]
        for i in range(start, model.cfg.n_layers):
            p = model.block_params(i)
            p.update({n + ".weight": self.rounded(f"model.layers.{i}.{n}", assignment[f"model.layers.{i}.{n}"])
                      for n in model.cfg.family.linears})
            x = block_forward(model.cfg, p, x, *self.ropes[i], window=model.cfg.window(i))
            if keep:
                self.inputs.append(x)
        return self._kl(x)

    @torch.inference_mode()
    def _kl(self, x: torch.Tensor) -> float:
        total = 0.0
        for s, p in enumerate(self.float_logp):  # one window's logits at a time
            q = F.log_softmax(self.model.head(x[s : s + 1, ::STRIDE]).float(), -1)
            total += float((p.exp() * (p - q)).sum())
        return total / sum(len(p[0]) for p in self.float_logp)
