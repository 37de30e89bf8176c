"""Phi-3 / Phi-3.5 / Phi-4-mini through every stage: fused qkv_proj and gate_up_proj, partial rotary,
longrope scaling, no q/k/v bias.

The tiny models rotate only part of each head (partial_rotary_factor 0.75 of head_dim 64, 0.5 of 32),
have a GQA ratio above 1, and the longrope one has short/long factors with an original context of 256
out of 512 positions (so an attention factor of sqrt(1 + ln 2 / ln 256)); transformers' own Phi-3
forward is the reference for ours."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_greedy_decode_equals_reference, write_tiny_model
from signround_export.checkpoint.read import read_checkpoint
from signround_export.cli import main
from signround_export.errors import GGUFExportError, ModelError, ONNXExportError
from signround_export.export.gguf import export_gguf, read_gguf_weights
from signround_export.export.onnx import export_onnx
from signround_export.model.config import ModelConfig
from signround_export.model.forward import Model
from signround_export.model.load import load_float_model, reference_from_checkpoint
from signround_export.validation import validate

try:
    import llama_cpp
except ImportError:
    llama_cpp = None

# longrope's original context: the tiny model's 512 positions are a factor of 2 past it. llama.cpp pads its
# context to a multiple of 256 and takes the long factors when that exceeds the original context, so a
# shorter original context would put llama.cpp on the long factors whatever n_ctx is asked for.
ORIGINAL = 256
FUSED = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def phi3_model(folder, *, tied=True, hidden=128, heads=2, kv_heads=1, partial=0.75, longrope=True, **extra):
    """A tiny random Phi-3 (Phi-4-mini-like: partial rotary, longrope) with the tiny tokenizer's one
    special token as bos/eos/pad."""
    config = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0, "partial_rotary_factor": partial} | extra
    pairs = int(hidden // heads * partial) // 2
    if longrope:
        config |= {"original_max_position_embeddings": ORIGINAL,
                   "rope_scaling": {"type": "longrope", "short_factor": [1 + 0.07 * j for j in range(pairs)],
                                    "long_factor": [1 + 2.0 * j for j in range(pairs)]}}
    return write_tiny_model(folder, model_type="phi3", hidden=hidden, heads=heads, kv_heads=kv_heads, tied=tied,
                            extra=config)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The longrope, partial-rotary tiny Phi-3 and its checkpoint after a few SignRound steps."""
    base = tmp_path_factory.mktemp("phi3")
    model = phi3_model(base / "model")
    ckpt = base / "ckpt"
    assert main(["tune", str(model), "--out", str(ckpt), "--iters", "4", "--nsamples", "4", "--seqlen", "32",
                 "--batch-size", "2", "--bits", "4", "--group-size", "32", "--quiet"]) == 0
    return ckpt


def transformers_logits(folder, ids):
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return theirs(ids).logits


@pytest.mark.parametrize("case", ["longrope, partial 0.75, tied", "plain rope, partial 0.5, untied"])
def test_logits_match_transformers(tmp_path, case):
    longrope = case.startswith("longrope")
    folder = phi3_model(tmp_path / "m", longrope=longrope, tied=case.endswith(" tied"),
                        **({} if longrope else {"heads": 4, "kv_heads": 2, "partial": 0.5, "sliding_window": 512}))
    ours, _, _ = load_float_model(folder)
    cfg = ours.cfg
    assert cfg.family.linears == FUSED and cfg.n_heads // cfg.n_kv_heads == 2 and not cfg.attention_bias
    assert cfg.rotary_dim == (48 if longrope else 16) < cfg.head_dim
    ids = torch.randint(0, cfg.vocab_size, (2, ORIGINAL), generator=torch.Generator().manual_seed(1))
    want = transformers_logits(folder, ids)
    got = ours.logits(ids)
    err = float((got - want).abs().max())
    assert err < 1e-4, err
    # what each feature changes is far above that: a forward that skipped one could not pass
    if longrope:  # (longrope's factors are per rotary pair: rotating every dimension would need more)
        variants = {"no longrope": dataclasses.replace(cfg, rope_scaling=None),
                    "no attention factor": dataclasses.replace(
                        cfg, rope_scaling=dataclasses.replace(cfg.rope_scaling, attention_factor=1.0))}
    else:
        variants = {"full rotary": dataclasses.replace(cfg, partial_rotary_factor=1.0)}
    for name, other in variants.items():
        off = float((Model(other, ours.tensors).logits(ids) - want).abs().max())
        assert off > 100 * err, (name, off)


