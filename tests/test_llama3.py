"""Llama 3.x: rope scaling (llama3, linear) in the ONNX and GGUF exports and the runtime, on tiny models
whose original context (32) is shorter than the test windows (the forward against transformers is in
test_llama.py); BOS from the tokenizer's post-processor in the GGUF file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_llama import LINEAR, LLAMA3
from transformers import AutoConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import signround_export.export.gguf.write as gguf_write
from conftest import reference_greedy, rtn_checkpoint, write_tiny_model
from signround_export.checkpoint.read import read_checkpoint
from signround_export.errors import ModelError, UnsupportedModelError
from signround_export.export.gguf import export_gguf, read_gguf_weights
from signround_export.export.onnx import export_onnx
from signround_export.model.config import ModelConfig
from signround_export.model.load import reference_from_checkpoint
from signround_export.model.rope import rope_divisors, rope_tables
from signround_export.validation import validate

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (make setup builds it)")

ORIGINAL = LLAMA3["rope_scaling"]["original_max_position_embeddings"]  # every test window goes past it


def hf_config(scaling: dict):
    return AutoConfig.for_model("llama", hidden_size=64, num_attention_heads=4, max_position_embeddings=512,
                                rope_theta=10000.0, **scaling)


@pytest.fixture(scope="module")
def llama3_ckpt(tmp_path_factory):
    """A tied Llama 3.2-style tiny model with llama3 scaling, rounded to W4G32 asymmetric."""
    base = tmp_path_factory.mktemp("llama3")
    model = write_tiny_model(base / "model", tied=True, extra=LLAMA3)
    return rtn_checkpoint(model, base / "ckpt", bits=4, group_size=32, sym=False)


def test_config_reads_the_scaling_from_rope_parameters():
    hf = hf_config(LLAMA3).to_dict()
    assert "rope_parameters" in hf and "rope_scaling" not in hf  # what transformers 5 writes
    s = ModelConfig.from_hf(hf).rope_scaling
    assert (s.type, s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_positions) == \
        ("llama3", 8.0, 1.0, 4.0, ORIGINAL)
    old = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10,
           "intermediate_size": 8, "num_hidden_layers": 1, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert ModelConfig.from_hf(old).rope_scaling.factor == 2.0
    assert ModelConfig.from_hf(hf_config({}).to_dict()).rope_scaling is None


@pytest.mark.parametrize("scaling", [LLAMA3, LINEAR], ids=["llama3", "linear"])
def test_divisors_are_transformers_inverse_frequencies(scaling):
    hf = hf_config(scaling)
    cfg = ModelConfig.from_hf(hf.to_dict())
    theirs, _ = ROPE_INIT_FUNCTIONS[cfg.rope_scaling.type](hf)
    base = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(base / rope_divisors(cfg), theirs.double().numpy(), rtol=1e-6)
    if cfg.rope_scaling.type == "llama3":  # a short original context: some pairs kept, some blended, most divided
        d = rope_divisors(cfg)
        assert d[0] == 1.0 and 1.0 < d[1] < 8.0 and np.all(d[2:] == 8.0)
    assert rope_divisors(ModelConfig.from_hf(hf_config({}).to_dict())) is None


def test_plain_tables_are_unchanged():
    cfg = ModelConfig.from_hf(hf_config({}).to_dict())
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    angles = np.arange(300, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos, sin = rope_tables(cfg, 300)
    assert np.array_equal(cos, np.cos(angles).astype(np.float32)) and np.array_equal(sin, np.sin(angles).astype(np.float32))


@pytest.mark.parametrize("rope_type", ["dynamic", "mrope"])
def test_other_scalings_are_refused_by_name(rope_type):  # longrope (and "su"): tests/test_phi3.py; yarn: test_yarn.py
    hf = {"model_type": "llama", "rope_scaling": {"rope_type": rope_type, "factor": 2.0}}
    with pytest.raises(UnsupportedModelError, match=f"rope scaling '{rope_type}' is not supported: .*; supported: "
                                                    "plain RoPE, linear, llama3, longrope, yarn"):
        ModelConfig.from_hf(hf)


def test_a_scaling_without_its_parameters_is_named():
    hf = {"model_type": "llama", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(ModelError, match="rope scaling 'llama3' needs low_freq_factor, high_freq_factor"):
        ModelConfig.from_hf(hf)


def test_onnx_passes_validation_and_the_runtime_decodes_like_the_reference(llama3_ckpt, tmp_path):
    from signround_runtime import Model

    export_onnx(read_checkpoint(llama3_ckpt), tmp_path / "onnx", accuracy_level=0)
    result = validate(llama3_ckpt, onnx=tmp_path / "onnx", tokens=256, window=128, progress=False)
    s = result.artifact("onnx").scores
    assert result.passed and s.top1 == 1.0 and s.kl_mean <= 1e-6, s
    ref = reference_from_checkpoint(read_checkpoint(llama3_ckpt))
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 300, ORIGINAL - 4)]
    got = Model(tmp_path / "onnx", threads=2).generate([prompt], max_new_tokens=40, stop_ids=set()).tokens[0]
    assert got == reference_greedy(ref, prompt, 40)  # 36 of them past the original context


def test_gguf_carries_the_llama3_divisors_and_reads_back(llama3_ckpt, tmp_path):
    from gguf import GGUFReader

    ckpt = read_checkpoint(llama3_ckpt)
    cfg = ModelConfig.from_hf(ckpt.hf_config)
    report = export_gguf(ckpt, tmp_path / "m.gguf", tokenizer_pre_name="gpt-2")
    assert report.tensors[-1].name == "rope_freqs.weight" and report.tensors[-1].type == "F32"
    t = {t.name: t for t in GGUFReader(tmp_path / "m.gguf").tensors}["rope_freqs.weight"]
    assert np.array_equal(np.asarray(t.data), rope_divisors(cfg).astype(np.float32))
    weights, _ = read_gguf_weights(tmp_path / "m.gguf", cfg)
    assert "rope_freqs.weight" not in weights and "model.embed_tokens.weight" in weights


@needs_llama
def test_llama_cpp_agrees_past_the_original_context(llama3_ckpt, tmp_path, monkeypatch):
    scores = {}
    for case in ("right", "no scaling"):
        if case == "no scaling":  # a broken export for contrast: the test must be able to fail
            monkeypatch.setattr(gguf_write, "rope_tensors", lambda cfg: [])
        path = tmp_path / f"{case}.gguf"
        export_gguf(read_checkpoint(llama3_ckpt), path, tokenizer_pre_name="gpt-2")
        result = validate(llama3_ckpt, gguf=path, tokens=256, window=128, progress=False)
        scores[case] = (result.passed, result.artifact("gguf").scores)
    assert scores["right"][0] and scores["right"][1].top1 >= 0.95 and scores["right"][1].kl_mean <= 5e-4, scores
    assert not scores["no scaling"][0], scores


@needs_llama
def test_llama_cpp_reads_linear_scaling(tmp_path):
    from gguf import GGUFReader

    ckpt = rtn_checkpoint(write_tiny_model(tmp_path / "m", tied=False, extra=LINEAR), tmp_path / "ckpt",
                          bits=4, group_size=32, sym=False)
    export_gguf(read_checkpoint(ckpt), tmp_path / "m.gguf", tokenizer_pre_name="gpt-2")
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 4.0
    result = validate(ckpt, gguf=tmp_path / "m.gguf", tokens=256, window=128, progress=False)
    s = result.artifact("gguf").scores
    assert result.passed and s.top1 >= 0.95 and s.kl_mean <= 5e-4, s


def bos_tokenizer(folder):
    """The tiny model's tokenizer made Llama 3-like: its special token is <|begin_of_text|>, which the
    TemplateProcessing post-processor puts before every text; no add_bos_token in tokenizer_config.json."""
    tok = json.loads((folder / "tokenizer.json").read_text().replace("<|endoftext|>", "<|begin_of_text|>"))
    bos = tok["model"]["vocab"]["<|begin_of_text|>"]
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [bos],
                                                 "tokens": ["<|begin_of_text|>"]}},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
    return bos


@needs_llama
def test_bos_comes_from_the_post_processor(llama3_ckpt, tmp_path):
    import shutil

    from gguf import GGUFReader
    from tokenizers import Tokenizer

    folder = tmp_path / "ckpt"
    shutil.copytree(llama3_ckpt, folder)
    bos = bos_tokenizer(folder)
    export_gguf(read_checkpoint(folder), tmp_path / "m.gguf", tokenizer_pre_name="gpt-2")
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    assert fields["tokenizer.ggml.bos_token_id"].contents() == bos
    text = "The quick brown fox jumps over the lazy dog; rounding offsets are tuned."
    want = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    got = llm.tokenize(text.encode(), add_bos=True)
    assert got[0] == bos and got == want
