"""Gemma 2 and Gemma 3 (text) through every stage: (1 + weight) RMSNorm in float32, embeddings scaled by
sqrt(hidden), GeGLU, four norms per block, query_pre_attn_scalar, attention and final logit soft-capping,
per-head q/k norms (Gemma 3), a RoPE base of their own for the local layers (Gemma 3), tied embeddings.

The tiny models have every feature on: head_dim 32 != hidden / heads = 16, a GQA ratio of 2,
query_pre_attn_scalar 24 != head_dim, random norm weights, soft-capping that bites, a local RoPE base
and a linear scaling on the global layers (Gemma 3), and sliding windows of 8 tokens on the local layers,
so that every sequence here runs past the window. transformers' own forwards are the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import write_tiny_model
from signround_export.checkpoint.read import read_checkpoint
from signround_export.cli import main
from signround_export.errors import UnsupportedModelError
from signround_export.export.onnx import export_onnx
from signround_export.model.config import ModelConfig
from signround_export.model.load import load_float_model, reference_from_checkpoint
from signround_export.validation import validate

SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}  # the tiny tokenizer's one special token
COMMON = SPECIAL | {"head_dim": 32, "query_pre_attn_scalar": 24, "final_logit_softcapping": 3.0,
                    "sliding_window": 8, "hidden_activation": "gelu_pytorch_tanh"}
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
    assert [cfg.window(i) for i in range(cfg.n_layers)] == [8 if i in cfg.local_layers else None
                                                            for i in range(cfg.n_layers)]
    if model_type == "gemma3_text":
        assert cfg.local_rope_theta == 100.0 and cfg.rope_scaling.factor == 2.0
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(ids).logits
    got = ours.logits(ids)
    assert want.abs().max() > 2.5  # the final soft-capping bites
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


@pytest.fixture(scope="module", params=["gemma2", "gemma3_text"])
def tuned(request, tmp_path_factory):
    """A tiny Gemma and its checkpoint after a few SignRound steps."""
    base = tmp_path_factory.mktemp(request.param)
    model = gemma_model(base / "model", request.param)
    ckpt = base / "ckpt"
    assert main(["tune", str(model), "--out", str(ckpt), "--iters", "4", "--nsamples", "4", "--seqlen", "32",
                 "--batch-size", "2", "--bits", "4", "--group-size", "32", "--quiet"]) == 0
    return ckpt


def test_norms_are_kept_in_float(tuned):
    ckpt = read_checkpoint(tuned)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    norms = [n for n in ckpt.tensors if n.endswith("norm.weight")]
    assert len(norms) == 1 + cfg.n_layers * (6 if cfg.family.qk_norm else 4)
    assert len(ckpt.qweights) == 7 * cfg.n_layers
    log = json.loads((tuned / "tuning_log.json").read_text())
    assert all(b["loss_after"] <= b["loss_before"] for b in log["blocks"]), log["blocks"]


def test_onnx_at_accuracy_level_0_is_exact(tuned, tmp_path):
    export_onnx(read_checkpoint(tuned), tmp_path / "onnx", accuracy_level=0)
    genai = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())["model"]
    assert genai["type"] == json.loads((tuned / "config.json").read_text())["model_type"]
    result = validate(tuned, onnx=tmp_path / "onnx", tokens=256, window=128, progress=False)
    onnx = result.artifact("onnx")
    assert result.passed and onnx.scores.top1 == 1.0 and onnx.scores.kl_mean <= 1e-6, onnx.scores
    assert not any(onnx.layer_errors.values())


def test_runtime_and_genai_greedy_equal_the_reference(tuned, tmp_path):
    runtime = pytest.importorskip("signround_runtime")
    ckpt = read_checkpoint(tuned)
    export_onnx(ckpt, tmp_path / "onnx", accuracy_level=0)
    ref = reference_from_checkpoint(ckpt)
    prompt = [5, 17, 42, 99, 3, 250]
    ids = list(prompt)
    for _ in range(32):
        ids.append(int(ref.logits(torch.tensor([ids]))[0, -1].argmax()))
    got = runtime.Model(tmp_path / "onnx", threads=2).generate([prompt], max_new_tokens=32, stop_ids=set())
    assert got.tokens[0] == ids[len(prompt):]
    og = pytest.importorskip("onnxruntime_genai")  # onnxruntime-genai runs the folder under its own type
    model = og.Model(str(tmp_path / "onnx"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 32, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    assert [int(t) for t in gen.get_sequence(0)][len(prompt):] == ids[len(prompt):]
