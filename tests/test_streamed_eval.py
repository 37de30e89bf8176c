"""Validation and evaluation hold one or two decoder blocks at a time, with the figures of the forward
that ran each window through the whole model held in memory (the path they replaced)."""

from __future__ import annotations

import importlib
from typing import Callable, Iterator

import numpy as np
import pytest
import torch
from conftest import rtn_checkpoint, write_tiny_model
from residency import Resident

import signround_export.validation.metrics as metrics
from signround_export.checkpoint.format import Checkpoint
from signround_export.checkpoint.read import read_checkpoint
from signround_export.data import evaluation_ids
from signround_export.export.gguf import export_gguf
from signround_export.export.onnx.build import export_onnx
from signround_export.model.config import ModelConfig
from signround_export.model.forward import Model, block_forward
from signround_export.model.load import load_float_model, reference_from_checkpoint
from signround_export.validation import folder_perplexity, perplexity, validate
from signround_export.validation.metrics import NLL, compare, next_token_logp, next_tokens, windows
from signround_export.validation.readback import read_gguf
from signround_export.validation.validate import comparisons

validate_module = importlib.import_module("signround_export.validation.validate")  # the package's `validate` is the function

LAYERS = 6  # deeper than the two blocks a stage may hold


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: q/k/v biases beside the integers
def deep(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"deep-{request.param}")
    model = write_tiny_model(tmp / "model", layers=LAYERS, model_type=request.param, tied=request.param == "llama")
    return model, rtn_checkpoint(model, tmp / "ckpt", bits=4, group_size=32)


def per_window(logits: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], Iterator[torch.Tensor]]:
    """A runner's logits from a function of one window (token ids [T] -> logits [T, V])."""
    return lambda windows: (logits(ids) for ids in windows)


def in_memory(model: Model) -> Model:
    return Model(model.cfg, dict(model.tensors))


def resident(model: Model) -> tuple[Model, Resident]:
    held = Resident(model.tensors)  # each entry read when indexed, as the stage would
    return Model(model.cfg, held), held


