"""`signround validate`: figures, thresholds, report files and errors (artifact-level tests live beside
each exporter's tests)."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from conftest import rtn_checkpoint

from signround_export.cli import main
from signround_export.data import encode, heldout_text, load_tokenizer
from signround_export.model.load import load_any
from signround_export.validation.metrics import perplexity
from signround_export.validation.validate import Accumulator, ArtifactReport, Scores, Thresholds, judge


@pytest.fixture(scope="module")
def ckpt(tiny_model, tmp_path_factory):
    return rtn_checkpoint(tiny_model, tmp_path_factory.mktemp("val") / "ckpt", bits=3, group_size=32)


def test_report_files_and_figures(ckpt, tmp_path, capsys):
    report = tmp_path / "report"
    assert main(["validate", str(ckpt), "--tokens", "512", "--window", "128", "--report", str(report), "--quiet"]) == 0
    result = json.loads((report / "validation.json").read_text())
    names = [a["name"] for a in result["artifacts"]]
    assert names == ["reference", "float"]  # the tuning log names the float source, which is present
    ref = result["artifacts"][0]["scores"]
    # the reference's perplexity is the one `signround eval` computes over the same windows
    model, _ = load_any(ckpt)
    ids = encode(load_tokenizer(ckpt), heldout_text())
    assert ref["ppl"] == pytest.approx(perplexity(model, ids, 128, 4, progress=False).ppl, rel=1e-5)
    flt = result["artifacts"][1]["scores"]
    assert 0 < flt["kl_mean"] <= flt["kl_max"] and 0 < flt["top1"] < 1
    assert result["passed"] and "torch" in result["versions"]
    assert (report / "perplexity.png").stat().st_size > 1000
    assert "| reference |" in (report / "validation.md").read_text()
    assert "| float |" in capsys.readouterr().out


def test_identical_logits_agree_perfectly():
    acc = Accumulator()
    ids = torch.randint(0, 50, (64,))
    logits = torch.randn(64, 50)
    acc.add(ids, logits, logits.clone())
    s = acc.scores(True)
    assert s.top1 == 1.0 and s.kl_mean == pytest.approx(0, abs=1e-7) and s.kl_max == pytest.approx(0, abs=1e-6)
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).mean()
    assert s.ppl == pytest.approx(math.exp(float(nll)), rel=1e-6)


@pytest.mark.parametrize("scores,errors,expect", [
    (Scores(10.0, top1=0.99, kl_mean=0.001, kl_max=0.1), {}, []),
    (Scores(10.0, top1=0.99, kl_mean=0.5, kl_max=2.0), {}, ["mean KL"]),
    (Scores(10.0, top1=0.50, kl_mean=0.001, kl_max=0.1), {}, ["top-1 agreement"]),
    (Scores(12.0, top1=0.99, kl_mean=0.001, kl_max=0.1), {}, ["perplexity 12.0000 is 20.00% above"]),
    (Scores(10.0, top1=0.99, kl_mean=0.001, kl_max=0.1), {"a": 0.0, "b": 1.0}, ["layers the format holds exactly"]),
])
def test_judge_names_the_figure_that_failed(scores, errors, expect):
    r = ArtifactReport("onnx", "x", "onnxruntime", scores, layer_errors=errors, exact_layers=list(errors))
    judge(r, Scores(10.0), Thresholds())
    assert len(r.failures) == len(expect)
    for f, e in zip(r.failures, expect):
        assert e in f


@pytest.mark.parametrize("extra,message", [
    (["--onnx", "{tmp}/nothing"], "no model.onnx there"),
    (["--gguf", "{tmp}/nothing.gguf"], "no such file"),
    (["--tokens", "100"], "less than one window"),
    (["--onnx", "{tmp}/broken"], "onnxruntime cannot load model.onnx"),
    pytest.param(["--gguf", "{tmp}/broken.gguf"], "llama.cpp cannot load the file",
                 marks=pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                          reason="llama-cpp-python is not installed (make setup installs it)")),
])
def test_bad_input_is_one_line(ckpt, tmp_path, capsys, extra, message):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"not an onnx protobuf")
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(60))
    args = ["validate", str(ckpt), "--window", "128", "--quiet", "--report", str(tmp_path / "r")]
    assert main(args + [e.format(tmp=tmp_path) for e in extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_onnx_folder_of_another_model_is_named_as_such(ckpt, tmp_path):
    """Stacked q/k/v rows are checked against the checkpoint's shapes before they are split."""
    from conftest import write_tiny_model

    from signround_export.checkpoint.read import read_checkpoint
    from signround_export.export.onnx.build import export_onnx
    from signround_export.validation.validate import onnx_layer_errors

    other = rtn_checkpoint(write_tiny_model(tmp_path / "m", hidden=96, heads=6, kv_heads=2), tmp_path / "c",
                           bits=3, group_size=32)
    export_onnx(read_checkpoint(other), tmp_path / "onnx", accuracy_level=0)
    with pytest.raises(ValueError, match="belongs to another model"):
        onnx_layer_errors(tmp_path / "onnx", read_checkpoint(ckpt))


def _drop_zero_points(to_nbits):
    def broken(qw, *args):
        w = to_nbits(qw, *args)
        w.zero_points = None  # the kernel then assumes 2^(bits-1)
        return w
    return broken


def _swap_nibbles(pack_codes):
    def broken(codes, bits):
        out = pack_codes(codes, bits)
        return ((out >> 4) | (out << 4)).astype(out.dtype) if bits == 4 else out
    return broken


