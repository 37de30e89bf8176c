"""Which GGUF type each layer is tuned for (`signround tune --gguf TYPE`).

Every quantized type of types.py holds a checkpoint's integers exactly, so a layer tuned on its grid
(the `scheme` of the type's record: a tuning Scheme, see tune/quantizer.py) reaches the GGUF file bit
for bit; export/gguf/encode.py picks the same types back from the integers. Rows that are not a
multiple of 256 cannot take a K-quant; llama.cpp then falls back to the record's `fallback` (Q4_0 for
Q2_K and Q3_K, Q5_0 for Q4_K, Q5_1 for Q5_K and Q8_0 for Q6_K), and so do we.

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

A fused q/k/v linear (Phi-3's qkv_proj, llama.cpp's attn_qkv) takes attn_v's rule, and a fused gate/up
(gate_up_proj, llama.cpp's ffn_up) the others' type: so llama-quantize (llama-cpp-python 0.3.36)
chose for every mix above, checked tensor by tensor in tests/test_phi3.py.
"""

from __future__ import annotations

import re

from ...checkpoint.qweight import UNIFORM, Scheme
from ...errors import TuneError
from .types import GGUF_TYPES, QK_K

ROLES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
         "qkv_proj": "attn_v", "gate_up_proj": "ffn_up"}  # fused linears: the rule llama-quantize applies


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
# Q2_K: the mix of that name; the non-uniform grids (IQ4_NL) after the integer types
SINGLE = sorted((n for n, t in GGUF_TYPES.items() if t.quantized and n not in MIXES),
                key=lambda n: (GGUF_TYPES[n].grid != UNIFORM, n))
TYPES = SINGLE + list(MIXES)  # what --gguf accepts


def layer_type(gguf_type: str, name: str, k: int, n_layers: int, gqa: int = 1) -> str:
    """The exact GGUF type that layer `name` (an HF decoder-block linear with rows of k) is tuned for;
    gqa = attention heads per key/value head."""
    m = re.search(r"layers\.(\d+)\.\w+\.(\w+)$", name)
    if m is None or m.group(2) not in ROLES:
        raise ValueError(f"{name} is not a decoder-block linear of a llama-family model")
    t = MIXES[gguf_type](ROLES[m.group(2)], int(m.group(1)), n_layers, gqa) if gguf_type in MIXES else gguf_type
    if k % QK_K and GGUF_TYPES[t].fallback:
        t = GGUF_TYPES[t].fallback
    if k % GGUF_TYPES[t].block:
        raise TuneError(f"{name} has rows of {k} weights, not whole {t} blocks of {GGUF_TYPES[t].block}: no GGUF type "
                        f"holds its codes, so `gguf` {gguf_type.lower()!r} cannot tune this model exactly (tune it "
                        "without `gguf`: the GGUF export then writes such layers as float16)",
                        param="gguf")
    return t


def layer_types(gguf_type: str, shapes: dict[str, tuple[int, int]], n_layers: int, gqa: int = 1) -> dict[str, str]:
    """Every layer's exact GGUF type for `tune --gguf gguf_type`; shapes are the HF [N, K] of each linear."""
    if gguf_type not in TYPES:
        raise TuneError(f"gguf_type {gguf_type!r}: choose one of {', '.join(t.lower() for t in TYPES)}",
                        param="gguf_type")
    return {name: layer_type(gguf_type, name, k, n_layers, gqa) for name, (_, k) in shapes.items()}


def layer_schemes(types: dict[str, str]) -> dict[str, Scheme]:
    """The tuning grid of every layer of layer_types' answer: the Scheme of its exact GGUF type."""
    return {name: GGUF_TYPES[t].scheme for name, t in types.items()}
