"""Exports hold a bounded part of the model at once (issue 18): the GGUF and ONNX exporters read each
layer of the checkpoint once and drop it, and give the same bytes as from plain dicts; over the
protobuf limit (forced low here) the ONNX folder keeps its weights in model.onnx.data and runs like the
one-file folder; float_checkpoint reads a float model's tensors only when an exporter takes them."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_greedy_decode_equals_reference, rtn_checkpoint, write_tiny_model
from residency import Resident

from signround_export.checkpoint.read import read_checkpoint
from signround_export.export.gguf import export_gguf
from signround_export.export.onnx import export_onnx
from signround_export.model.load import float_checkpoint
from signround_export.model.store import TensorStore

LAYERS = 4


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def resident(ckpt):
    """The checkpoint with its layers and tensors behind Residents (each indexing a fresh copy, counted)."""
    return replace(ckpt, qweights=Resident(ckpt.qweights), tensors=Resident(ckpt.tensors))


def peak_blocks(ckpt) -> int:
    return max(ckpt.qweights.peak_blocks, ckpt.tensors.peak_blocks)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-block qwen2 model (q/k/v biases: a layer's bias is a tensor of its own in GGUF) and its W4
    checkpoint with a quantized head."""
    base = tmp_path_factory.mktemp("streamed")
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}  # the tiny tokenizer's one special token
    model = write_tiny_model(base / "model", model_type="qwen2", layers=LAYERS, tied=False, extra=special)
    return model, rtn_checkpoint(model, base / "ckpt", bits=4, group_size=32, quant_lm_head=True)


def test_resident_sees_a_stage_that_collects_every_block(deep):
    """The measure can fail: holding every layer at once reaches the model's depth."""
    ckpt = resident(read_checkpoint(deep[1]))
    held = [ckpt.qweights[m] for m in ckpt.qweights]
    assert ckpt.qweights.peak_blocks == LAYERS and ckpt.qweights.resident_now() == LAYERS
    del held
    assert ckpt.qweights.resident_now() == 0


@pytest.mark.parametrize("options", [{}, {"float_type": "Q8_0", "asym4": "Q4_1"}])
def test_gguf_export_reads_each_tensor_once_and_holds_one_block(deep, tmp_path, options):
    plain = read_checkpoint(deep[1])
    want = export_gguf(plain, tmp_path / "plain.gguf", tokenizer_pre_name="gpt-2", **options)
    ckpt = resident(plain)
    got = export_gguf(ckpt, tmp_path / "streamed.gguf", tokenizer_pre_name="gpt-2", **options)
    assert sha(tmp_path / "streamed.gguf") == sha(tmp_path / "plain.gguf")
    assert got.tensors == want.tensors and got.file_type == want.file_type
    assert peak_blocks(ckpt) == 1  # one layer at a time, each read once
    for mapping in (ckpt.qweights, ckpt.tensors):
        assert set(mapping.reads) == set(mapping.entries) and set(mapping.reads.values()) == {1}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the spool is gone


@pytest.mark.parametrize("options", [{"accuracy_level": 0}, {"accuracy_level": 4, "max_block": 16}])
def test_onnx_export_holds_at_most_two_blocks_and_gives_the_same_file(deep, tmp_path, options):
    plain = read_checkpoint(deep[1])
    export_onnx(plain, tmp_path / "plain", **options)
    ckpt = resident(plain)
    export_onnx(ckpt, tmp_path / "streamed", **options)
    assert sha(tmp_path / "streamed" / "model.onnx") == sha(tmp_path / "plain" / "model.onnx")
    assert not (tmp_path / "streamed" / "model.onnx.data").exists()
    assert 1 <= peak_blocks(ckpt) <= 2


def test_onnx_weights_leave_memory_as_each_block_is_built(deep, tmp_path, monkeypatch):
    """After each block the graph holds only small constants (under 1 KiB each, fewer bytes than one
    block's weights): the weights went to model.onnx.data as they were made."""
    from signround_export.export.onnx.build import DecoderGraph

    held = []
    block = DecoderGraph.block

    def spy(self, i, out, x):
        result = block(self, i, out, x)
        held.append(sum(len(t.raw_data) for t in self.g.initializers))
        return result

    monkeypatch.setattr(DecoderGraph, "block", spy)
    export_onnx(read_checkpoint(deep[1]), tmp_path / "onnx", accuracy_level=0)
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))  # under the limit: one file, as before
    one_block = sum(len(t.raw_data) for t in model.graph.initializer if t.name.startswith("model.layers.1."))
    assert len(held) == LAYERS and max(held) < one_block


