"""Gemma 2 and Gemma 3 (text) through every stage: (1 + weight) RMSNorm in float32, embeddings scaled by
sqrt(hidden), GeGLU, four norms per block, query_pre_attn_scalar, attention and final logit soft-capping,
per-head q/k norms (Gemma 3), a RoPE base of their own for the local layers (Gemma 3), tied embeddings.

The tiny models have every feature on: head_dim 32 != hidden / heads = 16, a GQA ratio of 2,
query_pre_attn_scalar 24 != head_dim, random norm weights, soft-capping that bites, a local RoPE base
and a linear scaling on the global layers (Gemma 3). transformers' own forwards are the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import write_tiny_model
from signround_export.errors import UnsupportedModelError
from signround_export.model.config import ModelConfig
from signround_export.model.load import load_float_model

SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}  # the tiny tokenizer's one special token
COMMON = SPECIAL | {"head_dim": 32, "query_pre_attn_scalar": 24, "final_logit_softcapping": 3.0,
                    "sliding_window": 512, "hidden_activation": "gelu_pytorch_tanh"}
GEMMA2 = COMMON | {"attn_logit_softcapping": 2.0}
GEMMA3 = COMMON | {"rope_local_base_freq": 100.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0},
                   "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}


def gemma_model(folder, model_type="gemma2", tied=True, **extra):
    """A tiny random Gemma folder whose norm weights are random too (transformers starts them at 0,
    which (1 + weight) turns into plain RMSNorm)."""
    layers = 3 if model_type == "gemma3_text" else 2
    base = GEMMA3 if model_type == "gemma3_text" else GEMMA2
    write_tiny_model(folder, model_type=model_type, tied=tied, layers=layers, kv_heads=2, extra=base | extra)
    state = load_file(str(folder / "model.safetensors"))
    g = torch.Generator().manual_seed(7)
    for name, t in state.items():
        if name.endswith("norm.weight"):
            state[name] = torch.empty_like(t).uniform_(-0.5, 0.5, generator=g)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("model_type,tied", [("gemma2", True), ("gemma3_text", True), ("gemma3_text", False)])
def test_logits_match_transformers(tmp_path, model_type, tied):
    folder = gemma_model(tmp_path / "m", model_type, tied=tied)
    ours, _, _ = load_float_model(folder)
    cfg = ours.cfg
    assert cfg.head_dim == 32 != cfg.hidden_size // cfg.n_heads and cfg.n_heads // cfg.n_kv_heads == 2
    assert cfg.attention_scale == 24 ** -0.5 and cfg.final_softcap == 3.0
    assert cfg.local_layers == ((0,) if model_type == "gemma2" else (0, 2))
    if model_type == "gemma3_text":
        assert cfg.local_rope_theta == 100.0 and cfg.rope_scaling.factor == 2.0
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(ids).logits
    got = ours.logits(ids)
    assert want.abs().max() > 2.5  # the final soft-capping bites
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
