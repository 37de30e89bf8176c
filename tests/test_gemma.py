"""Gemma 2 and Gemma 3 (text) through every stage: (1 + weight) RMSNorm in float32, embeddings scaled by
sqrt(hidden), GeGLU, four norms per block, query_pre_attn_scalar, attention and final logit soft-capping,
per-head q/k norms (Gemma 3), a RoPE base of their own for the local layers (Gemma 3), tied embeddings.

The tiny models have every feature on: head_dim 32 != hidden / heads = 16, a GQA ratio of 2,
query_pre_attn_scalar 24 != head_dim, random norm weights, soft-capping that bites, a local RoPE base
and a linear scaling on the global layers (Gemma 3), and sliding windows of 8 tokens on the local layers,
so that every sequence here runs past the window. transformers' own forwards are the reference."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import assert_greedy_decode_equals_reference, write_tiny_model
from signround_export.checkpoint.read import read_checkpoint
from signround_export.cli import main
from signround_export.errors import GGUFExportError, ModelError, UnsupportedModelError
from signround_export.export.gguf import export_gguf, read_gguf_weights
from signround_export.export.onnx import export_onnx
from signround_export.model.config import ModelConfig
from signround_export.model.load import load_float_model, reference_from_checkpoint
from signround_export.validation import validate

try:
    import llama_cpp
except ImportError:
    llama_cpp = None

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


@pytest.mark.parametrize("model_type,tied,extra", [("gemma2", True, {}), ("gemma3_text", True, {}),
                                                   ("gemma3_text", False, {"attn_logit_softcapping": 2.0})])
def test_logits_match_transformers(tmp_path, model_type, tied, extra):
    folder = gemma_model(tmp_path / "m", model_type, tied=tied, **extra)
    ours, _, _ = load_float_model(folder)
    cfg = ours.cfg
    assert cfg.head_dim == 32 != cfg.hidden_size // cfg.n_heads and cfg.n_heads // cfg.n_kv_heads == 2
    assert cfg.attention_scale == 24 ** -0.5 and cfg.final_softcap == 3.0
    # transformers' Gemma 3 keeps attn_logit_softcapping in its config but never applies it: nor do we
    assert cfg.attn_softcap == (2.0 if model_type == "gemma2" else None)
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
    assert_greedy_decode_equals_reference(tuned, tmp_path / "onnx")


@pytest.fixture(scope="module", params=["gemma2", "gemma3_text"])
def gguf_ready(request, tmp_path_factory):
    """A tuned tiny Gemma whose attention scale is llama.cpp's (query_pre_attn_scalar = head_dim), and its
    GGUF file."""
    base = tmp_path_factory.mktemp(request.param + "_gguf")
    model = gemma_model(base / "model", request.param, query_pre_attn_scalar=32)
    ckpt = base / "ckpt"
    assert main(["tune", str(model), "--out", str(ckpt), "--iters", "4", "--nsamples", "4", "--seqlen", "32",
                 "--batch-size", "2", "--bits", "4", "--group-size", "32", "--quiet"]) == 0
    report = export_gguf(read_checkpoint(ckpt), base / "m.gguf", tokenizer_pre_name="gpt-2")
    return ckpt, base / "m.gguf", report


def test_gguf_names_norms_and_read_back(gguf_ready):
    ckpt_dir, path, report = gguf_ready
    ckpt = read_checkpoint(ckpt_dir)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    names = {t.name for t in report.tensors}
    assert {"blk.0.attn_norm.weight", "blk.0.post_attention_norm.weight", "blk.0.ffn_norm.weight",
            "blk.0.post_ffw_norm.weight", "output_norm.weight"} <= names and "output.weight" not in names
    assert ({"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names) == cfg.family.qk_norm
    assert all(t.exact for t in report.tensors if t.quantized)
    from gguf import GGUFReader
    raw = {t.name: np.asarray(t.data) for t in GGUFReader(str(path)).tensors}
    want = ckpt.tensors["model.layers.0.pre_feedforward_layernorm.weight"]
    np.testing.assert_array_equal(raw["blk.0.ffn_norm.weight"], want + np.float32(1))  # llama.cpp's 1 + w
    weights, _ = read_gguf_weights(path, cfg)
    for name in ("model.layers.0.post_attention_layernorm.weight", "model.norm.weight"):
        np.testing.assert_allclose(weights[name], ckpt.tensors[name], atol=1e-7)
    np.testing.assert_array_equal(weights["model.layers.0.self_attn.q_proj.weight"],
                                  ckpt.qweights["model.layers.0.self_attn.q_proj"].dequantize())


def without(ref, feature: str):
    """The reference with one feature of the config taken away, to show llama.cpp computes it."""
    cfg = ref.cfg
    changes = {"windows": {"windows": (None,) * cfg.n_layers},
               "attention soft-capping": {"attn_softcap": None},
               "final soft-capping": {"final_softcap": None},
               "local RoPE base": {"local_rope_theta": None}}[feature]
    ref.cfg = dataclasses.replace(cfg, **changes)
    return ref


@pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (make setup builds it)")
def test_llama_cpp_runs_the_file_like_the_reference(gguf_ready):
    """llama.cpp quantizes activations to 8 bits for Q5_0 layers: measured top-1 0.988 / 0.980 and mean KL
    6.5e-5 / 1.3e-4 (gemma2 / gemma3_text) over 256 tokens in windows of 128, 16 times the sliding window.
    A reference without the windows, the attention soft-capping (gemma2) or the local RoPE base (gemma3) is
    far from llama.cpp, and llama.cpp's logits stay within the final soft-capping the reference needs."""
    ckpt_dir, path, _ = gguf_ready
    result = validate(ckpt_dir, gguf=path, tokens=256, window=128, gguf_runner="llama.cpp", progress=False)
    gguf = result.artifact("gguf")
    assert result.passed and "llama.cpp" in gguf.runner
    assert gguf.scores.top1 >= 0.95 and gguf.scores.kl_mean <= 1e-3, gguf.scores
    ckpt = read_checkpoint(ckpt_dir)
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    assert llm.metadata["general.architecture"] == ModelConfig.from_hf(ckpt.hf_config).family.gguf_arch
    ids = list(range(3, 3 + 64))
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    features = ["windows"] + (["attention soft-capping"] if cfg.attn_softcap else []) + (
        ["local RoPE base"] if cfg.local_rope_theta is not None else [])
    uncapped = without(reference_from_checkpoint(ckpt), "final soft-capping").logits(torch.tensor(ids)[None])[0]
    assert got.abs().max() < cfg.final_softcap < uncapped.abs().max()
    errors = {}
    for case in ["as configured"] + features:
        ref = reference_from_checkpoint(ckpt)
        want = (ref if case == "as configured" else without(ref, case)).logits(torch.tensor(ids)[None])[0]
        errors[case] = float((got - want).abs().mean() / want.std())
    assert errors["as configured"] < 0.05, errors
    assert all(errors[f] > 4 * errors["as configured"] for f in features), errors


