"""Which GGUF type each layer is tuned for (`signround tune --gguf TYPE`).

Every type below holds a checkpoint's integers exactly, so a layer tuned on its grid reaches the GGUF
file bit for bit (export/gguf/write.py picks the same types back from the integers). A grid is a tuning
scheme: (bits, group size, symmetric, sub-scale bits, float offset; see tune/quantizer.py).

| type | grid                        | bits per weight | rows                 |
| ---- | --------------------------- | --------------- | -------------------- |
| Q2_K | W2G16 asym, 4-bit, offsets  | 2.625           | a multiple of 256    |
| Q3_K | W3G16 sym, 6-bit            | 3.4375          | a multiple of 256    |
| Q4_0 | W4G32 sym                   | 4.5             | a multiple of 32     |
| Q4_1 | W4G32 asym, offsets         | 5.0             | a multiple of 32     |
| Q4_K | W4G32 asym, 6-bit, offsets  | 4.5             | a multiple of 256    |
| Q5_0 | W5G32 sym                   | 5.5             | a multiple of 32     |
| Q5_1 | W5G32 asym, offsets         | 6.0             | a multiple of 32     |
| Q5_K | W5G32 asym, 6-bit, offsets  | 5.5             | a multiple of 256    |
| Q6_K | W6G16 sym, 8-bit            | 6.5625          | a multiple of 256    |
| Q8_0 | W8G32 sym                   | 8.5             | a multiple of 32     |

"6-bit" is the width of the sub-block scales of each 256-weight super-block; "offsets": each group
keeps a float16 minimum ("offsets", tune/quantizer.py), which the checkpoint stores beside the
scales; the asymmetric K-quants hold it as a 6-bit (Q2_K: 4-bit) multiple of a float16 step.

Rows that are not a multiple of 256 cannot take a K-quant; llama.cpp then falls back to Q4_0 for Q2_K
and Q3_K, Q5_0 for Q4_K, Q5_1 for Q5_K and Q8_0 for Q6_K, and so do we.

The mixes are llama.cpp's per-tensor choices for its file types (llama-quant.cpp, for dense
non-Falcon models; n layers, layer i, integer division; others: every other linear):

| mix    | attn_v                                | attn_output | ffn_down                              | others |
| ------ | ------------------------------------- | ----------- | ------------------------------------- | ------ |
| Q2_K   | Q4_K if n_heads / n_kv_heads >= 4, else Q3_K | Q3_K | Q3_K                                  | Q2_K   |
| Q3_K_S | Q3_K                                  | Q3_K        | Q3_K                                  | Q3_K   |
| Q3_K_M | Q5_K if i < 2, else Q4_K              | Q4_K        | Q5_K if i < n / 16, else Q4_K         | Q3_K   |
| Q3_K_L | Q5_K                                  | Q5_K        | Q5_K                                  | Q3_K   |
| Q4_K_S | Q5_K if i < 4, else Q4_K              | Q4_K        | Q5_K if i < n / 8, else Q4_K          | Q4_K   |
| Q4_K_M | Q6_K if more_bits(i), else Q4_K       | Q4_K        | Q6_K if more_bits(i), else Q4_K       | Q4_K   |
| Q5_K_S | Q5_K                                  | Q5_K        | Q5_K                                  | Q5_K   |
| Q5_K_M | Q6_K if more_bits(i), else Q5_K       | Q5_K        | Q6_K if more_bits(i), else Q5_K       | Q5_K   |

more_bits(i) = i < n / 8 or i >= 7 n / 8 or (i - n / 8) % 3 == 2: the first and last eighth of the
layers and every third one between.
"""

from __future__ import annotations

import re

from ...checkpoint.qweight import Scheme

GRIDS = {  # type -> quant.quantizer.Scheme(bits, group size, symmetric, sub-scale bits, float offset)
    "Q2_K": (2, 16, False, 4, True),
    "Q3_K": (3, 16, True, 6, False),
    "Q4_0": (4, 32, True, 0, False),
    "Q4_1": (4, 32, False, 0, True),
    "Q4_K": (4, 32, False, 6, True),
    "Q5_0": (5, 32, True, 0, False),
    "Q5_1": (5, 32, False, 0, True),
    "Q5_K": (5, 32, False, 6, True),
    "Q6_K": (6, 16, True, 8, False),
    "Q8_0": (8, 32, True, 0, False),
}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # rows not a multiple of 256
SUPER_BLOCK = 256