def test_longrope_reads_transformers_defaults_and_the_old_name():
    folder_cfg = {"model_type": "phi3", "vocab_size": 320, "hidden_size": 128, "intermediate_size": 160,
                  "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                  "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
                  "partial_rotary_factor": 0.75, "sliding_window": 262144,
                  "rope_scaling": {"type": "su", "short_factor": [1.0] * 24, "long_factor": [2.0] * 24}}
    cfg = ModelConfig.from_hf(folder_cfg)  # Phi-3-128k's layout: "su", top-level original context
    s = cfg.rope_scaling
    assert s.type == "longrope" and s.original_max_positions == 4096 and cfg.context_length == 4096
    assert s.attention_factor == pytest.approx(np.sqrt(1 + np.log(32) / np.log(4096)))
    bad = folder_cfg | {"rope_scaling": folder_cfg["rope_scaling"] | {"short_factor": [1.0] * 32}}
    with pytest.raises(ModelError, match="short_factor has 32 values.*needs 24"):
        ModelConfig.from_hf(bad)


def test_sliding_window_is_honoured_and_refused_for_gguf_by_name(tmp_path):
    """Phi-3-mini-4k's sliding_window (2047 of 4096) on every layer: the forward attends over it as
    transformers does (here with partial rotary; tests/test_sliding_window.py takes phi3 through ONNX), and
    GGUF is refused by name since llama.cpp's phi3 loader disables any window it reads."""
    folder = phi3_model(tmp_path / "m", longrope=False, sliding_window=64)
    ours, _, _ = load_float_model(folder)
    assert ours.cfg.windows == (64,) * ours.cfg.n_layers and ours.cfg.window(0) == 64
    ids = torch.randint(0, ours.cfg.vocab_size, (1, 160), generator=torch.Generator().manual_seed(2))
    want = transformers_logits(folder, ids)
    assert float((ours.logits(ids) - want).abs().max()) < 1e-4
    full = Model(dataclasses.replace(ours.cfg, windows=()), ours.tensors).logits(ids)
    assert float((full[:, 64:] - want[:, 64:]).abs().amax(dim=-1).min()) > 1e-2  # the window matters past it
    ckpt = tmp_path / "ckpt"
    assert main(["tune", str(folder), "--out", str(ckpt), "--iters", "0", "--bits", "4", "--group-size", "32",
                 "--quiet"]) == 0
    with pytest.raises(GGUFExportError, match="sliding-window attention \\(64 tokens on 2 of 2 layers.*"
                                              "llama.cpp's 'phi3' architecture does not read"):
        export_gguf(read_checkpoint(ckpt), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_longrope_past_the_original_context_is_refused(tuned, tmp_path):
    ref = reference_from_checkpoint(read_checkpoint(tuned))
    ref.logits(torch.zeros(1, ORIGINAL, dtype=torch.long))  # the original context itself runs
    with pytest.raises(ModelError, match=f"stops at {ORIGINAL} .*original_max_position_embeddings"):
        ref.logits(torch.zeros(1, ORIGINAL + 1, dtype=torch.long))


def test_weights_of_another_layout_are_refused_by_name(tuned, tmp_path):
    """A checkpoint whose config.json says llama over Phi-3's fused weights (or phi3 over separate ones)
    is refused naming the mismatch, never exported half-named."""
    relabelled = tmp_path / "as-llama"
    shutil.copytree(tuned, relabelled)
    config = json.loads((relabelled / "config.json").read_text())
    (relabelled / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    ckpt = read_checkpoint(relabelled)
    match = "self_attn.qkv_proj, which a llama block does not.*model_type does not match"
    with pytest.raises(GGUFExportError, match=match):
        export_gguf(ckpt, tmp_path / "m.gguf", tokenizer_pre_name="gpt-2")
    with pytest.raises(ONNXExportError, match=match):
        export_onnx(ckpt, tmp_path / "onnx")
    with pytest.raises(ModelError, match=match):
        reference_from_checkpoint(ckpt)
    llama = rtn_checkpoint(write_tiny_model(tmp_path / "llama", model_type="llama"), tmp_path / "llama-ckpt")
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps(config | {"model_type": "phi3"}))
    with pytest.raises(ONNXExportError, match="mlp.gate_proj, mlp.up_proj, self_attn.k_proj, .*phi3 block does not"):
        export_onnx(read_checkpoint(llama), tmp_path / "onnx2")


def test_checkpoint_quantizes_the_fused_linears_as_stored(tuned):
    ckpt = read_checkpoint(tuned)
    assert len(ckpt.qweights) == 8
    for i in range(2):
        for n in FUSED:
            assert f"model.layers.{i}.{n}" in ckpt.qweights
    assert ckpt.qweights["model.layers.0.self_attn.qkv_proj"].shape == (64 * (2 + 1 + 1), 128)
    assert ckpt.qweights["model.layers.0.mlp.gate_up_proj"].shape == (2 * 160, 128)
    raw = json.loads((tuned / "config.json").read_text())
    assert raw["model_type"] == "phi3" and raw["quantization_config"]["group_size"] == 32


@pytest.mark.parametrize("iters", [0, 4])
def test_onnx_at_accuracy_level_0_is_exact(iters, tuned, tmp_path):
    ckpt = tuned
    if iters == 0:
        ckpt = tmp_path / "rtn"
        assert main(["tune", str(tuned.parent / "model"), "--out", str(ckpt), "--iters", "0", "--bits", "4",
                     "--group-size", "32", "--quiet"]) == 0
    export_onnx(read_checkpoint(ckpt), tmp_path / "onnx", accuracy_level=0)
    genai = json.loads((tmp_path / "onnx" / "genai_config.json").read_text())["model"]
    assert genai["type"] == "phi3" and genai["decoder"]["head_size"] == 64 and genai["context_length"] == ORIGINAL
    result = validate(ckpt, onnx=tmp_path / "onnx", tokens=256, window=128, progress=False)
    onnx = result.artifact("onnx")
    assert result.passed and onnx.scores.top1 == 1.0 and onnx.scores.kl_mean <= 1e-6, onnx.scores
    assert len(onnx.exact_layers) == 8 and not any(onnx.layer_errors.values())


def rtn_checkpoint(folder, out):
    assert main(["tune", str(folder), "--out", str(out), "--iters", "0", "--bits", "4", "--group-size", "32",
                 "--quiet"]) == 0
    return out


def test_onnx_takes_rotary_widths_groupqueryattention_accepts(tmp_path):
    """GroupQueryAttention (onnxruntime 1.32) wants cos/sin caches a multiple of 8 wide: 16 of 64
    dimensions rotate exactly; 24 of 32 are refused by name."""
    ckpt = rtn_checkpoint(phi3_model(tmp_path / "m", longrope=False, partial=0.25), tmp_path / "ok")
    export_onnx(read_checkpoint(ckpt), tmp_path / "onnx_ok", accuracy_level=0)
    result = validate(ckpt, onnx=tmp_path / "onnx_ok", tokens=128, window=64, progress=False)
    assert result.passed and result.artifact("onnx").scores.top1 == 1.0
    ckpt = rtn_checkpoint(phi3_model(tmp_path / "m2", longrope=False, heads=4, partial=0.75), tmp_path / "bad")
    with pytest.raises(ONNXExportError, match="24 rotary dimensions per head"):
        export_onnx(read_checkpoint(ckpt), tmp_path / "onnx_bad")


def test_runtime_greedy_equals_the_reference(tuned, tmp_path):
    assert_greedy_decode_equals_reference(tuned, tmp_path / "onnx")


def test_gguf_names_rope_factors_and_read_back(tuned, tmp_path):
    ckpt = read_checkpoint(tuned)
    path = tmp_path / "m.gguf"
    report = export_gguf(ckpt, path, tokenizer_pre_name="gpt-2")
    names = {t.name for t in report.tensors}
    assert {"blk.1.attn_qkv.weight", "blk.1.ffn_up.weight", "rope_factors_long.weight",
            "rope_factors_short.weight"} <= names
    assert not names & {"blk.1.attn_q.weight", "blk.1.ffn_gate.weight"}
    assert all(t.exact for t in report.tensors if t.quantized)
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items() if k.startswith("phi3.")}
    assert fields["phi3.rope.dimension_count"] == 48 and fields["phi3.rope.scaling.original_context_length"] == ORIGINAL
    assert fields["phi3.rope.scaling.attn_factor"] == pytest.approx(np.sqrt(1 + np.log(2) / np.log(ORIGINAL)))
    short = next(t for t in reader.tensors if t.name == "rope_factors_short.weight")
    np.testing.assert_array_equal(short.data, np.float32(ckpt.hf_config["rope_parameters"]["short_factor"]))
    weights, _ = read_gguf_weights(path, ModelConfig.from_hf(ckpt.hf_config))
    for n in FUSED:  # as stored: no row permutation, gate rows first in ffn_up
        np.testing.assert_array_equal(weights[f"model.layers.0.{n}.weight"],
                                      ckpt.qweights[f"model.layers.0.{n}"].dequantize())
    # general.name is the checkpoint folder's name ("ckpt": config.json's _name_or_path is empty); a name
    # saying phi-3 would make llama.cpp strip spaces after special tokens, which this byte-level tokenizer
    # does not do (tests/test_vocab.py covers Phi-3's own tokenizer)
    assert reader.fields["general.name"].contents() == tuned.name == "ckpt"


