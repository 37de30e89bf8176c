"""`signround validate`: figures, thresholds, report files and errors (artifact-level tests live beside
each exporter's tests)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import WIKITEXT, rtn_checkpoint, write_tiny_model

from signround_export.checkpoint.read import read_checkpoint
from signround_export.cli import main
from signround_export.data import encode, heldout_text, load_tokenizer
from signround_export.errors import DataError, ValidationError
from signround_export.export.gguf import export_gguf
from signround_export.export.onnx.build import export_onnx
from signround_export.model.load import load_any
from signround_export.validation import Scores, Thresholds, ValidationResult, perplexity, validate, write_report
from signround_export.validation.metrics import NLL, Accumulator, next_token_logp, next_tokens, windows
from signround_export.validation.readback import onnx_layer_errors
from signround_export.validation.report import ArtifactReport, judge


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


def test_the_result_is_what_the_report_holds(ckpt, tmp_path):
    result = validate(ckpt, tokens=256, window=128, thresholds=Thresholds(max_kl=1e-9), progress=False)
    assert isinstance(result, ValidationResult)
    assert result.protocol.startswith("2 non-overlapping windows of 128 tokens") and "254 predicted" in result.protocol
    assert result.artifact("reference").scores.top1 is None and result.artifact("float").scores.top1 is not None
    assert result.passed and result.failures() == []  # the float model is not judged, only artifacts
    written = write_report(result, tmp_path / "r")
    assert json.loads((tmp_path / "r" / "validation.json").read_text()) == result.to_json()
    assert (tmp_path / "r" / "validation.md").read_text() == result.markdown()
    assert [p.name for p in written] == ["validation.json", "validation.md", "perplexity.png", "tuning_loss.png"]


def test_identical_logits_agree_perfectly():
    acc = Accumulator()
    ids = torch.randint(0, 50, (64,))
    logits = torch.randn(64, 50)
    acc.add(ids, logits, logits.clone())
    s = acc.scores(True)
    assert s.top1 == 1.0 and s.kl_mean == pytest.approx(0, abs=1e-7) and s.kl_max == pytest.approx(0, abs=1e-6)
    nll = -torch.log_softmax(logits[:-1], -1).gather(1, ids[1:, None]).mean()
    assert s.ppl == pytest.approx(math.exp(float(nll)), rel=1e-6)


def test_each_figure_keeps_its_summation_order(monkeypatch):
    """`perplexity` sums a batch as cross-entropy does, validation sums each window's gathered
    log-probabilities: float32 sums in another order change published figures in the last digits. The
    validation figures are the same whether a window's positions are taken all at once or a few at a time."""
    torch.manual_seed(0)
    logits, ids = torch.randn(4, 300, 5000) * 4, torch.randint(0, 5000, (4, 300))
    ref_logits = logits + torch.randn_like(logits)
    cascade = NLL()
    cascade.add(next_token_logp(logits), next_tokens(ids))
    assert cascade.total == F.cross_entropy(logits[:, :-1].reshape(-1, 5000), ids[:, 1:].reshape(-1),
                                            reduction="sum").item()
    accs = {}
    for rows in (1000, 7):
        monkeypatch.setattr(Accumulator, "ROWS", rows)
        accs[rows] = Accumulator()
        for x, r, w in zip(logits, ref_logits, ids):
            accs[rows].add(w, x, r)
    plain = accs[7].nll
    assert plain.total == sum(float(-F.log_softmax(x[:-1], -1).gather(1, w[1:, None]).sum()) for x, w in zip(logits, ids))
    assert cascade.count == plain.count == 4 * 299
    assert cascade.ppl == pytest.approx(plain.ppl, rel=1e-6)
    whole, sliced = accs[1000].scores(True), accs[7].scores(True)
    assert whole == sliced and whole.top1 < 1 and whole.kl_mean > 0
    ref, logp = next_token_logp(ref_logits[0]), next_token_logp(logits[0])
    assert accs[7].kl_max >= float((ref.exp() * (ref - logp)).sum(-1).max())


def test_text_shorter_than_a_window_is_refused():
    with pytest.raises(DataError, match="fewer than one window of 128") as e:
        windows(torch.arange(100), 128, None)
    assert e.value.param == "text"


