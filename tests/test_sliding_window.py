"""Sliding-window attention through every stage: Mistral and Phi-3 (a window on every layer) and Qwen2/Qwen3
with use_sliding_window (a mix of sliding and full layers, by max_window_layers or by layer_types).

The tiny models slide over 16 positions and the tests run 48 or more, so positions past the window
are checked; transformers' own forward is the reference for ours, and ours for the exports."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import write_tiny_model
from signround_export.checkpoint.read import read_checkpoint
from signround_export.cli import main
from signround_export.errors import GGUFExportError, ModelError
from signround_export.export.gguf import export_gguf
from signround_export.export.onnx import build, export_onnx
from signround_export.model.config import ModelConfig
from signround_export.model.load import load_float_model, reference_from_checkpoint
from signround_export.tune.config import TuneConfig
from signround_export.tune.kl_probe import KLProbe
from signround_export.tune.signround import tune
from signround_export.validation import validate

WINDOW = 16
QWEN = {"bos_token_id": 0, "eos_token_id": 0}  # the tiny tokenizer's one special token
# name -> (model_type, config keys, each layer's window); qwen3's head_dim 32 as in test_qwen3.py
MODELS = {
    "mistral": ("mistral", {"sliding_window": WINDOW}, (WINDOW,) * 2),
    "qwen2": ("qwen2", QWEN | {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
              (None, WINDOW, WINDOW)),
    "qwen3": ("qwen3", QWEN | {"use_sliding_window": True, "sliding_window": WINDOW, "head_dim": 32,
                               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
              (WINDOW, None, WINDOW)),
    "phi3": ("phi3", QWEN | {"pad_token_id": 0, "sliding_window": WINDOW}, (WINDOW,) * 2),  # fused qkv, gate_up
}


def sliding_model(folder, name: str):
    model_type, extra, windows = MODELS[name]
    return write_tiny_model(folder, model_type=model_type, layers=len(windows), extra=extra)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """name -> (float model folder, its round-to-nearest W4G32 checkpoint)."""
    out = {}
    for name in MODELS:
        base = tmp_path_factory.mktemp(name)
        model, ckpt = sliding_model(base / "model", name), base / "ckpt"
        assert main(["tune", str(model), "--out", str(ckpt), "--iters", "0", "--bits", "4", "--group-size", "32",
                     "--quiet"]) == 0
        out[name] = model, ckpt
    return out


def without_windows(model):
    """The same model with every layer attending to the whole past."""
    model.cfg = dataclasses.replace(model.cfg, windows=())
    return model


# -- config.json -> each layer's window, as transformers reads it


def hf_config(model_type: str, **keys) -> dict:
    return {"model_type": model_type, "vocab_size": 320, "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 4, "num_attention_heads": 4, "max_position_embeddings": 512, **keys}


def transformers_windows(hf: dict) -> tuple:
    """Each layer's window as transformers' modeling code sets it."""
    c = AutoConfig.for_model(**hf)
    if hf["model_type"] in ("mistral", "phi3"):  # every layer reads config.sliding_window
        return (c.sliding_window,) * c.num_hidden_layers
    return tuple(c.sliding_window if t == "sliding_attention" else None for t in c.layer_types)


@pytest.mark.parametrize("model_type, keys, want", [
    ("mistral", {"sliding_window": 16}, (16,) * 4),
    ("mistral", {"sliding_window": None}, (None,) * 4),  # Mistral v0.2+
    ("mistral", {}, (4096,) * 4),  # transformers' default when the key is left out
    ("qwen2", {"sliding_window": 16}, (None,) * 4),  # use_sliding_window is false by default
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2}, (None, None, 16, 16)),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 16}, (None,) * 4),  # max_window_layers 28 by default
    ("qwen3", {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0,
               "layer_types": ["full_attention", "sliding_attention"] * 2}, (None, 16, None, 16)),
    ("qwen3", {"use_sliding_window": False, "sliding_window": 16,
               "layer_types": ["sliding_attention"] * 4}, (None,) * 4),
    ("llama", {"sliding_window": 16}, (None,) * 4),  # llama's modeling code reads no window
    ("phi3", {"sliding_window": 16}, (16,) * 4),
    ("phi3", {}, (None,) * 4),  # Phi-3's default is no window (Mistral's is 4096)
])
def test_windows_are_read_as_transformers_reads_them(model_type, keys, want):
    hf = hf_config(model_type, **keys)
    assert ModelConfig.from_hf(hf).windows == want
    if model_type != "llama":
        assert transformers_windows(hf) == want


def test_a_window_as_long_as_the_context_is_kept_and_limits_nothing():
    cfg = ModelConfig.from_hf(hf_config("mistral", sliding_window=512))
    assert cfg.windows == (512,) * 4 and cfg.window(0) is None
    assert ModelConfig.from_hf(hf_config("mistral", sliding_window=511)).window(3) == 511


@pytest.mark.parametrize("keys, message", [
    ({"layer_types": ["sliding_attention"] * 3}, "layer_types in config.json must give one of"),
    ({"layer_types": ["local", "global"] * 2}, "layer_types in config.json must give one of"),
    ({"sliding_window": 0}, "sliding_window 0 in config.json: give a positive number"),
])
def test_bad_window_settings_are_named(keys, message):
    hf = hf_config("qwen2", **({"use_sliding_window": True, "sliding_window": 16} | keys))
    with pytest.raises(ModelError, match=message):
        ModelConfig.from_hf(hf)


# -- the forward


@pytest.mark.parametrize("name", MODELS)
def test_logits_match_transformers_past_the_window(tmp_path, name):
    folder = sliding_model(tmp_path / "m", name)
    ours, _, _ = load_float_model(folder)
    assert ours.cfg.windows == MODELS[name][2]
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(ids).logits
    got = ours.logits(ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    # without the window the first WINDOW positions are the same and every later one is far off
    full = without_windows(ours).logits(ids)
    assert torch.allclose(full[:, :WINDOW], want[:, :WINDOW], atol=1e-4, rtol=1e-4)
    off = (full[:, WINDOW:] - want[:, WINDOW:]).abs().amax(dim=-1)
    assert off.min() > 1e-2, off.min()


def test_a_layer_without_a_window_keeps_the_causal_path_bit_for_bit(tmp_path):
    """qwen3's layer 1 has no window, and a window the sequence fits in changes nothing: SDPA's causal path."""
    model, _, _ = load_float_model(sliding_model(tmp_path / "m", "qwen3"))
    ids = torch.randint(0, model.cfg.vocab_size, (1, WINDOW), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.logits(ids), without_windows(model).logits(ids))


# -- tuning and the allocation's KL probe run each block with its own window


def test_tuning_and_the_kl_probe_see_the_windows(folders):
    model, _, _ = load_float_model(folders["qwen2"][0])
    calib = torch.randint(0, model.cfg.vocab_size, (4, 48), generator=torch.Generator().manual_seed(3))
    config = TuneConfig(bits=4, group_size=32, iters=3, nsamples=4, seqlen=48, batch_size=2)
    windowed = tune(model, calib, config, device="cpu", progress=False)
    moments = list(KLProbe(model, calib).moments.values())
    full = without_windows(model)
    plain = tune(full, calib, config, device="cpu", progress=False)
    full_moments = list(KLProbe(full, calib).moments.values())
    losses = [(a.loss_before, b.loss_before) for a, b in zip(windowed.blocks, plain.blocks)]
    assert losses[0][0] == losses[0][1], losses  # block 0 attends to the whole past in both
    assert all(a != b for a, b in losses[1:]), losses  # blocks 1 and 2 slide
    assert all(b.loss_after <= b.loss_before for b in windowed.blocks)
    same = [bool(torch.equal(a, b)) for a, b in zip(moments, full_moments)]
    assert all(same[:7]) and not all(same[7:]), same  # the linears' inputs differ from block 1 on


def test_a_tuned_checkpoint_exports_exactly(folders, tmp_path):
    ckpt = tmp_path / "ckpt"
    assert main(["tune", str(folders["mistral"][0]), "--out", str(ckpt), "--iters", "4", "--nsamples", "4",
                 "--seqlen", "48", "--batch-size", "2", "--bits", "4", "--group-size", "32", "--quiet"]) == 0
    export_onnx(read_checkpoint(ckpt), tmp_path / "onnx", accuracy_level=0)
    onnx = validate(ckpt, onnx=tmp_path / "onnx", tokens=256, window=128, progress=False).artifact("onnx")
    assert onnx.scores.top1 == 1.0 and onnx.scores.kl_mean <= 1e-6, onnx.scores


# -- ONNX: GroupQueryAttention's local_window_size


@pytest.mark.parametrize("name", MODELS)
def test_onnx_at_accuracy_level_0_is_exact(folders, tmp_path, name):
    ckpt = folders[name][1]
    export_onnx(read_checkpoint(ckpt), tmp_path / "onnx", accuracy_level=0)
    result = validate(ckpt, onnx=tmp_path / "onnx", tokens=256, window=128, progress=False)
    onnx = result.artifact("onnx")
    assert result.passed and onnx.scores.top1 == 1.0 and onnx.scores.kl_mean <= 1e-6, onnx.scores


@pytest.mark.parametrize("shift", [-1, 1])
def test_local_window_size_is_the_window_itself(folders, tmp_path, monkeypatch, shift):
    """local_window_size = W matches transformers' t - W < s <= t on onnxruntime 1.24.1 and later (1.32
    here); W - 1 and W + 1 are far off, so the exact test above would fail with either. (1.20.0 to 1.23.2
    matched with W - 1 instead: the reason runtime/pyproject.toml asks for 1.24.1.)"""
    monkeypatch.setattr(build, "local_window_size", lambda w: -1 if w is None else w + shift)
    ckpt = folders["mistral"][1]
    export_onnx(read_checkpoint(ckpt), tmp_path / "onnx", accuracy_level=0)
    onnx = validate(ckpt, onnx=tmp_path / "onnx", tokens=256, window=128, progress=False).artifact("onnx")
    assert onnx.scores.kl_mean > 1e-3, onnx.scores


def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model.logits(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("name", ["mistral", "qwen3"])
def test_runtime_greedy_decode_past_the_window_equals_the_reference(folders, tmp_path, name):
    runtime = pytest.importorskip("signround_runtime")
    ckpt = read_checkpoint(folders[name][1])
    export_onnx(ckpt, tmp_path / "onnx", accuracy_level=0)
    prompt = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    n = 40  # 24 + 40 positions: every token decoded past the window
    want = greedy(reference_from_checkpoint(ckpt), prompt, n)
    assert want != greedy(without_windows(reference_from_checkpoint(ckpt)), prompt, n)  # the window matters
    got = runtime.Model(tmp_path / "onnx", threads=2).generate([prompt, prompt[:5]], max_new_tokens=n,
                                                                  stop_ids=set())
    assert got.tokens[0] == want
    assert got.tokens[1] == greedy(reference_from_checkpoint(ckpt), prompt[:5], n)  # batched, shorter prompt
    og = pytest.importorskip("onnxruntime_genai")  # onnxruntime-genai runs the folder unchanged
    model = og.Model(str(tmp_path / "onnx"))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    while not gen.is_done():
        gen.generate_next_token()
    assert [int(t) for t in gen.get_sequence(0)][len(prompt):] == want


# -- GGUF: llama.cpp's llama / qwen2 / qwen3 architectures read no window (phi3's loader disables the one it reads)


@pytest.mark.parametrize("name", MODELS)
def test_gguf_export_is_refused_by_name(folders, tmp_path, name):
    with pytest.raises(GGUFExportError, match="sliding-window attention .* which llama.cpp's "
                                              "'(llama|qwen2|qwen3|phi3)' architecture does not read"):
        export_gguf(read_checkpoint(folders[name][1]), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_tune_for_gguf_is_refused_before_tuning(folders, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert main(["tune", str(folders["qwen2"][0]), "--out", str(out), "--gguf", "q4_0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--gguf asks for a GGUF file, but this qwen2 model has sliding-window attention" in err, err
    assert not out.exists() and not (tmp_path / "ckpt.progress").exists()


def test_a_window_as_long_as_the_context_exports_to_gguf(tmp_path):
    folder = write_tiny_model(tmp_path / "m", model_type="mistral", extra={"sliding_window": 512})
    assert main(["tune", str(folder), "--out", str(tmp_path / "ckpt"), "--iters", "0", "--bits", "4",
                 "--group-size", "32", "--quiet"]) == 0
    report = export_gguf(read_checkpoint(tmp_path / "ckpt"), tmp_path / "m.gguf", tokenizer_pre_name="gpt-2")
    assert all(t.exact for t in report.tensors if t.quantized)
