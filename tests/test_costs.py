"""The cost tables against the bytes the exporters actually write."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import rtn_checkpoint, write_tiny_model
from signround_export import export_gguf, export_onnx
from signround_export.checkpoint.read import read_checkpoint
from signround_export.cli import main
from signround_export.export.gguf.read import read_gguf_weights
from signround_export.model.config import ModelConfig
from signround_export.tune.costs import cost_table, gguf_bytes, layer_costs, onnx_bytes

NBITS_INPUTS = (".B", ".scales", ".zero_points")


def block_shapes(ckpt) -> dict[str, tuple[int, int]]:
    return {n: qw.shape for n, qw in ckpt.qweights.items() if n.startswith("model.layers.")}


@pytest.mark.parametrize("bits,group,sym", [(2, 32, False), (4, 64, True), (8, 128, False), (4, 128, False)])
def test_onnx_cost_is_the_bytes_of_the_matmulnbits_initializers(tmp_path, tiny_model, bits, group, sym):
    """hidden 64 and intermediate 160: group 128 pads K to whole blocks, group 64 pads the MLP's 160."""
    ckpt = read_checkpoint(rtn_checkpoint(tiny_model, tmp_path / "c", bits=bits, group_size=group, sym=sym))
    export_onnx(ckpt, tmp_path / "onnx", max_block=128, progress=False)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    written = sum(numpy_helper.to_array(t).nbytes for t in graph.initializer if t.name.endswith(NBITS_INPUTS))
    predicted = sum(onnx_bytes(n, k, bits, group, sym) for n, k in block_shapes(ckpt).values())
    assert written == predicted
    label = f"W{bits}G{group}"
    assert predicted == sum(layer_costs("onnx", s, sym)[label][1] for s in block_shapes(ckpt).values())


def test_onnx_cost_at_a_smaller_max_block_pays_the_repeated_scales(tmp_path, tiny_model):
    ckpt = read_checkpoint(rtn_checkpoint(tiny_model, tmp_path / "c", bits=4, group_size=128))
    export_onnx(ckpt, tmp_path / "onnx", max_block=32, progress=False)
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    written = sum(numpy_helper.to_array(t).nbytes for t in graph.initializer if t.name.endswith(NBITS_INPUTS))
    shapes = block_shapes(ckpt).values()
    assert written == sum(onnx_bytes(n, k, 4, 128, False, max_block=32) for n, k in shapes)
    # on rows a multiple of 128 (no padding), the repeated scales make the file larger
    assert onnx_bytes(576, 576, 4, 128, False, max_block=32) > onnx_bytes(576, 576, 4, 128, False)


@pytest.mark.parametrize("gguf_type", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q4_k", "q6_k"])
def test_gguf_cost_is_the_bytes_of_the_written_tensors(tmp_path, gguf_type):
    """intermediate 256: down_proj's rows take the K-quants, the 64-wide rows their fallback."""
    model = write_tiny_model(tmp_path / "m", intermediate=256)
    out = tmp_path / "c"
    assert main(["tune", str(model), "--out", str(out), "--gguf", gguf_type, "--iters", "0", "--quiet"]) == 0
    ckpt = read_checkpoint(out)
    export_gguf(ckpt, tmp_path / "m.gguf", progress=False)
    weights, types = read_gguf_weights(tmp_path / "m.gguf", ModelConfig.from_hf(ckpt.hf_config))
    for name, (n, k) in block_shapes(ckpt).items():
        t = types[name + ".weight"]
        assert weights.tensors[name + ".weight"].n_bytes == gguf_bytes(n, k, t) == layer_costs("gguf", (n, k), True)[t][1]
    assert {types[n + ".weight"] for n in block_shapes(ckpt)} >= {gguf_type.upper()}


def test_choices_follow_the_row_width():
    assert list(layer_costs("gguf", (576, 576), True)) == ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
    assert set(layer_costs("gguf", (576, 1536), True)) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                                                           "Q4_K", "Q5_K", "Q6_K"}
    costs = layer_costs("onnx", (576, 576), False)
    assert len(costs) == 9 and list(costs)[0] == "W2G128" and list(costs)[-1] == "W8G32"
    assert np.all(np.diff([b for _, b in costs.values()]) >= 0)  # cheapest first


def test_a_target_no_choice_reaches_is_refused_by_name():
    with pytest.raises(ValueError, match="no GGUF type holds model.layers.0.mlp.down_proj"):
        cost_table("gguf", {"model.layers.0.mlp.down_proj": (64, 100)}, True)
    with pytest.raises(ValueError, match="choose one of onnx, gguf"):
        cost_table("tflite", {"x": (64, 64)}, True)