@pytest.mark.parametrize("scores,errors,expect", [
    (Scores(10.0, top1=0.99, kl_mean=0.001, kl_max=0.1), {}, []),
    (Scores(10.0, top1=0.99, kl_mean=0.5, kl_max=2.0), {}, ["mean KL 0.5 > max_kl 0.02"]),
    (Scores(10.0, top1=0.50, kl_mean=0.001, kl_max=0.1), {}, ["top-1 agreement 0.5000 < min_top1 0.9"]),
    (Scores(12.0, top1=0.99, kl_mean=0.001, kl_max=0.1), {}, ["perplexity 12.0000 is 20.00% above"]),
    (Scores(10.0, top1=0.99, kl_mean=0.001, kl_max=0.1), {"a": 0.0, "b": 1.0}, ["layers the format holds exactly"]),
])
def test_judge_names_the_figure_that_failed(scores, errors, expect):
    r = ArtifactReport("onnx", "x", "onnxruntime", scores, layer_errors=errors, exact_layers=list(errors))
    failures = judge(r, Scores(10.0), Thresholds())
    assert len(failures) == len(expect)
    for f, e in zip(failures, expect):
        assert e in f


@pytest.fixture(scope="module")
def broken_files(ckpt, tmp_path_factory):
    """An exported ONNX folder whose model.onnx is not a protobuf, and a GGUF file with only a header."""
    tmp = tmp_path_factory.mktemp("broken")
    export_onnx(read_checkpoint(ckpt), tmp / "onnx", accuracy_level=0)
    (tmp / "onnx" / "model.onnx").write_bytes(b"not an onnx protobuf")
    (tmp / "broken.gguf").write_bytes(b"GGUF" + bytes(60))
    return tmp


needs_llama = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (make setup installs it)")


@pytest.mark.parametrize("extra,message", [
    (["--onnx", "{tmp}/nothing"], "has no model.onnx"),
    (["--gguf", "{tmp}/nothing.gguf"], "no such file"),
    (["--tokens", "100"], "less than one window"),
    (["--onnx", "{tmp}/onnx"], "model.onnx: its bytes do not match its digest in sha256sums.txt"),
    (["--onnx", "{tmp}/onnx", "--no-verify"], "onnxruntime cannot load"),
    (["--gguf", "{tmp}/broken.gguf"], "is not a readable GGUF file"),
    pytest.param(["--gguf", "{tmp}/broken.gguf", "--no-verify"], "llama.cpp cannot load the file", marks=needs_llama),
])
def test_bad_input_is_one_line(ckpt, broken_files, tmp_path, capsys, extra, message):
    args = ["validate", str(ckpt), "--window", "128", "--quiet", "--report", str(tmp_path / "r")]
    assert main(args + [e.format(tmp=broken_files) for e in extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kwargs,param,message", [
    (dict(onnx="{tmp}/nothing"), "onnx", "has no model.onnx"),
    (dict(onnx="{tmp}/onnx"), "onnx", "model.onnx: its bytes do not match its digest"),
    (dict(onnx="{tmp}/onnx", verify=False), "onnx", "onnxruntime cannot load"),
    (dict(gguf="{tmp}/nothing.gguf"), "gguf", "no such file"),
    (dict(gguf="{tmp}/broken.gguf", gguf_runner="numpy"), "gguf", "truncated or corrupt"),
    (dict(tokens=100), "tokens", "tokens 100 is less than one window of 128"),
    (dict(window=0), "window", "window 0"),
    (dict(gguf_runner="gpu"), "gguf_runner", "choose one of auto, llama.cpp, numpy"),
    (dict(float_model="{tmp}/nothing"), "float_model", "no such folder"),
])
def test_bad_input_names_the_parameter(ckpt, broken_files, kwargs, param, message):
    kwargs = {k: v.format(tmp=broken_files) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(ValidationError, match=message) as e:
        validate(ckpt, **{"window": 128, "tokens": 128, "progress": False} | kwargs)
    assert e.value.param == param
    assert "--" not in str(e.value)


def test_onnx_folder_of_another_model_is_named_as_such(ckpt, tmp_path):
    """Stacked q/k/v rows are checked against the checkpoint's shapes before they are split."""
    other = rtn_checkpoint(write_tiny_model(tmp_path / "m", hidden=96, heads=6, kv_heads=2), tmp_path / "c",
                           bits=3, group_size=32)
    export_onnx(read_checkpoint(other), tmp_path / "onnx", accuracy_level=0)
    with pytest.raises(ValidationError, match="belongs to another model") as e:
        onnx_layer_errors(tmp_path / "onnx", read_checkpoint(ckpt))
    assert e.value.param == "onnx"


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

    path = tmp_path / "m.gguf"
    export_gguf(read_checkpoint(ckpt), path, tokenizer_pre_name="gpt-2")
    path.write_bytes(path.read_bytes()[:-1000])
    args = ["validate", str(ckpt), "--window", "128", "--quiet", "--gguf", str(path), "--gguf-runner", "numpy"]
    assert main(args) == 2
    assert "truncated or corrupt" in capsys.readouterr().err


def test_default_model_w4_exports_pass_validate(default_checkpoint_w4, tmp_path, capsys):
    """What the project's CI gates on: the default model at W4, both exports, the real command."""
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