def test_a_phi3_folder_name_over_a_tokenizer_that_does_not_strip_is_refused(tuned, tmp_path):
    """The architecture is phi3 whatever the name; only the name decides llama.cpp's space stripping, so a
    checkpoint folder named phi3 over this tokenizer is refused naming the fix, and no file is left."""
    named = tmp_path / "tiny-phi3-w4"
    shutil.copytree(tuned, named)
    with pytest.raises(GGUFExportError, match="only in a file named phi-3.*rename the checkpoint folder"):
        export_gguf(read_checkpoint(named), tmp_path / "m.gguf", tokenizer_pre_name="gpt-2")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (make setup builds it)")
def test_llama_cpp_runs_the_file_like_the_reference(tuned, tmp_path):
    """llama.cpp quantizes activations to 8 bits for Q5_0 layers: measured top-1 0.99, mean KL 4e-4 on
    this model. Its context (n_ctx) stays within the original 256 positions, where it takes the short
    factors and the attention factor as the reference does."""
    ckpt = read_checkpoint(tuned)
    path = tmp_path / "m.gguf"
    export_gguf(ckpt, path, tokenizer_pre_name="gpt-2")
    result = validate(tuned, gguf=path, tokens=256, window=128, gguf_runner="llama.cpp", progress=False)
    gguf = result.artifact("gguf")
    assert result.passed and "llama.cpp" in gguf.runner
    assert gguf.scores.top1 >= 0.95 and gguf.scores.kl_mean <= 1e-3, gguf.scores
    assert len(gguf.exact_layers) == 8
    llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=ORIGINAL, n_threads=2, verbose=False)
    assert llm.metadata["general.architecture"] == "phi3"
    ids = list(range(3, 3 + 100))
    llm.eval(ids)
    got = torch.tensor(np.array(llm.scores[: len(ids)]), dtype=torch.float32)
    ref = reference_from_checkpoint(ckpt)
    scaling = ref.cfg.rope_scaling
    cases = {"as configured": ref.cfg,
             "without the attention factor": dataclasses.replace(
                 ref.cfg, rope_scaling=dataclasses.replace(scaling, attention_factor=1.0)),
             "long factors": dataclasses.replace(
                 ref.cfg, rope_scaling=dataclasses.replace(scaling, short_factor=scaling.long_factor))}
    errors = {}
    for case, cfg in cases.items():
        want = Model(cfg, ref.tensors).logits(torch.tensor(ids)[None])[0]
        errors[case] = float((got - want).abs().mean() / want.std())
    # measured: 0.020, 0.108 and 0.55 (mean |difference| / std of the reference's logits)
    assert errors["as configured"] < 0.05, errors
    assert errors["without the attention factor"] > 3 * errors["as configured"], errors
    assert errors["long factors"] > 10 * errors["as configured"], errors


