"""The Python API end to end on a tiny model: quantize -> export_onnx -> export_gguf -> validate, the
round to nearest of a float model for the exporters, and refusals that name their parameter."""

import json
import tempfile

import numpy as np
import pytest

import signround_export as sr

TUNE = dict(bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2, progress=False)


def test_quantize_export_and_validate_through_the_api(tiny_model, tmp_path):
    result = sr.quantize(tiny_model, tmp_path / "ckpt", **TUNE)
    assert result.checkpoint == tmp_path / "ckpt" and (result.checkpoint / "model.safetensors").is_file()
    assert not (tmp_path / "ckpt.progress").exists()  # the resume store is spent once the checkpoint is whole
    assert [b.best_iter is not None for b in result.tuning.blocks] == [True, True]
    ckpt = sr.read_checkpoint(result.checkpoint)
    assert ckpt.qweights.keys() == result.tuning.qweights.keys()
    for name, qw in result.tuning.qweights.items():
        np.testing.assert_array_equal(ckpt.qweights[name].q, qw.q, err_msg=name)
    assert json.loads((result.checkpoint / "tuning_log.json").read_text())["args"]["iters"] == 2

    onnx = sr.export_onnx(result.checkpoint, tmp_path / "onnx", accuracy_level=0, progress=False)
    assert (tmp_path / "onnx" / "model.onnx").is_file() and sum(onnx.layers.values()) > 0
    gguf = sr.export_gguf(ckpt, tmp_path / "m.gguf", tokenizer_pre_name="gpt-2", progress=False)
    assert (tmp_path / "m.gguf").is_file()
    assert {t.source.removesuffix(".weight") for t in gguf.tensors if t.quantized} == set(ckpt.qweights)

    report = sr.validate(result.checkpoint, onnx=tmp_path / "onnx", gguf=tmp_path / "m.gguf", tokens=256,
                         window=128, gguf_runner="numpy", progress=False)
    assert isinstance(report, sr.ValidationResult) and report.passed, report.failures()
    for kind in ("onnx", "gguf"):
        # both formats hold every layer's integers exactly: read back, not one step away anywhere
        artifact = report.artifact(kind)
        assert sorted(artifact.exact_layers) == sorted(ckpt.qweights), kind
        assert all(artifact.layer_errors[n] == 0 for n in ckpt.qweights), kind
    assert report.artifact("onnx").scores.kl_mean < 1e-6  # accuracy level 0 computes in float32


def test_a_float_model_is_rounded_to_nearest_in_a_folder_that_is_removed(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    report = sr.export_gguf(tiny_model, tmp_path / "rtn.gguf", bits=4, group_size=32, sym=True,
                            tokenizer_pre_name="gpt-2", progress=False)
    quantized = [t for t in report.tensors if t.quantized]
    assert quantized and all(t.type == "Q4_0" and t.exact for t in quantized)
    assert list((tmp_path / "tmp").iterdir()) == []
    # the same rounding by hand (in a folder of the same name, which names the model in the file)
    sr.quantize(tiny_model, tmp_path / "by-hand" / "rtn", bits=4, group_size=32, sym=True, iters=0, progress=False)
    sr.export_gguf(tmp_path / "by-hand" / "rtn", tmp_path / "by-hand.gguf", tokenizer_pre_name="gpt-2",
                   progress=False)
    assert (tmp_path / "rtn.gguf").read_bytes() == (tmp_path / "by-hand.gguf").read_bytes()
    floats = sr.export_onnx(tiny_model, tmp_path / "f", bits=16, progress=False)
    assert floats.layers == {}  # bits 16: every weight stays float


@pytest.mark.parametrize("settings,param", [
    (dict(bits=7), "bits"),
    (dict(group_size=0), "group_size"),
    (dict(iters=-1), "iters"),
    (dict(recipe="slow"), "recipe"),
    (dict(batch_size=16, nsamples=8), "batch_size"),
    (dict(gguf="q4_k_m", bits=4), "gguf"),
    (dict(gguf="q9_z"), "gguf"),
    (dict(target="gguf", avg_bits=3.0, allocation="bits.json"), "allocation"),
    (dict(target="tflite", avg_bits=3.0), "target"),
    (dict(target="onnx", size_mb=1.0, avg_bits=3.0), "size_mb"),
    (dict(target="gguf", avg_bits=0.5), "avg_bits"),
    (dict(device="tpu"), "device"),
])
def test_bad_settings_name_their_parameter(tiny_model, tmp_path, settings, param):
    with pytest.raises(sr.TuneError) as raised:
        sr.quantize(tiny_model, tmp_path / "c", progress=False, **settings)
    assert raised.value.param == param
    assert f"`{param}`" in str(raised.value) and "--" not in str(raised.value)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.progress").exists()


def test_too_little_calibration_text_is_a_data_error(tiny_model, tmp_path):
    (tmp_path / "short.txt").write_text("a few words only " * 20)
    with pytest.raises(sr.DataError, match="fewer than `nsamples` 8") as raised:
        sr.quantize(tiny_model, tmp_path / "c", iters=1, nsamples=8, seqlen=64, batch_size=4,
                    calib=tmp_path / "short.txt", progress=False)
    assert raised.value.param == "nsamples"
    with pytest.raises(sr.ModelError):
        sr.quantize(tmp_path / "nowhere", tmp_path / "c", progress=False)
