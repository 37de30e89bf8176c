"""IQ4_NL as a tuning target: SignRound on a non-uniform grid, its checkpoint record, its GGUF export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from conftest import write_tiny_model
from signround_export.checkpoint.format import QuantConfig
from signround_export.checkpoint.qweight import GRIDS, QuantWeight, Scheme
from signround_export.checkpoint.read import read_checkpoint
from signround_export.checkpoint.write import write_checkpoint
from signround_export.cli import main
from signround_export.errors import CheckpointError, MatMulNBitsError, TuneError
from signround_export.export.gguf import GGUF_TYPES, export_gguf
from signround_export.export.gguf.encode import encode_layer, holds_exactly
from signround_export.export.gguf.tensors import gguf_name, rope_unpermute
from signround_export.export.onnx import export_onnx
from signround_export.model.load import reference_from_checkpoint
from signround_export.tune.clip import clip_search
from signround_export.tune.quantizer import grouped, group_range, quantize, to_qweight

try:
    import llama_cpp
except ImportError:
    llama_cpp = None

IQ4_NL = Scheme(4, 32, True, grid="iq4_nl")
LEVELS = torch.tensor(GRIDS["iq4_nl"], dtype=torch.float32)


def weight(n=16, k=96, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_the_table_is_gguf_py_s():
    from gguf.quants import IQ4_NL as GGUF_IQ4_NL

    assert GRIDS["iq4_nl"] == GGUF_IQ4_NL.kvalues and GGUF_TYPES["IQ4_NL"].scheme == IQ4_NL


def test_round_to_nearest_is_the_nearest_level_and_the_largest_weight_takes_the_long_end():
    w = weight()
    fq = quantize(w, IQ4_NL)
    x = grouped(w, 32) / fq.scale[..., None]
    dist = (x[..., None] - LEVELS).abs()
    got = dist.gather(-1, fq.q.long()[..., None])[..., 0]
    assert torch.all(got <= dist.min(-1).values + 1e-5)  # ties aside, the code is the nearest level
    assert fq.q.min() == 0 and fq.q.max() == 15
    top = grouped(w, 32).abs().argmax(-1, keepdim=True)  # each group's largest |w| sits on -127 (code 0)
    assert torch.all(fq.q.gather(-1, top) == 0)
    assert torch.equal(fq.weight, LEVELS[fq.q.long()].view(16, -1) * fq.scale.repeat_interleave(32, 1))


def test_the_offset_moves_a_weight_between_its_two_neighbouring_levels():
    w = weight(seed=1)
    rtn = quantize(w, IQ4_NL)
    x = grouped(w, 32) / rtn.scale[..., None]
    below = (torch.searchsorted(LEVELS, x.contiguous(), right=True) - 1).clamp(0, 15)  # L[below] <= x
    above = (below + 1).clamp(max=15)
    for v in (-0.49, 0.49):
        q = quantize(w, IQ4_NL, v=torch.full_like(x, v)).q.long()
        inside = (x > LEVELS[0]) & (x < LEVELS[-1])
        assert torch.all(((q == below) | (q == above))[inside])
        assert (q != rtn.q.long()).any()  # and it does move some


def test_gradients_pass_straight_through_with_the_local_spacing():
    w = weight(seed=2)
    v = torch.zeros(16, 3, 32, requires_grad=True)
    lo_f, hi_f = torch.ones(16, 3, requires_grad=True), torch.ones(16, 3, requires_grad=True)
    fq = quantize(w, IQ4_NL, v, lo_f, hi_f)
    upstream = torch.randn_like(fq.weight)
    (fq.weight * upstream).sum().backward()
    j = fq.q.long().clamp(max=14)
    spacing = LEVELS[j + 1] - LEVELS[j]
    want = grouped(upstream, 32) * fq.scale.detach()[..., None] * spacing  # d W_q / d V = scale * spacing
    x = grouped(w, 32) / fq.scale.detach()[..., None]
    clamped = (x >= LEVELS[-1] + (LEVELS[-1] - LEVELS[-2]) / 2) | (x <= LEVELS[0] - (LEVELS[1] - LEVELS[0]) / 2)
    want[clamped] = 0  # rounded past the table's ends: clamp() passes no gradient, as on integer grids
    torch.testing.assert_close(v.grad, want)
    assert lo_f.grad.abs().sum() > 0 and hi_f.grad.abs().sum() > 0 and torch.all(torch.isfinite(hi_f.grad))


def test_clip_search_works_on_the_grid():
    w = weight(seed=3)
    power = torch.rand(96) + 0.1
    rng = group_range(w, 32)
    f_lo, f_hi = clip_search(w, IQ4_NL, power, rng)

    def err(*f):
        diff = grouped(w - quantize(w, IQ4_NL, None, *f, rng).weight, 32)
        return (diff**2 * grouped(power.expand(16, -1), 32)).sum()
    assert err(f_lo, f_hi) < err(None, None)


def test_grids_refuse_what_they_cannot_hold():
    with pytest.raises(TuneError, match="needs 4-bit symmetric weights"):
        Scheme(4, 32, False, grid="iq4_nl")
    with pytest.raises(TuneError, match="unknown"):
        Scheme(4, 32, True, grid="nf4")
    qw = to_qweight(weight(), IQ4_NL)
    assert qw.grid == "iq4_nl" and holds_exactly("IQ4_NL", qw) and not holds_exactly("Q4_0", qw)
    assert not holds_exactly("IQ4_NL", to_qweight(weight(), Scheme(4, 32, True)))
    assert encode_layer(qw)[0] == "IQ4_NL" and encode_layer(qw, kquant=True)[0] == "IQ4_NL"


def tune_iq4_nl(model, out, *extra):
    assert main(["tune", str(model), "--out", str(out), "--gguf", "iq4_nl", "--iters", "2", "--nsamples", "2",
                 "--seqlen", "32", "--batch-size", "2", "--quiet", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def iq4_ckpt(tiny_model, tmp_path_factory):
    return tune_iq4_nl(tiny_model, tmp_path_factory.mktemp("iq4") / "ckpt")


def test_the_checkpoint_records_the_grid(iq4_ckpt):
    qc = json.loads((iq4_ckpt / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["data_type"]) == (4, 32, True, "iq4_nl")
    assert qc["packing_format"] == "auto_round:gptq_levels"  # auto-round's loader refuses it (format.py)
    assert qc["levels"] == list(GRIDS["iq4_nl"]) and "extra_config" not in qc
    ckpt = read_checkpoint(iq4_ckpt)
    assert all(ckpt.qweights[n].grid == "iq4_nl" for n in ckpt.qweights)


def test_tune_to_gguf_is_exact_in_gguf_py_and_llama_cpp(iq4_ckpt, tmp_path):
    ckpt = read_checkpoint(iq4_ckpt)
    path = tmp_path / "m.gguf"
    report = export_gguf(ckpt, path, tokenizer_pre_name="gpt-2")
    quantized = [t for t in report.tensors if t.quantized]
    assert len(quantized) == 14 and all(t.type == "IQ4_NL" and t.exact for t in quantized)
    heads = {"q_proj": 4, "k_proj": 2}  # the tiny model's: llama.cpp's rows are rotary-permuted
    tensors = {t.name: t for t in GGUFReader(str(path)).tensors}
    for module in ckpt.qweights:
        t = tensors[gguf_name(module + ".weight")]
        assert t.tensor_type.name == "IQ4_NL"
        got = gguf_dequantize(np.asarray(t.data), t.tensor_type)
        n = module.rsplit(".", 1)[-1]
        if n in heads:
            got = rope_unpermute(got, heads[n])
        np.testing.assert_array_equal(got, ckpt.qweights[module].dequantize())  # bit for bit
    if llama_cpp is not None:  # llama.cpp's own IQ4_NL kernels: the tolerance of test_gguf's tiny files
        from test_gguf import logits_error

        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
        assert logits_error(llm, reference_from_checkpoint(ckpt), list(range(3, 3 + 64))) < 0.05


def test_validate_with_gguf_works_on_it(iq4_ckpt, tmp_path, capsys):
    path = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(iq4_ckpt), "--out", str(path), "--tokenizer-pre", "gpt-2", "--quiet"]) == 0
    assert main(["validate", str(iq4_ckpt), "--gguf", str(path), "--gguf-runner", "numpy", "--tokens", "256",
                 "--window", "128", "--quiet", "--report", str(tmp_path / "r")]) == 0


def test_onnx_export_refuses_the_grid_by_name(iq4_ckpt, tmp_path):
    with pytest.raises(MatMulNBitsError, match="non-uniform grid 'iq4_nl'.*signround export gguf"):
        export_onnx(read_checkpoint(iq4_ckpt), tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_rows_not_whole_blocks_are_refused_before_tuning(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "model", intermediate=176)  # down_proj rows of 176 = 5.5 blocks
    assert main(["tune", str(model), "--out", str(tmp_path / "c"), "--gguf", "iq4_nl", "--iters", "0"]) == 2
    err = capsys.readouterr().err
    assert "down_proj has rows of 176 weights, not whole IQ4_NL blocks of 32" in err, err
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.progress").exists()


def qc_json(**over) -> dict:
    return {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": True,
            "packing_format": "auto_round:gptq_levels",
            "data_type": "iq4_nl", "levels": list(GRIDS["iq4_nl"])} | over


@pytest.mark.parametrize("over,message", [
    (dict(levels=None), "comes without its levels"),
    (dict(levels=list(range(16))), "are not iq4_nl's"),
    (dict(data_type="int"), "levels are given but data_type is 'int'"),
    (dict(data_type="nf4", levels=None), "data_type is 'nf4'"),
    (dict(sym=False), "needs 4-bit symmetric weights"),
    (dict(extra_config={"lm_head": {"data_type": "iq4_nl", "levels": [1, 2]}}), r"extra_config\['lm_head'\]"),
])
def test_the_reader_refuses_grids_it_cannot_hold(over, message):
    with pytest.raises(CheckpointError, match=message):
        QuantConfig.from_json({k: v for k, v in qc_json(**over).items() if v is not None})


def test_layers_of_both_kinds_round_trip_through_extra_config(tmp_path):
    """A uniform default with one IQ4_NL layer, and the other way round: each layer reads back on its grid."""
    w = weight(8, 64)
    layers = {"model.layers.0.mlp.up_proj": to_qweight(w, IQ4_NL),
              "model.layers.0.mlp.down_proj": to_qweight(w, Scheme(4, 32, True))}
    with pytest.raises(CheckpointError, match="write it under packing_format 'auto_round:gptq_levels'"):
        write_checkpoint(tmp_path / "plain", {"model_type": "llama"}, QuantConfig(4, 32, True), layers, {})
    for default in ("int", "iq4_nl"):
        quant = QuantConfig(4, 32, True, packing_format="auto_round:gptq_levels", grid=default)
        out = write_checkpoint(tmp_path / default, {"model_type": "llama"}, quant, layers, {})
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        other = next(n for n, qw in layers.items() if qw.grid != default)
        entry = qc["extra_config"][other]
        assert entry["data_type"] == layers[other].grid and ("levels" in entry) == (default == "int")
        back = QuantConfig.from_json(qc)
        assert {n: back.layer_grid(n) for n in layers} == {n: qw.grid for n, qw in layers.items()}
