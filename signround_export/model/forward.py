"""The LLaMA family (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text, SmolLM2) as plain functions over
a dict of HF-named tensors.

This is the one PyTorch forward in the project: tuning runs its blocks, and the reference model that
every exported artifact is compared against is this forward over weights dequantized from a
checkpoint's integers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import ModelError
from .config import ModelConfig
from .families import FUSED_GATE_UP, FUSED_QKV, block_norms, check_linears
from .rope import rope_tables


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm scaled by weight, or (Gemma, offset 1) by offset + weight in float32 before the cast back."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (normed * (offset + weight.float())).to(x.dtype)
    return normed.to(x.dtype) * weight


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


def visible(t: int, window: int | None, device) -> torch.Tensor:
    """bool [t, t]: position t sees s when s <= t and, with a window W, t - W < s (transformers'
    sliding-window mask)."""
    pos = torch.arange(t, device=device)
    back = pos[:, None] - pos[None, :]  # t - s
    return (back >= 0) & (back < window) if window is not None else back >= 0


def attention(cfg: ModelConfig, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              window: int | None) -> torch.Tensor:
    """Causal attention of q [B, heads, T, D] over k, v [B, kv_heads, T, D], limited to a window of W
    positions when the block has one. A window the sequence fits in changes nothing, so it keeps SDPA's
    causal path, bit for bit the same as no window. Soft-capped scores are written out (SDPA cannot cap
    them); SDPA takes the config's scale when it sets one."""
    gqa = cfg.n_kv_heads != cfg.n_heads
    t = q.shape[2]
    window = window if window is not None and window < t else None
    if cfg.attn_softcap is None:
        if window is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=cfg.attention_scale, enable_gqa=gqa)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible(t, window, q.device),
                                              scale=cfg.attention_scale, enable_gqa=gqa)
    groups = cfg.n_heads // cfg.n_kv_heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scale = cfg.attention_scale if cfg.attention_scale is not None else cfg.head_dim ** -0.5
    scores = softcap(q @ k.transpose(-1, -2) * scale, cfg.attn_softcap)
    scores = scores.masked_fill(~visible(t, window, q.device), float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    r = cos.shape[-1]
    if r < x.shape[-1]:  # partial rotary: the first r dimensions rotate, the rest pass through
        return torch.cat([apply_rope(x[..., :r], cos, sin), x[..., r:]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def linear(p: dict, name: str, x: torch.Tensor, tap=None) -> torch.Tensor:
    if tap is not None:  # tap(name, input): lets a caller observe what each linear reads
        tap(name, x)
    return F.linear(x, p[name + ".weight"], p.get(name + ".bias"))


def attention_inputs(cfg: ModelConfig, p: dict, h: torch.Tensor, tap=None) -> tuple[torch.Tensor, ...]:
    """q, k, v [B, T, rows] of h: three linears, or one fused qkv_proj whose rows are q's, k's, then v's."""
    if cfg.family.fused_qkv:
        kv_rows = cfg.n_kv_heads * cfg.head_dim
        return linear(p, FUSED_QKV, h, tap).split([cfg.n_heads * cfg.head_dim, kv_rows, kv_rows], dim=-1)
    return tuple(linear(p, f"self_attn.{n}_proj", h, tap) for n in "qkv")


def gate_and_up(cfg: ModelConfig, p: dict, h: torch.Tensor, tap=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MLP's gate and up projections of h: two linears, or one fused gate_up_proj (gate rows first)."""
    if cfg.family.fused_gate_up:
        return linear(p, FUSED_GATE_UP, h, tap).chunk(2, dim=-1)
    return linear(p, "mlp.gate_proj", h, tap), linear(p, "mlp.up_proj", h, tap)


def block_forward(cfg: ModelConfig, p: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  tap=None, window: int | None = None) -> torch.Tensor:
    """One decoder block on x [B, T, H] with causal attention, limited to `window` positions when the
    block has one (cfg.window(i) for block i). p holds the block's tensors by HF name relative to the
    block ("self_attn.q_proj.weight", "input_layernorm.weight", ...). tap(name, input) is called with
    every linear's input."""
    b, t, _ = x.shape
    fam = cfg.family

    def norm(name: str, y: torch.Tensor) -> torch.Tensor:
        return rms_norm(y, p[name + ".weight"], cfg.rms_eps, fam.norm_offset)

    h = norm("input_layernorm", x)
    q, k, v = attention_inputs(cfg, p, h, tap)
    q = q.view(b, t, cfg.n_heads, cfg.head_dim).transpose(1, 2)
    k = k.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    v = v.view(b, t, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
    if fam.qk_norm:  # over each head's head_dim values
        q, k = norm("self_attn.q_norm", q), norm("self_attn.k_norm", k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a = attention(cfg, q, k, v, window)
    a = linear(p, "self_attn.o_proj", a.transpose(1, 2).reshape(b, t, cfg.n_heads * cfg.head_dim), tap)
    if fam.sandwich_norms:  # the attention output is normed before the residual, the MLP has its own input norm
        x = x + norm("post_attention_layernorm", a)
        h = norm("pre_feedforward_layernorm", x)
    else:
        x = x + a
        h = norm("post_attention_layernorm", x)
    gate, up = gate_and_up(cfg, p, h, tap)
    out = linear(p, "mlp.down_proj", ACTIVATIONS[cfg.activation](gate) * up, tap)
    return x + (norm("post_feedforward_layernorm", out) if fam.sandwich_norms else out)


class Model:
    """A decoder-only LLaMA-family model over float tensors keyed by their HF names: a dict, or a
    TensorStore that reads each tensor from disk when it is indexed (model/store.py)."""

    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]):
        self.cfg = cfg
        self.tensors = tensors
        check_linears(cfg.family, tensors, ModelError)
        missing = [n for n in self.expected_names() if n not in tensors]
        if missing:
            raise ModelError(f"model weights are missing {len(missing)} tensors, e.g. {missing[:3]}")

    def expected_names(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.cfg.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(self.cfg.n_layers):
            names += [f"model.layers.{i}.{n}.weight" for n in self.cfg.family.linears]
            names += [f"model.layers.{i}.{n}" for n in block_norms(self.cfg.family)]
        return names

    def block_params(self, i: int) -> dict[str, torch.Tensor]:
        prefix = f"model.layers.{i}."
        return {n[len(prefix) :]: self.tensors[n] for n in self.tensors if n.startswith(prefix)}

    def lm_head_weight(self) -> torch.Tensor:
        return self.tensors["lm_head.weight" if "lm_head.weight" in self.tensors else "model.embed_tokens.weight"]

    def embed(self, ids: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of ids; weight: the embedding matrix when the caller holds it already."""
        x = F.embedding(ids, self.tensors["model.embed_tokens.weight"] if weight is None else weight)
        if self.cfg.family.embed_scale:  # sqrt(hidden) rounded to the embedding's dtype, as transformers does
            x = x * torch.tensor(self.cfg.hidden_size ** 0.5, dtype=x.dtype)
        return x

    def ropes(self, t: int, device=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's cos and sin [t, rotary_dim] for positions 0 .. t - 1, repeated over both halves of a
        head's rotary part (local layers with a RoPE of their own get theirs; the others share one table);
        ModelError past what the rotary table covers (longrope's original context)."""
        tables = {}
        for local in sorted({self.cfg.local_rope(i) for i in range(self.cfg.n_layers)}):
            tables[local] = tuple(torch.from_numpy(np.concatenate([a, a], axis=-1)).to(device)
                                  for a in rope_tables(self.cfg, t, local))
        return [tables[self.cfg.local_rope(i)] for i in range(self.cfg.n_layers)]

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The final norm's weight, the output matrix and its bias (None without one)."""
        return self.tensors["model.norm.weight"], self.lm_head_weight(), self.tensors.get("lm_head.bias")

    def head(self, x: torch.Tensor, weights: tuple | None = None) -> torch.Tensor:
        """Logits of the last block's output x; weights: head_weights() when the caller holds them already."""
        norm, matrix, bias = self.head_weights() if weights is None else weights
        x = rms_norm(x, norm, self.cfg.rms_eps, self.cfg.family.norm_offset)
        logits = F.linear(x, matrix, bias)
        return logits if self.cfg.final_softcap is None else softcap(logits, self.cfg.final_softcap)

    @torch.inference_mode()
    def hidden_states(self, batches: Sequence[torch.Tensor], progress: bool = False) -> list[torch.Tensor]:
        """The last block's output [B, T, H] for each batch of token ids [B, T], block-major: one block's
        weights are read, run over every batch and dropped before the next block's are read, so memory
        holds every batch's activations and one block, whatever the depth. Each batch goes through a
        block on its own, with the shapes a batch-at-a-time forward gives it: the same arithmetic."""
        matrix = self.tensors["model.embed_tokens.weight"]
        xs = [self.embed(ids, matrix) for ids in batches]
        del matrix
        ropes = {t: self.ropes(t, xs[0].device) for t in sorted({x.shape[1] for x in xs})}
        for i in tqdm(range(self.cfg.n_layers), desc="blocks", unit="block", disable=not progress):
            p = self.block_params(i)
            for j, x in enumerate(xs):  # in place: a batch's input is dropped once its output exists
                xs[j] = block_forward(self.cfg, p, x, *ropes[x.shape[1]][i], window=self.cfg.window(i))
            del p
        return xs

    @torch.inference_mode()
    def stream_logits(self, batches: Sequence[torch.Tensor], progress: bool = False) -> Iterator[torch.Tensor]:
        """float32 logits [B, T, V] of each batch of token ids [B, T], in order: every batch's hidden states
        block by block (hidden_states), then the head on one batch at a time, so that one batch's logits
        exist at once (40 windows of 512 tokens over a 49152-token vocabulary would be 4 GB)."""
        xs = self.hidden_states(batches, progress)
        weights = self.head_weights()
        for j in range(len(xs)):
            x, xs[j] = xs[j], None
            yield self.head(x, weights).float()

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, T, V] for token ids [B, T] (positions from 0, causal)."""
        [logits] = self.stream_logits([ids])
        return logits