BROKEN_EXPORTS = {  # a bug an exporter could have -> (artifact kind, module, attribute, patch)
    "gguf: nibbles swapped": ("gguf", "signround_export.export.gguf.blocks", "_nibbles",
                              lambda f: lambda codes: f(codes[..., ::-1])),
    "gguf: no RoPE permutation": ("gguf", "signround_export.export.gguf.tensors", "rope_permute", lambda f: lambda rows, n: rows),
    "onnx: zero points dropped": ("onnx", "signround_export.export.onnx.build", "to_nbits", _drop_zero_points),
    "onnx: nibbles swapped": ("onnx", "signround_export.export.onnx.matmulnbits", "pack_codes", _swap_nibbles),
}


@pytest.mark.parametrize("bug", sorted(BROKEN_EXPORTS))
def test_a_broken_export_fails_validation(bug, ckpt, tmp_path, monkeypatch, capsys):
    import importlib

    from signround_export.checkpoint.read import read_checkpoint
    from signround_export.export.gguf import export_gguf
    from signround_export.export.onnx.build import export_onnx

    kind, module, attr, patch = BROKEN_EXPORTS[bug]
    target = importlib.import_module(module)
    monkeypatch.setattr(target, attr, patch(getattr(target, attr)))
    artifact = tmp_path / ("m.gguf" if kind == "gguf" else "onnx")
    if kind == "gguf":
        export_gguf(read_checkpoint(ckpt), artifact, tokenizer_pre_name="gpt-2")
    else:
        export_onnx(read_checkpoint(ckpt), artifact, accuracy_level=0)
    monkeypatch.undo()
    args = ["validate", str(ckpt), "--tokens", "256", "--window", "128", "--quiet", "--report", str(tmp_path / "r"),
            f"--{kind}", str(artifact), "--gguf-runner", "numpy"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "differ from the checkpoint's integers" in err, err


def test_a_truncated_gguf_is_refused(ckpt, tmp_path, capsys):
    from signround_export.checkpoint.read import read_checkpoint
    from signround_export.export.gguf import export_gguf

    path = tmp_path / "m.gguf"
    export_gguf(read_checkpoint(ckpt), path, tokenizer_pre_name="gpt-2")
    path.write_bytes(path.read_bytes()[:-1000])
    args = ["validate", str(ckpt), "--window", "128", "--quiet", "--gguf", str(path), "--gguf-runner", "numpy"]
    assert main(args) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_default_model_w4_exports_pass_validate(default_checkpoint_w4, tmp_path, capsys):
    """What the project's CI gates on: the default model at W4, both exports, the real command."""
    from conftest import WIKITEXT

    onnx_dir, gguf_file, report = tmp_path / "onnx", tmp_path / "w4.gguf", tmp_path / "report"
    assert main(["export", "onnx", str(default_checkpoint_w4), "--out", str(onnx_dir), "--quiet"]) == 0
    assert main(["export", "gguf", str(default_checkpoint_w4), "--out", str(gguf_file), "--quiet"]) == 0
    assert main(["validate", str(default_checkpoint_w4), "--onnx", str(onnx_dir), "--gguf", str(gguf_file),
                 "--text", str(WIKITEXT), "--tokens", "1024", "--report", str(report), "--quiet"]) == 0
    result = json.loads((report / "validation.json").read_text())
    assert [a["name"] for a in result["artifacts"]][-2:] == ["onnx", "gguf"]
    for a in result["artifacts"][-2:]:
        assert len(a["exact_layers"]) == 210 and not any(a["layer_errors"].values()), a["name"]
    assert (report / "layer_error.png").is_file()
    assert "| onnx |" in capsys.readouterr().out


def test_float_minima_exports_pass_validate(tmp_path, capsys):
    """A checkpoint tuned for Q4_K: the GGUF file holds every layer exactly; ONNX holds the float minima as
    float zero points, exact to float32 rounding, which the report says instead of calling them broken."""
    from conftest import write_tiny_model

    from signround_export.checkpoint.read import read_checkpoint
    from signround_export.export.gguf import export_gguf
    from signround_export.export.onnx.build import export_onnx

    model = write_tiny_model(tmp_path / "model", hidden=256, intermediate=320, heads=4, kv_heads=2)
    ckpt = tmp_path / "ckpt"
    assert main(["tune", str(model), "--out", str(ckpt), "--gguf", "q4_k", "--iters", "0", "--quiet"]) == 0
    export_gguf(read_checkpoint(ckpt), tmp_path / "m.gguf", tokenizer_pre_name="gpt-2")
    export_onnx(read_checkpoint(ckpt), tmp_path / "onnx", accuracy_level=0)
    report = tmp_path / "r"
    assert main(["validate", str(ckpt), "--tokens", "256", "--window", "128", "--quiet", "--report", str(report),
                 "--gguf", str(tmp_path / "m.gguf"), "--gguf-runner", "numpy", "--onnx", str(tmp_path / "onnx")]) == 0
    artifacts = {a["name"]: a for a in json.loads((report / "validation.json").read_text())["artifacts"]}
    gguf, onnx = artifacts["gguf"], artifacts["onnx"]
    assert len(gguf["exact_layers"]) == 14 and not any(gguf["layer_errors"].values())
    assert sorted(onnx["exact_layers"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert any("12 layers with float minima take float zero points" in n for n in onnx["notes"])
    assert max(onnx["layer_errors"].values()) < 1e-4
