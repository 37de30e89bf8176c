"""What each per-layer choice costs in the deployed file, per format: the tables the allocation reads.

A decoder-block linear W [N, K] (N out, K in) can be written several ways; each way is a Choice (a
label and the tuning grid, a Scheme, that the exporter carries exactly) and costs the bytes its
tensors take in the file.

ONNX (export/onnx/matmulnbits.py): bits 2, 4 or 8 (the CPU kernel's native widths) times blocks of
32, 64 or 128 columns; a group of the checkpoint is one block, so blocks = ceil(K / block).

| initializer  | dtype   | bytes                              |
| ------------ | ------- | ---------------------------------- |
| B            | uint8   | N * blocks * block * bits / 8      |
| scales       | float32 | N * blocks * 4                     |
| zero_points  | uint8   | N * ceil(blocks * bits / 8), asymmetric only |

The table assumes the export's block is the group (`export onnx --max-block 128` or more): at a
smaller max_block a larger group's scale is repeated over each block, and the file pays for that.

GGUF (export/gguf/types.py): the quantized types whose block fits the row, K a multiple of the
type's block (32 for Q4_0 .. Q8_0, 256 for the K-quants); bytes = N * K / block * bytes per block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..checkpoint.qweight import UNIFORM, Scheme
from ..errors import TuneError
from ..export.gguf.types import GGUF_TYPES
from ..export.onnx.matmulnbits import KERNEL_BITS, block_for

TARGETS = ("onnx", "gguf")
ONNX_BLOCKS = (32, 64, 128)


@dataclass(frozen=True)
class Choice:
    label: str  # "W4G64" (ONNX) or a GGUF type name ("Q4_0")
    scheme: Scheme  # the grid a layer is tuned on so that the exporter writes it as this choice


def onnx_bytes(n: int, k: int, bits: int, group: int, sym: bool, max_block: int = 256) -> int:
    """Bytes of the MatMulNBits initializers of an [N, K] linear of `bits` bits in groups of `group`,
    exported with blocks of at most max_block."""
    block = block_for(group, max_block)
    blocks = math.ceil(k / block)
    zero_points = 0 if sym else n * math.ceil(blocks * bits / 8)
    return n * blocks * block * bits // 8 + n * blocks * 4 + zero_points


def gguf_bytes(n: int, k: int, type_name: str) -> int:
    """Bytes of an [N, K] linear stored as a GGUF type (K a multiple of the type's block)."""
    t = GGUF_TYPES[type_name]
    assert k % t.block == 0, (k, type_name)
    return n * (k // t.block) * t.nbytes


def onnx_choices(sym: bool) -> list[Choice]:
    return [Choice(f"W{b}G{g}", Scheme(b, g, sym)) for b in KERNEL_BITS for g in ONNX_BLOCKS]


def gguf_choices(k: int) -> list[Choice]:
    """The quantized GGUF types on uniform grids that a row of k admits. IQ4_NL is left out: it costs
    exactly Q4_0's bytes, and the allocation's steps to the next cheaper choice need distinct costs (a
    rule between equal-cost choices is not built; IQ4_NL also measured worse than Q4_0 on SmolLM2)."""
    return [Choice(t.name, t.scheme) for t in GGUF_TYPES.values()
            if t.quantized and t.grid == UNIFORM and k % t.block == 0]


def layer_costs(target: str, shape: tuple[int, int], sym: bool) -> dict[str, tuple[Choice, int]]:
    """{label: (choice, bytes)} of an [N, K] linear in the target file, cheapest first."""
    n, k = shape
    if target == "onnx":
        costs = {c.label: (c, onnx_bytes(n, k, c.scheme.bits, c.scheme.group_size, sym)) for c in onnx_choices(sym)}
    elif target == "gguf":
        costs = {c.label: (c, gguf_bytes(n, k, c.label)) for c in gguf_choices(k)}
    else:
        raise TuneError(f"`target` {target!r}: choose one of {', '.join(TARGETS)}", param="target")
    return dict(sorted(costs.items(), key=lambda kv: (kv[1][1], kv[0])))


def cost_table(target: str, shapes: dict[str, tuple[int, int]], sym: bool) -> dict[str, dict[str, tuple[Choice, int]]]:
    """layer_costs of every layer; a layer no choice of the target admits is refused by name."""
    table = {name: layer_costs(target, shape, sym) for name, shape in shapes.items()}
    empty = [name for name, costs in table.items() if not costs]
    if empty:
        raise TuneError(f"`target` {target}: no {target.upper()} type holds {empty[0]} (rows of "
                        f"{shapes[empty[0]][1]}, not a multiple of 32) nor {len(empty) - 1} other layers; "
                        "choose the other target", param="target")
    return table