@pytest.fixture(scope="module")
def f16_for_mixes(tmp_path_factory):
    """An F16 GGUF of an 8-layer Phi-3 (so that the mixes' layer rules differ; rows of 256 take K-quants,
    down_proj's 320 the fallbacks), four query heads per key/value head (Q2_K's attn_v rule looks)."""
    from signround_export.model.load import float_checkpoint

    base = tmp_path_factory.mktemp("phi3-mixes")
    model = write_tiny_model(base / "model", model_type="phi3", hidden=256, intermediate=320, layers=8, heads=4,
                             kv_heads=1, extra={"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
                                                "partial_rotary_factor": 0.75})
    export_gguf(float_checkpoint(model), base / "f16.gguf", tokenizer_pre_name="gpt-2")
    return base / "f16.gguf"


@pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (make setup builds it)")
@pytest.mark.parametrize("mix", ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M"])
def test_mixes_follow_llama_quantize_for_the_fused_linears(mix, f16_for_mixes, tmp_path):
    """`tune --gguf MIX` picks llama-quantize's type for attn_qkv (attn_v's rule) and ffn_up (a fused
    gate_up: the mix's base type), tensor by tensor."""
    from gguf import GGUFReader

    from signround_export.export.gguf.mixes import layer_types
    from signround_export.export.gguf.tensors import gguf_name

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{mix}")
    dst = tmp_path / "llama.gguf"
    assert llama_cpp.llama_model_quantize(str(f16_for_mixes).encode(), str(dst).encode(), params) == 0
    theirs = {t.name: t.tensor_type.name for t in GGUFReader(str(dst)).tensors}
    shapes = {f"model.layers.{i}.{n}": (0, 320 if n == "mlp.down_proj" else 256) for i in range(8) for n in FUSED}
    ours = layer_types(mix, shapes, 8, gqa=4)
    for name, t in ours.items():
        assert t == theirs[gguf_name(name + ".weight")], (name, t)
