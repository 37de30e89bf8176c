"""Our LLaMA-family forward against transformers' own implementation on tiny random models."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import write_tiny_model
from signround_export.errors import ModelError, UnsupportedModelError
from signround_export.model.config import ModelConfig
from signround_export.model.load import load_float_model

# Llama 3.x rope scaling with an original context (32) shorter than the test sequence, so it matters
LLAMA3 = {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 32}}
LINEAR = {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}


@pytest.mark.parametrize("model_type,tied,kv_heads,extra", [
    ("llama", True, 2, None), ("llama", False, 4, None), ("qwen2", False, 2, None), ("mistral", True, 1, None),
    ("llama", True, 2, LLAMA3), ("llama", False, 2, LINEAR),
])
def test_logits_match_transformers(tmp_path, model_type, tied, kv_heads, extra):
    folder = write_tiny_model(tmp_path / "m", model_type=model_type, tied=tied, kv_heads=kv_heads, extra=extra)
    ours, _, _ = load_float_model(folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = theirs(ids).logits
    got = ours.logits(ids)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()


def test_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(UnsupportedModelError, match="'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        ModelConfig.from_hf({"model_type": "gpt2"})


def test_dynamic_rope_scaling_is_refused():  # yarn is supported: tests/test_yarn.py
    cfg = {"model_type": "llama", "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}
    with pytest.raises(UnsupportedModelError, match="dynamic"):
        ModelConfig.from_hf(cfg)


@pytest.mark.parametrize("window, use, windows", [
    (4096, None, (4096, 4096)),  # Mistral 7B v0.1: a window shorter than the context, on without a switch
    (None, None, (None, None)),  # Mistral v0.2+: no window
    (32768, None, (32768, 32768)),  # a window as long as the context: kept, and it limits nothing
    (4096, True, (4096, 4096)),  # mistral's config has no switch: transformers ignores use_sliding_window
])
def test_sliding_window_is_read_not_ignored(window, use, windows):
    """tests/test_sliding_window.py has the other families and every stage."""
    hf = {"model_type": "mistral", "vocab_size": 320, "hidden_size": 64, "intermediate_size": 160,
          "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 32768,
          "sliding_window": window}
    if use is not None:
        hf["use_sliding_window"] = use
    cfg = ModelConfig.from_hf(hf)
    assert cfg.windows == windows
    assert [cfg.window(i) for i in range(2)] == [w if w is not None and w < 32768 else None for w in windows]


def test_bad_model_folders(tmp_path, tiny_model):
    with pytest.raises(ModelError, match="no such folder"):
        load_float_model(tmp_path / "nothing-here")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        load_float_model(empty)
    # a truncated weights file
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_model / "config.json").read_text())
    data = (tiny_model / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or corrupt"):
        load_float_model(broken)


def test_nan_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_tiny_model(tmp_path / "m")
    state = load_file(folder / "model.safetensors")
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(state, str(folder / "model.safetensors"))
    model, _, _ = load_float_model(folder)  # reads the headers only; a tensor is checked when it is read
    with pytest.raises(ModelError, match="model.layers.1.mlp.up_proj.weight contains NaN"):
        model.logits(torch.zeros(1, 4, dtype=torch.long))


def test_quantized_folder_is_not_a_float_model(tmp_path, tiny_model):
    folder = tmp_path / "q"
    folder.mkdir()
    cfg = json.loads((tiny_model / "config.json").read_text()) | {"quantization_config": {"quant_method": "gptq"}}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="already quantized"):
        load_float_model(folder)
