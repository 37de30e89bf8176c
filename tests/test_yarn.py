"""YaRN rope scaling through every stage, on a tiny llama and a tiny qwen3 whose original context (32) is a
quarter of the test windows (128): the forward against transformers, the ONNX export exact at accuracy
level 0, the runtime's greedy decode, llama.cpp's agreement (also with a config's own attention factor);
configs llama.cpp would compute otherwise, and dynamic scaling, refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import signround_export.export.gguf.write as gguf_write
from conftest import reference_greedy, rtn_checkpoint, write_tiny_model
from signround_export.checkpoint.read import read_checkpoint
from signround_export.errors import GGUFExportError, ModelError, UnsupportedModelError
from signround_export.export.gguf import export_gguf
from signround_export.export.onnx import export_onnx
from signround_export.model.config import ModelConfig
from signround_export.model.load import load_float_model, reference_from_checkpoint
from signround_export.model.rope import inverse_frequencies, rope_attention_factor, rope_divisors
from signround_export.validation import validate

try:
    import llama_cpp
except ImportError:
    llama_cpp = None
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (make setup builds it)")

ORIGINAL = 32  # every test window goes past it
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
MODELS = {  # model_type -> extra config keys (qwen3: head_dim 32, the tiny tokenizer's one special token)
    "llama": {},
    "qwen3": {"head_dim": 32, "bos_token_id": 0, "eos_token_id": 0},
}


def yarn_model(folder, model_type, **scaling):
    return write_tiny_model(folder, model_type=model_type, tied=model_type == "llama",
                            extra=MODELS[model_type] | {"rope_scaling": YARN | scaling})


def hf_config(model_type, **scaling):
    return AutoConfig.for_model(model_type, hidden_size=64, num_attention_heads=4, num_key_value_heads=4,
                                max_position_embeddings=512,
                                rope_theta=10000.0, rope_scaling=YARN | scaling, **MODELS[model_type])


@pytest.fixture(scope="module", params=list(MODELS))
def yarn_ckpt(request, tmp_path_factory):
    """A tiny model with yarn scaling, rounded to W4G32 asymmetric."""
    base = tmp_path_factory.mktemp(f"yarn-{request.param}")
    return rtn_checkpoint(yarn_model(base / "model", request.param), base / "ckpt", bits=4, group_size=32, sym=False)


@pytest.mark.parametrize("model_type", list(MODELS))
@pytest.mark.parametrize("scaling", [{}, {"truncate": False}, {"attention_factor": 1.3},
                                     {"beta_fast": 16, "beta_slow": 2}, {"mscale": 1.0, "mscale_all_dim": 0.7},
                                     {"factor": None}],
                         ids=["default", "no-truncate", "attention", "betas", "mscale", "implicit-factor"])
def test_tables_are_transformers_yarn(model_type, scaling):
    hf = hf_config(model_type, **scaling)
    cfg = ModelConfig.from_hf(hf.to_dict())
    theirs, attention = ROPE_INIT_FUNCTIONS["yarn"](hf)
    np.testing.assert_allclose(inverse_frequencies(cfg), theirs.double().numpy(), rtol=1e-6)
    assert rope_attention_factor(cfg) == pytest.approx(attention, rel=1e-12) and attention != 1.0
    d = rope_divisors(cfg)  # some pairs kept or blended, the rest divided by factor
    assert d.min() < cfg.rope_scaling.factor and d.max() == pytest.approx(cfg.rope_scaling.factor)


@pytest.mark.parametrize("model_type", list(MODELS))
def test_logits_match_transformers_past_the_original_context(tmp_path, model_type):
    folder = yarn_model(tmp_path / "m", model_type)
    ours, _, _ = load_float_model(folder)
    assert ours.cfg.rope_scaling.type == "yarn"
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 4 * ORIGINAL), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(ids).logits
    got = ours.logits(ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_onnx_is_exact_and_the_runtime_decodes_like_the_reference(yarn_ckpt, tmp_path):
    from signround_runtime import Model

    export_onnx(read_checkpoint(yarn_ckpt), tmp_path / "onnx", accuracy_level=0)
    result = validate(yarn_ckpt, onnx=tmp_path / "onnx", tokens=256, window=128, progress=False)
    s = result.artifact("onnx").scores
    assert result.passed and s.top1 == 1.0 and s.kl_mean <= 1e-6, s
    ref = reference_from_checkpoint(read_checkpoint(yarn_ckpt))
    prompt = [int(t) for t in np.random.default_rng(2).integers(0, 300, ORIGINAL)]
    got = Model(tmp_path / "onnx", threads=2).generate([prompt], max_new_tokens=32, stop_ids=set()).tokens[0]
    assert got == reference_greedy(ref, prompt, 32)  # every one past the original context


@needs_llama
def test_llama_cpp_agrees_past_the_original_context(yarn_ckpt, tmp_path, monkeypatch):
    from gguf import GGUFReader

    scores = {}
    for case in ("right", "no yarn keys"):
        if case == "no yarn keys":  # a broken export for contrast: the test must be able to fail
            monkeypatch.setattr(gguf_write, "add_rope_scaling", lambda w, cfg: None)
        path = tmp_path / f"{case}.gguf"
        export_gguf(read_checkpoint(yarn_ckpt), path, tokenizer_pre_name="gpt-2")
        if case == "right":
            fields = GGUFReader(path).fields
            arch = fields["general.architecture"].contents()
            assert fields[f"{arch}.rope.scaling.type"].contents() == "yarn"
            assert fields[f"{arch}.rope.scaling.factor"].contents() == 4.0
            assert fields[f"{arch}.rope.scaling.original_context_length"].contents() == ORIGINAL
            assert f"{arch}.rope.scaling.attn_factor" not in fields  # llama.cpp's own magnitude is the config's
        result = validate(yarn_ckpt, gguf=path, tokens=256, window=128, progress=False)
        scores[case] = (result.passed, result.artifact("gguf").scores)
    assert scores["right"][0] and scores["right"][1].top1 >= 0.95 and scores["right"][1].kl_mean <= 5e-4, scores
    assert not scores["no yarn keys"][0], scores


@needs_llama
@pytest.mark.parametrize("model_type", list(MODELS))
def test_llama_cpp_reads_another_attention_factor(tmp_path, model_type, monkeypatch):
    """A config's own attention factor reaches llama.cpp as rope.scaling.attn_factor (its yarn multiplies
    it by yarn_mscale(factor)); without the key llama.cpp computes another model."""
    from gguf import GGUFReader

    ckpt = rtn_checkpoint(yarn_model(tmp_path / "m", model_type, attention_factor=1.3), tmp_path / "ckpt",
                          bits=4, group_size=32, sym=False)
    scores = {}
    for case in ("right", "no attn_factor"):
        if case == "no attn_factor":  # a broken export for contrast
            monkeypatch.setattr(gguf_write, "yarn_attn_factor", lambda cfg: 1.0)
        path = tmp_path / f"{case}.gguf"
        export_gguf(read_checkpoint(ckpt), path, tokenizer_pre_name="gpt-2")
        if case == "right":
            field = GGUFReader(path).fields[f"{model_type}.rope.scaling.attn_factor"]
            assert field.contents() == pytest.approx(1.3 / (1 + 0.1 * np.log(4.0)), rel=1e-6)
        result = validate(ckpt, gguf=path, tokens=256, window=128, progress=False)
        scores[case] = (result.passed, result.artifact("gguf").scores)
    assert scores["right"][0] and scores["right"][1].top1 >= 0.95 and scores["right"][1].kl_mean <= 5e-4, scores
    assert not scores["no attn_factor"][0], scores


def test_attn_factor_is_the_config_magnitude_over_llama_cpps():
    default = ModelConfig.from_hf(hf_config("llama").to_dict())
    assert gguf_write.yarn_attn_factor(default) == pytest.approx(1.0, rel=1e-12)
    mscale = ModelConfig.from_hf(hf_config("llama", mscale=1.0, mscale_all_dim=0.5).to_dict())
    ln = np.log(4.0)
    assert gguf_write.yarn_attn_factor(mscale) == pytest.approx(1 / (1 + 0.05 * ln), rel=1e-12)


@pytest.mark.parametrize("scaling,message", [
    ({"truncate": False}, "yarn with truncate false"),
    ({"beta_fast": 16}, "yarn beta_fast 16 / beta_slow 1"),
    ({"beta_slow": 2}, "yarn beta_fast 32 / beta_slow 2"),
])
def test_gguf_refuses_what_llama_cpp_computes_otherwise(scaling, message):
    cfg = ModelConfig.from_hf(hf_config("llama", **scaling).to_dict())
    with pytest.raises(GGUFExportError, match=f"this llama model has {message}.*cannot be exported to GGUF"):
        gguf_write.check_llama_cpp(cfg)
    gguf_write.check_llama_cpp(ModelConfig.from_hf(hf_config("llama").to_dict()))  # the defaults pass


def test_gguf_refuses_yarn_beside_local_layers():
    hf = AutoConfig.for_model("gemma3_text", hidden_size=64, num_attention_heads=4, head_dim=16,
                              num_hidden_layers=2, sliding_window=16, query_pre_attn_scalar=16).to_dict()
    hf["rope_parameters"]["full_attention"] = {"rope_theta": 10000.0} | YARN
    cfg = ModelConfig.from_hf(hf)
    assert cfg.rope_scaling.type == "yarn" and cfg.local_layers
    with pytest.raises(GGUFExportError, match="yarn on the global layers beside local layers of plain RoPE"):
        gguf_write.check_llama_cpp(cfg)


def test_dynamic_is_refused_saying_why():
    hf = {"model_type": "llama", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    with pytest.raises(UnsupportedModelError, match="rope scaling 'dynamic' is not supported: its frequencies change "
                                                    "with the sequence length.*supported: plain RoPE, linear, llama3, "
                                                    "longrope, yarn"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("scaling,message", [
    ({"factor": -2.0}, "factor -2.0"),
    ({"beta_fast": "fast"}, "beta_fast 'fast'"),
    ({"attention_factor": -1.0}, "attention_factor -1.0"),
    ({"truncate": "yes"}, "truncate in config.json is 'yes'"),
])
def test_invalid_yarn_parameters_are_named(scaling, message):
    hf = {"model_type": "llama", "rope_scaling": YARN | scaling}
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_hf(hf)
    with pytest.raises(ModelError, match="rope scaling 'yarn' needs factor"):
        ModelConfig.from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}})


def test_phi3_reads_yarn_as_longrope_like_transformers():
    """transformers' Phi-3 config reads rope_type "yarn" (old Phi-3 configs) as longrope, and so does ours."""
    factors = {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    hf = AutoConfig.for_model("phi3", hidden_size=64, num_attention_heads=4, max_position_embeddings=128,
                              original_max_position_embeddings=32, pad_token_id=0,
                              rope_scaling={"type": "yarn", **factors})
    assert hf.rope_parameters["rope_type"] == "longrope"
    raw = {"model_type": "phi3", "hidden_size": 64, "num_attention_heads": 4, "vocab_size": 10, "intermediate_size": 8,
           "num_hidden_layers": 1, "max_position_embeddings": 128, "original_max_position_embeddings": 32,
           "rope_scaling": {"type": "yarn", **factors}}
    assert ModelConfig.from_hf(raw).rope_scaling.type == "longrope"
    with pytest.raises(ModelError, match="rope scaling 'longrope' \\(config.json's 'yarn'\\) needs short_factor"):
        ModelConfig.from_hf(raw | {"rope_scaling": YARN})