def gemma_config(tmp_path, model_type="gemma2", **extra) -> dict:
    folder = gemma_model(tmp_path / "m", model_type, **extra)
    return json.loads((folder / "config.json").read_text())


def test_multimodal_gemma3_is_refused_by_name():
    hf = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}, "vision_config": {}}
    with pytest.raises(UnsupportedModelError, match="nests a text_config.*model_type gemma3_text"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("change,match", [
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention is true in this gemma3_text config"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' in this gemma3_text config"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope scaling on the sliding-window layers"),
])
def test_gemma3_configs_that_cannot_be_computed_are_refused(tmp_path, change, match):
    hf = gemma_config(tmp_path, "gemma3_text") | change
    with pytest.raises(UnsupportedModelError, match=match):
        ModelConfig.from_hf(hf)


def test_layer_pattern_without_layer_types(tmp_path):
    """Configs written before transformers listed layer_types: every 2nd (gemma2) or 6th (gemma3_text,
    or sliding_window_pattern) layer is global."""
    hf = gemma_config(tmp_path, "gemma2")
    del hf["layer_types"]
    assert ModelConfig.from_hf(hf | {"num_hidden_layers": 4}).local_layers == (0, 2)
    hf3 = json.loads((gemma_model(tmp_path / "g3", "gemma3_text") / "config.json").read_text())
    del hf3["layer_types"]
    assert ModelConfig.from_hf(hf3 | {"num_hidden_layers": 7}).local_layers == (0, 1, 2, 3, 4, 6)
    cfg = ModelConfig.from_hf(hf3 | {"num_hidden_layers": 4, "sliding_window_pattern": 2})
    assert cfg.local_layers == (0, 2) and cfg.window(0) == 8 and cfg.window(1) is None
    with pytest.raises(ModelError, match="layer_types"):
        ModelConfig.from_hf(hf | {"layer_types": ["sliding_attention"]})


@pytest.mark.parametrize("model_type,change,match", [
    ("gemma2", {}, "attention scale 0.204124 \\(query_pre_attn_scalar 24\\) where llama.cpp's 'gemma2' graph "
                   "uses 0.176777"),
    ("gemma2", {"query_pre_attn_scalar": 32, "attn_logit_softcapping": None},
     "attn_logit_softcapping None, where llama.cpp's 'gemma2' graph always soft-caps attention"),
    ("gemma2", {"query_pre_attn_scalar": 32, "final_logit_softcapping": None},
     "final_logit_softcapping None, where llama.cpp's 'gemma2' graph always soft-caps the logits"),
    ("gemma2", {"query_pre_attn_scalar": 32, "tied": False}, "an lm_head of its own"),
])
def test_gguf_refuses_what_llama_cpp_hard_codes(tmp_path, model_type, change, match):
    from signround_export.model.load import float_checkpoint
    folder = gemma_model(tmp_path / "m", model_type, **change)
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(float_checkpoint(folder), tmp_path / "m.gguf", tokenizer_pre_name="gpt-2")
    assert not (tmp_path / "m.gguf").exists()


def test_tune_for_gguf_refuses_before_tuning(tmp_path, capsys):
    folder = gemma_model(tmp_path / "m", "gemma2")
    assert main(["tune", str(folder), "--out", str(tmp_path / "ck"), "--gguf", "Q4_0", "--iters", "4",
                 "--quiet"]) == 2
    assert "query_pre_attn_scalar 24" in capsys.readouterr().err and not (tmp_path / "ck").exists()


def test_tune_for_gguf_refuses_a_quantized_head_before_tuning(tmp_path, capsys):
    """gemma2's llama.cpp graph reads the head from token_embd: a head quantized apart cannot be written."""
    folder = gemma_model(tmp_path / "m", "gemma2", query_pre_attn_scalar=32)
    assert main(["tune", str(folder), "--out", str(tmp_path / "ck"), "--gguf", "Q4_0", "--iters", "4",
                 "--quant-lm-head", "--quiet"]) == 2
    assert "an lm_head of its own" in capsys.readouterr().err and not (tmp_path / "ck").exists()
