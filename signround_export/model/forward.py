"""The LLaMA family (llama, mistral, qwen2, qwen3, SmolLM2) as plain functions over a dict of HF-named tensors.

This is the one PyTorch forward in the project: tuning runs its blocks, and the reference model that
every exported artifact is compared against is this forward over weights dequantized from a
checkpoint's integers.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ModelError
from .config import BLOCK_LINEARS, ModelConfig
from .families import block_norms
from .rope import rope_tables


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def linear(p: dict, name: str, x: torch.Tensor, tap=None) -> torch.Tensor:
    if tap is not None:  # tap(name, input): lets a caller observe what each linear reads
        tap(name, x)
    return F.linear(x, p[name + ".weight"], p.get(name + ".bias"))


def block_forward(cfg: ModelConfig, p: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  tap=None) -> torch.Tensor:
    """One decoder block on x [B, T, H] with causal attention. p holds the block's tensors by HF name
    relative to the block ("self_attn.q_proj.weight", "input_layernorm.weight", ...). tap(name, input)
    is called with every linear's input."""
    b, t, _ = x.shape
    h = rms_norm(x, p["input_layernorm.weight"], cfg.rms_eps)
    q = linear(p, "self_attn.q_proj", h, tap).view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    k = linear(p, "self_attn.k_proj", h, tap).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    v = linear(p, "self_attn.v_proj", h, tap).view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    if cfg.family.qk_norm:  # over each head's head_dim values
        q = rms_norm(q, p["self_attn.q_norm.weight"], cfg.rms_eps)
        k = rms_norm(k, p["self_attn.k_norm.weight"], cfg.rms_eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=cfg.n_kv_heads != cfg.n_heads)
    x = x + linear(p, "self_attn.o_proj", a.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.head_dim), tap)
    h = rms_norm(x, p["post_attention_layernorm.weight"], cfg.rms_eps)
    act = F.silu(linear(p, "mlp.gate_proj", h, tap)) * linear(p, "mlp.up_proj", h, tap)
    return x + linear(p, "mlp.down_proj", act, tap)


class Model:
    """A decoder-only LLaMA-family model over float tensors keyed by their HF names: a dict, or a
    TensorStore that reads each tensor from disk when it is indexed (model/store.py)."""

    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]):
        self.cfg = cfg
        self.tensors = tensors
        missing = [n for n in self.expected_names() if n not in tensors]
        if missing:
            raise ModelError(f"model weights are missing {len(missing)} tensors, e.g. {missing[:3]}")

    def expected_names(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.cfg.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(self.cfg.n_layers):
            names += [f"model.layers.{i}.{n}.weight" for n in BLOCK_LINEARS]
            names += [f"model.layers.{i}.{n}" for n in block_norms(self.cfg.family)]
        return names

    def block_params(self, i: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{i}."
        return {n[len(prefix) :]: self.tensors[n] for n in self.tensors if n.startswith(prefix)}

    def lm_head_weight(self) -> torch.Tensor:
        return self.tensors["lm_head.weight" if "lm_head.weight" in self.tensors else "model.embed_tokens.weight"]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.tensors["model.embed_tokens.weight"])

    def rope(self, t: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [t, head_dim] for positions 0 .. t - 1, repeated over both halves of a head."""
        cos, sin = (torch.from_numpy(np.concatenate([a, a], axis=-1)).to(device) for a in rope_tables(self.cfg, t))
        return cos, sin

    def head(self, x: torch.Tensor) -> torch.Tensor:
        x = rms_norm(x, self.tensors["model.norm.weight"], self.cfg.rms_eps)
        return F.linear(x, self.lm_head_weight(), self.tensors.get("lm_head.bias"))

    @torch.inference_mode()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, T, V] for token ids [B, T] (positions from 0, causal)."""
        x = self.embed(ids)
        cos, sin = self.rope(ids.shape[1], x.device)
        for i in range(self.cfg.n_layers):
            x = block_forward(self.cfg, self.block_params(i), x, cos, sin)
        return self.head(x).float()