def test_onnx_tied_head_rounded_here_streams_too(tmp_path):
    """A tied float head rounded to 4 bits here: the embedding and the head share one set of integers."""
    model = write_tiny_model(tmp_path / "model", layers=LAYERS)
    plain = read_checkpoint(rtn_checkpoint(model, tmp_path / "ckpt", bits=4, group_size=32))
    export_onnx(plain, tmp_path / "plain", accuracy_level=0, lm_head_bits=4)
    ckpt = resident(plain)
    export_onnx(ckpt, tmp_path / "streamed", accuracy_level=0, lm_head_bits=4)
    assert sha(tmp_path / "streamed" / "model.onnx") == sha(tmp_path / "plain" / "model.onnx")
    assert 1 <= peak_blocks(ckpt) <= 2


def test_external_data_folder_runs_like_the_one_file_folder(deep, tmp_path):
    runtime = pytest.importorskip("signround_runtime")
    ckpt = read_checkpoint(deep[1])
    export_onnx(ckpt, tmp_path / "inline", accuracy_level=0)
    export_onnx(resident(ckpt), tmp_path / "external", accuracy_level=0, external_bytes=0)
    inline = onnx.load(str(tmp_path / "inline" / "model.onnx"))
    bare = onnx.load(str(tmp_path / "external" / "model.onnx"), load_external_data=False)
    large = {t.name: len(t.raw_data) for t in inline.graph.initializer if len(t.raw_data) >= 1024}
    assert large and all(t.data_location == onnx.TensorProto.EXTERNAL
                         for t in bare.graph.initializer if t.name in large)
    assert (tmp_path / "external" / "model.onnx.data").stat().st_size >= sum(large.values())
    external = onnx.load(str(tmp_path / "external" / "model.onnx"))  # reads model.onnx.data back
    assert [t.name for t in external.graph.initializer] == [t.name for t in inline.graph.initializer]
    for a, b in zip(inline.graph.initializer, external.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
    assert external.graph.node == inline.graph.node
    ids = list(range(3, 40))
    want = runtime.Model(tmp_path / "inline", threads=2).logits(ids)
    np.testing.assert_array_equal(runtime.Model(tmp_path / "external", threads=2).logits(ids), want)


def test_external_data_folder_decodes_in_the_runtime_and_onnxruntime_genai(deep, tmp_path, monkeypatch):
    import signround_export.export.onnx.build as build

    monkeypatch.setattr(build, "EXTERNAL_DATA_BYTES", 0)  # the helper exports with the defaults
    assert_greedy_decode_equals_reference(deep[1], tmp_path / "onnx", new_tokens=12)
    assert (tmp_path / "onnx" / "model.onnx.data").is_file()


def test_float_checkpoint_reads_a_tensor_only_when_it_is_taken(tmp_path, monkeypatch):
    model = write_tiny_model(tmp_path / "model", layers=LAYERS)
    reads = []
    read = TensorStore.__getitem__
    monkeypatch.setattr(TensorStore, "__getitem__", lambda self, name: reads.append(name) or read(self, name))
    ckpt = float_checkpoint(model)
    assert reads == [] and "lm_head.weight" not in ckpt.tensors  # tied: the embedding is the head
    assert len(ckpt.tensors) == len(list(ckpt.tensors)) == 1 + 1 + 9 * LAYERS
    plain = replace(ckpt, tensors={name: ckpt.tensors[name] for name in ckpt.tensors})
    export_gguf(plain, tmp_path / "plain.gguf", tokenizer_pre_name="gpt-2")
    streamed = resident(ckpt)
    export_gguf(streamed, tmp_path / "streamed.gguf", tokenizer_pre_name="gpt-2")
    assert sha(tmp_path / "streamed.gguf") == sha(tmp_path / "plain.gguf")
    assert peak_blocks(streamed) == 1
    export_onnx(streamed, tmp_path / "onnx", accuracy_level=0)
    export_onnx(plain, tmp_path / "plain-onnx", accuracy_level=0)
    assert sha(tmp_path / "onnx" / "model.onnx") == sha(tmp_path / "plain-onnx" / "model.onnx")
    assert peak_blocks(streamed) <= 2
