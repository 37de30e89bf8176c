"""llama.cpp's names for a model's tensors, and its row order for the rotary projections.

llama.cpp's "llama" architecture rotates q and k in interleaved pairs, HF's in halves: the rows of
q_proj and k_proj are permuted per head (`rope_permute`), which reorders rows only, so it applies
exactly to the integers, scales and zero points.

A fused q/k/v linear (Phi-3's qkv_proj) is llama.cpp's attn_qkv, and a fused gate/up (gate_up_proj,
gate rows first) its ffn_up, which llama.cpp's SwiGLU splits the same way: both go in as stored.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...checkpoint.qweight import QuantWeight
from ...model.config import ModelConfig
from ...model.families import FUSED_LINEARS, SEPARATE_LINEARS, Family

ALL_LINEARS = frozenset(SEPARATE_LINEARS + FUSED_LINEARS)

# HF tensor name (with {i} for the block) -> GGUF tensor name
TENSOR_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.layers.{i}.self_attn.qkv_proj.weight": "blk.{i}.attn_qkv.weight",
    "model.layers.{i}.mlp.gate_up_proj.weight": "blk.{i}.ffn_up.weight",
}
# the names of a block with sandwich norms (Gemma): post_attention_layernorm norms the attention output,
# pre_feedforward_layernorm is the MLP's input norm (llama.cpp's ffn_norm)
SANDWICH_NORM_NAMES = {
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # recomputed by every runtime


def tensor_names(family: Family | None) -> dict[str, str]:
    """HF name pattern -> GGUF name pattern for a family: its own linears only (ffn_up is up_proj or a fused
    gate_up_proj, as Family.linears says) and its sandwich norms' names. None: every LLaMA-block pattern."""
    if family is None:
        return TENSOR_NAMES
    names = {hf: gg for hf, gg in TENSOR_NAMES.items()
             if block_module(hf) not in ALL_LINEARS or block_module(hf) in family.linears}
    return names | SANDWICH_NORM_NAMES if family.sandwich_norms else names


def block_module(hf_pattern: str) -> str:
    """"self_attn.q_proj" of "model.layers.{i}.self_attn.q_proj.weight"."""
    return hf_pattern.removeprefix("model.layers.{i}.").rsplit(".", 1)[0]


def gguf_name(hf_name: str, family: Family | None = None) -> str | None:
    """The GGUF name of an HF tensor, or None when llama.cpp has none for it."""
    names = tensor_names(family)
    parts = hf_name.split(".")
    if hf_name.startswith("model.layers.") and len(parts) > 3 and parts[2].isdigit():
        key = ".".join(parts[:2] + ["{i}"] + parts[3:])
        return names[key].replace("{i}", parts[2]) if key in names else None
    return names.get(hf_name)


def is_norm(hf_name: str) -> bool:
    """An RMSNorm weight (the blocks', the per-head q/k norms, the final norm)."""
    return hf_name.endswith("norm.weight")


def hf_names(n_layers: int, family: Family | None = None) -> dict[str, str]:
    """GGUF name -> HF name of every tensor a model of n_layers blocks of family can have."""
    names = {}
    for hf_pattern, gguf_pattern in tensor_names(family).items():
        for i in range(n_layers) if "{i}" in hf_pattern else [None]:
            names[gguf_pattern.replace("{i}", str(i))] = hf_pattern.replace("{i}", str(i))
    return names


def rope_heads(cfg: ModelConfig, hf_name: str) -> int | None:
    """The number of heads whose rows llama.cpp wants interleaved, for q_proj and k_proj tensors of an
    architecture that needs it; else None."""
    if not cfg.family.gguf_rope_permute:
        return None
    heads = {"self_attn.q_proj": cfg.n_heads, "self_attn.k_proj": cfg.n_kv_heads}
    return next((n for key, n in heads.items() if f".{key}." in hf_name + "."), None)


def rope_permute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder rows (axis 0) from HF's half-split rotary layout to llama.cpp's interleaved one."""
    r = rows.shape[0]
    return rows.reshape(n_heads, 2, r // n_heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rope_unpermute(rows: np.ndarray, n_heads: int) -> np.ndarray:
    r = rows.shape[0]
    return rows.reshape(n_heads, r // n_heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def llama_rows(item: QuantWeight | np.ndarray, n_heads: int) -> QuantWeight | np.ndarray:
    """A quantized layer or a float tensor of q_proj or k_proj with its rows in llama.cpp's order (a
    layer's bias is a tensor of its own: the result has none)."""
    if not isinstance(item, QuantWeight):
        return rope_permute(item, n_heads)
    return replace(item, q=rope_permute(item.q, n_heads), scale=rope_permute(item.scale, n_heads),
                   zero=rope_permute(item.zero, n_heads), bias=None,
                   offset=None if item.offset is None else rope_permute(item.offset, n_heads))