ROLES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mix(base: str, attn_v, attn_output: str, ffn_down):
    """A mix from its table row: attn_v and ffn_down are types or functions of (layer i, n layers, gqa)."""
    def pick(role: str, i: int, n: int, gqa: int) -> str:
        rule = {"attn_v": attn_v, "attn_output": attn_output, "ffn_down": ffn_down}.get(role, base)
        return rule(i, n, gqa) if callable(rule) else rule
    return pick


MIXES = {
    "Q2_K": mix("Q2_K", lambda i, n, gqa: "Q4_K" if gqa >= 4 else "Q3_K", "Q3_K", "Q3_K"),
    "Q3_K_S": mix("Q3_K", "Q3_K", "Q3_K", "Q3_K"),
    "Q3_K_M": mix("Q3_K", lambda i, n, gqa: "Q5_K" if i < 2 else "Q4_K", "Q4_K",
                  lambda i, n, gqa: "Q5_K" if i < n // 16 else "Q4_K"),
    "Q3_K_L": mix("Q3_K", "Q5_K", "Q5_K", "Q5_K"),
    "Q4_K_S": mix("Q4_K", lambda i, n, gqa: "Q5_K" if i < 4 else "Q4_K", "Q4_K",
                  lambda i, n, gqa: "Q5_K" if i < n // 8 else "Q4_K"),
    "Q4_K_M": mix("Q4_K", lambda i, n, gqa: "Q6_K" if more_bits(i, n) else "Q4_K", "Q4_K",
                  lambda i, n, gqa: "Q6_K" if more_bits(i, n) else "Q4_K"),
    "Q5_K_S": mix("Q5_K", "Q5_K", "Q5_K", "Q5_K"),
    "Q5_K_M": mix("Q5_K", lambda i, n, gqa: "Q6_K" if more_bits(i, n) else "Q5_K", "Q5_K",
                  lambda i, n, gqa: "Q6_K" if more_bits(i, n) else "Q5_K"),
}
SINGLE = [t for t in GRIDS if t not in MIXES]  # Q2_K is llama.cpp's mix of that name, not one type
TYPES = SINGLE + list(MIXES)  # what --gguf accepts


def layer_type(gguf_type: str, name: str, k: int, n_layers: int, gqa: int = 1) -> str:
    """The exact GGUF type that layer `name` (an HF decoder-block linear with rows of k) is tuned for;
    gqa = attention heads per key/value head."""
    m = re.search(r"layers\.(\d+)\.\w+\.(\w+)$", name)
    if m is None or m.group(2) not in ROLES:
        raise ValueError(f"{name} is not a decoder-block linear of a llama-family model")
    t = MIXES[gguf_type](ROLES[m.group(2)], int(m.group(1)), n_layers, gqa) if gguf_type in MIXES else gguf_type
    if k % SUPER_BLOCK and t in FALLBACK:
        t = FALLBACK[t]
    return t


def layer_types(gguf_type: str, shapes: dict[str, tuple[int, int]], n_layers: int, gqa: int = 1) -> dict[str, str]:
    """Every layer's exact GGUF type for `tune --gguf gguf_type`; shapes are the HF [N, K] of each linear."""
    if gguf_type not in TYPES:
        raise ValueError(f"--gguf {gguf_type.lower()}: choose one of {', '.join(t.lower() for t in TYPES)}")
    return {name: layer_type(gguf_type, name, k, n_layers, gqa) for name, (_, k) in shapes.items()}


def layer_schemes(gguf_type: str, shapes: dict[str, tuple[int, int]], n_layers: int, gqa: int = 1) -> dict[str, Scheme]:
    """The tuning grid of every layer for `tune --gguf gguf_type`: the Scheme of its exact GGUF type."""
    return {name: Scheme(*GRIDS[t]) for name, t in layer_types(gguf_type, shapes, n_layers, gqa).items()}