@torch.inference_mode()
def whole_model_logits(model: Model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of ids [B, T] with every block run in turn on this batch alone: the forward before streaming."""
    x = model.embed(ids)
    ropes = model.ropes(ids.shape[1], x.device)
    for i in range(model.cfg.n_layers):
        x = block_forward(model.cfg, model.block_params(i), x, *ropes[i], window=model.cfg.window(i))
    return model.head(x).float()


def whole_model_perplexity(model: Model, ids: torch.Tensor, window: int, n: int, batch: int = 4) -> float:
    w = windows(ids, window, n)
    nll = NLL()
    for start in range(0, len(w), batch):
        x = w[start : start + batch]
        nll.add(next_token_logp(whole_model_logits(model, x)), next_tokens(x))
    return nll.ppl


def test_block_major_logits_are_the_whole_model_logits(deep):
    model = in_memory(load_float_model(deep[0])[0])
    torch.manual_seed(0)
    batches = [torch.randint(0, 320, (b, 48)) for b in (4, 4, 1)]  # a last, smaller batch as eval makes
    got = list(model.stream_logits(batches))
    assert len(got) == 3
    for ids, logits in zip(batches, got):
        assert torch.equal(logits, whole_model_logits(model, ids))  # bit for bit, not close


def test_eval_holds_two_blocks_with_the_same_figure(deep, monkeypatch):
    for folder in deep:
        loaded, kind = metrics.load_any(folder)
        model, held = resident(loaded)
        monkeypatch.setattr(metrics, "load_any", lambda _folder, verify=True: (model, kind))
        result, _ = folder_perplexity(folder, window=64, max_windows=9, progress=False)
        assert 1 <= held.peak_blocks <= 2
        block = [n for n in held.entries if n.startswith("model.layers.")]
        assert all(held.reads[n] == 1 for n in block)  # each block read once for all nine windows
        ids = evaluation_ids(folder, None)
        assert result.windows == 9 and result.ppl == whole_model_perplexity(in_memory(loaded), ids, 64, 9)


def test_the_reference_dequantizes_a_layer_when_it_is_used(deep):
    ckpt = read_checkpoint(deep[1])
    qweights, tensors = Resident(dict(ckpt.qweights)), Resident(dict(ckpt.tensors))
    lazy = Checkpoint(ckpt.path, ckpt.hf_config, ckpt.quant, qweights, tensors, ckpt.tuning_log)
    ref = reference_from_checkpoint(lazy)
    assert tensors.reads.total() == 0  # nothing read to build it (the names of biased layers need one pass)
    ids = torch.randint(0, 320, (2, 40))
    assert torch.equal(ref.logits(ids), whole_model_logits(in_memory(reference_from_checkpoint(ckpt)), ids))
    assert tensors.peak_blocks <= 2 and qweights.peak_blocks <= 2
    assert tensors.resident_now() == 0 and qweights.resident_now() == 0  # nothing kept after the forward


@pytest.fixture(scope="module")
def artifacts(deep, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("artifacts")
    ckpt = read_checkpoint(deep[1])
    export_onnx(ckpt, tmp / "onnx", accuracy_level=0)
    export_gguf(ckpt, tmp / "m.gguf", tokenizer_pre_name="gpt-2")
    return tmp / "onnx", tmp / "m.gguf"


def test_validate_holds_two_blocks_with_the_same_figures(deep, artifacts, monkeypatch):
    model_dir, ckpt_dir = deep
    onnx_dir, gguf_path = artifacts
    plain = read_checkpoint(ckpt_dir)
    qweights, tensors = Resident(dict(plain.qweights)), Resident(dict(plain.tensors))
    held = {}

    def wrap(name, model):
        model, held[name] = resident(model)
        return model

    monkeypatch.setattr(validate_module, "open_checkpoint", lambda _p, verify=True: Checkpoint(
        plain.path, plain.hf_config, plain.quant, qweights, tensors, plain.tuning_log))
    monkeypatch.setattr(validate_module, "reference_from_checkpoint",
                        lambda c: wrap("reference", reference_from_checkpoint(c)))
    monkeypatch.setattr(validate_module, "load_float_model",
                        lambda f: (wrap("float", load_float_model(f)[0]),) + load_float_model(f)[1:])
    monkeypatch.setattr(validate_module, "read_gguf", lambda p, c: (lambda w, t: (Resident(dict(w)), t))(*read_gguf(p, c)))
    result = validate(ckpt_dir, onnx=onnx_dir, gguf=gguf_path, float_model=model_dir, tokens=5 * 64, window=64,
                      gguf_runner="numpy", progress=False)
    assert sorted(held) == ["float", "reference"]
    assert all(1 <= h.peak_blocks <= 2 for h in held.values())
    assert qweights.peak_blocks <= 2 and tensors.peak_blocks <= 2  # the read-backs too take one layer at a time

    # the same figures, bit for bit, from each PyTorch model held in memory and run window by window
    w = validate_module.evaluation_windows(ckpt_dir, None, 5 * 64, 64)
    cfg = ModelConfig.from_hf(plain.hf_config)
    whole = {"reference": in_memory(reference_from_checkpoint(plain)), "float": in_memory(load_float_model(model_dir)[0]),
             "gguf": Model(cfg, {n: torch.from_numpy(np.array(w_, dtype=np.float32))
                               for n, w_ in dict(read_gguf(gguf_path, plain)[0]).items()})}
    runners = {name: per_window(lambda ids, m=m: whole_model_logits(m, ids[None])[0]) for name, m in whole.items()}
    runners["onnx"] = validate_module.onnx_runner(onnx_dir).logits
    runners = {name: runners[name] for name in ("reference", "float", "onnx", "gguf")}
    want = compare(runners, comparisons(list(runners)), w)
    for report in result.artifacts:
        assert report.scores == want[(report.name, None if report.name == "reference" else "reference")]
        if report.name in ("onnx", "gguf"):
            assert report.vs_float == want[(report.name, "float")]
            assert report.layer_errors and not report.failures
