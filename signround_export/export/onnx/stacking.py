"""Linears that read the same input (q, k, v; gate, up) as one MatMulNBits over their stacked rows.

The stacked weight's initializers are named after its members joined by "+"
("model.layers.0.self_attn.q_proj+...k_proj+...v_proj.B"), so validation can read each member's rows
back from the file.
"""

from __future__ import annotations

import numpy as np

from ...checkpoint.qweight import QuantWeight

SEPARATOR = "+"


def stack_name(modules: list[str]) -> str:
    """The name of the stacked weight of these modules."""
    return SEPARATOR.join(modules)


def stacked_modules(name: str) -> list[str]:
    """The modules a (possibly stacked) weight name holds, in row order."""
    return name.split(SEPARATOR)


def stack_key(qw: QuantWeight) -> tuple:
    """What weights must share to be stacked into one MatMulNBits: their layout, groups and zero-point kind."""
    return qw.shape[1], qw.bits, qw.group_size, qw.sym, qw.offset is None


def stack_rows(qws: list[QuantWeight]) -> QuantWeight:
    """Weights of one stack_key as one weight with their rows one after another (biases too, zero where
    a weight has none)."""
    def rows(arrays):
        return np.concatenate(arrays, axis=0)

    first = qws[0]
    bias = None
    if any(qw.bias is not None for qw in qws):
        bias = rows([qw.bias if qw.bias is not None else np.zeros(qw.shape[0], np.float32) for qw in qws])
    return QuantWeight(q=rows([qw.q for qw in qws]), scale=rows([qw.scale for qw in qws]),
                       zero=rows([qw.zero for qw in qws]),
                       offset=None if first.offset is None else rows([qw.offset for qw in qws]),
                       bits=first.bits, group_size=first.group_size, sym=first.sym, bias=bias)
