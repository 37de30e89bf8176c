"""tools/first_layers.py: a folder of a model's first N blocks is that model cut short, block for block."""

import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_model
from signround_export.model.forward import block_forward
from signround_export.model.load import load_float_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from first_layers import first_layers  # noqa: E402


def test_the_first_blocks_are_the_models_own(tmp_path):
    src = write_tiny_model(tmp_path / "model", layers=3, model_type="gemma2",
                           extra={"layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                                  "sliding_window": 8})
    first_layers(src, tmp_path / "cut", 2)
    config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["layer_types"] == ["sliding_attention", "full_attention"]
    whole, _, _ = load_float_model(src)
    cut, _, _ = load_float_model(tmp_path / "cut")
    x = torch.randn(1, 12, whole.cfg.hidden_size)
    for i in range(2):
        a, b = whole.block_params(i), cut.block_params(i)
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
        assert torch.equal(block_forward(cut.cfg, b, x, *cut.ropes(12)[i], window=cut.cfg.window(i)),
                           block_forward(whole.cfg, a, x, *whole.ropes(12)[i], window=whole.cfg.window(i)))
    assert torch.equal(cut.tensors["model.embed_tokens.weight"], whole.tensors["model.embed_tokens.weight"])
    assert (tmp_path / "cut" / "tokenizer.json").is_file()


def test_more_layers_than_the_model_has_is_refused(tmp_path):
    src = write_tiny_model(tmp_path / "model", layers=2)
    with pytest.raises(SystemExit, match="has 2 decoder blocks"):
        first_layers(src, tmp_path / "cut", 3)
    assert not (tmp_path / "cut").exists()
