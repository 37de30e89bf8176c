"""The `signround` command end to end on a tiny model: tune, resume after a kill, evaluate, bad input."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from signround_export import cli
from signround_export.checkpoint.read import read_checkpoint
from signround_export.errors import GGUFExportError
from signround_export.model.load import reference_from_checkpoint

TUNE = ["--bits", "4", "--group-size", "32", "--iters", "150", "--nsamples", "16", "--seqlen", "128",
        "--batch-size", "4", "--quiet"]


def signround(*args, **kw):
    return subprocess.run([sys.executable, "-m", "signround_export.cli", *map(str, args)],
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    from conftest import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("deep") / "model", layers=4)


@pytest.fixture(scope="module")
def uninterrupted(deep_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "ckpt"
    r = signround("tune", deep_model, "--out", out, *TUNE)
    assert r.returncode == 0, r.stderr
    return out


def assert_same_integers(a: Path, b: Path):
    ca, cb = read_checkpoint(a), read_checkpoint(b)
    assert ca.qweights.keys() == cb.qweights.keys()
    for name in ca.qweights:
        for field in ("q", "scale", "zero"):
            np.testing.assert_array_equal(getattr(ca.qweights[name], field), getattr(cb.qweights[name], field),
                                          err_msg=f"{name}.{field}")


def test_killed_run_resumes_to_the_same_integers(deep_model, uninterrupted, tmp_path):
    out = tmp_path / "ckpt"
    progress = tmp_path / "ckpt.progress"
    proc = subprocess.Popen([sys.executable, "-m", "signround_export.cli", "tune", str(deep_model), "--out",
                             str(out), *TUNE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # block_NNN.json is written after its .safetensors and marks the block done: two blocks done
    while not (progress / "block_001.json").exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave a checkpoint behind"
    assert not (progress / "block_003.safetensors").exists()

    r = signround("tune", deep_model, "--out", out, *TUNE[:-1])
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stderr
    assert not progress.exists()
    log = json.loads((out / "tuning_log.json").read_text())
    assert log["resumed_blocks"] >= 2
    assert_same_integers(out, uninterrupted)


def test_resume_with_other_settings_is_refused(deep_model, tmp_path):
    (tmp_path / "ckpt.progress").mkdir()
    (tmp_path / "ckpt.progress" / "args.json").write_text(json.dumps({"bits": 2}))
    r = signround("tune", deep_model, "--out", tmp_path / "ckpt", *TUNE)
    assert r.returncode == 2
    assert "different settings" in r.stderr and "delete that folder" in r.stderr


def test_eval_reports_perplexity_of_float_and_checkpoint(deep_model, uninterrupted, tmp_path):
    results = {}
    for name, model in (("float", deep_model), ("quant", uninterrupted)):
        r = signround("eval", model, "--window", 64, "--windows", 4, "--json", tmp_path / f"{name}.json", "--quiet")
        assert r.returncode == 0, r.stderr
        assert "4 non-overlapping windows of 64 tokens, no BOS" in r.stdout
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["quant"]["kind"] == "checkpoint reference"
    assert np.isfinite(results["quant"]["ppl"]) and results["quant"]["ppl"] != results["float"]["ppl"]


@pytest.mark.parametrize("args,message", [
    (["tune", "/no/such/model", "--out", "X"], "no such folder"),
    (["tune", "{model}", "--out", "{tmp}/o", "--nsamples", "5000", "--seqlen", "512"], "fewer than --nsamples 5000"),
    (["tune", "{model}", "--out", "{tmp}/o", "--batch-size", "64", "--nsamples", "8"], "larger than --nsamples"),
    (["tune", "{model}", "--out", "{tmp}/o", "--calib", "{tmp}/missing.txt"], "does not exist"),
    (["eval", "{tmp}", "--windows", "2"], "no config.json"),
    pytest.param(["tune", "{model}", "--out", "{tmp}/o", "--device", "cuda"], "no CUDA device is available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["tune", "{model}", "--out", "{tmp}/o", "--calib", "{tmp}/bad.jsonl"], "bad.jsonl:2: expected a JSON object"),
    (["eval", "{model}", "--text", "{tmp}/short.txt"], "fewer than one window of 512"),
])
def test_bad_input_gives_a_one_line_error(deep_model, tmp_path, args, message):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    (tmp_path / "short.txt").write_text("too short to evaluate")
    r = signround(*[a.format(model=deep_model, tmp=tmp_path) for a in args])
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_flag_values_are_refused_by_the_parser(deep_model, tmp_path):
    r = signround("tune", deep_model, "--out", tmp_path / "o", "--bits", "7")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = signround("tune", deep_model, "--out", tmp_path / "o", "--iters", "-1")
    assert r.returncode == 2 and "must be 0 or more" in r.stderr


def test_quantized_lm_head_round_trips_through_the_checkpoint(deep_model, tmp_path):
    out = tmp_path / "ckpt"
    r = signround("tune", deep_model, "--out", out, "--iters", "0", "--bits", "8", "--group-size", "32",
                  "--quant-lm-head", "--quiet")
    assert r.returncode == 0, r.stderr
    ckpt = read_checkpoint(out)
    assert ckpt.qweights["lm_head"].bits == 8
    assert ckpt.quant.extra_config["lm_head"]["bits"] == 8
    assert "model.embed_tokens.weight" in ckpt.tensors  # the tied embedding stays float
    assert "lm_head.weight" not in ckpt.tensors
    # a quantized head is no longer the embedding: the checkpoint's config unties them, as auto-round's
    # loader requires, and the reference's head is the integers
    assert json.loads((deep_model / "config.json").read_text())["tie_word_embeddings"] is True
    assert ckpt.hf_config["tie_word_embeddings"] is False
    head = reference_from_checkpoint(ckpt).lm_head_weight().numpy()
    np.testing.assert_array_equal(head, ckpt.qweights["lm_head"].dequantize())


def test_parameter_names_in_errors_become_flags(deep_model, tmp_path, capsys):
    args = ["tune", str(deep_model), "--out", str(tmp_path / "o"), "--batch-size", "16", "--nsamples", "8"]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip() == \
        "signround tune: error: --batch-size 16 is larger than --nsamples 8; lower the first or raise the second"
    flags = cli.flag_names(cli.build_parser()._subparsers._group_actions[0].choices["tune"])
    assert flags["batch_size"] == "--batch-size" and flags["quant_lm_head"] == "--quant-lm-head"
    # a message in bare words: the first use of its parameter's name is the flag, paths stay as they are
    assert cli.flagged("out /x/out/y: out is a file", "out", flags) == "--out /x/out/y: out is a file"


def test_every_signround_error_is_one_line_and_nothing_else_is_hidden(deep_model, tmp_path, capsys, monkeypatch):
    """main catches the one error type, whichever stage raised it; any other exception is a bug and
    keeps its traceback."""
    def fail(error):
        def export(*args, **kwargs):
            raise error
        return export

    args = ["export", "gguf", str(deep_model), "--out", str(tmp_path / "m.gguf"), "--quiet"]
    monkeypatch.setattr(cli, "export_gguf", fail(GGUFExportError("float_type 'f8': choose f16, f32 or q8_0",
                                                                  param="float_type")))
    assert cli.main(args) == 2
    assert capsys.readouterr().err == "signround export: error: --float-type 'f8': choose f16, f32 or q8_0\n"
    monkeypatch.setattr(cli, "export_gguf", fail(KeyboardInterrupt()))
    assert cli.main(args) == 130
    monkeypatch.setattr(cli, "export_gguf", fail(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(args)


def test_a_full_disk_is_one_line_and_leaves_nothing(deep_model, tmp_path, capsys, monkeypatch):
    """The disk filling up while the GGUF file's tensors are spooled: one line that says so, exit 1, and
    no file (whole or partial, spool or temporary) left in the output folder."""
    import errno

    from signround_export.export.gguf import spool

    def full(self, name, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool.TensorSpool, "add", full)
    out = tmp_path / "out"
    assert cli.main(["export", "gguf", str(deep_model), "--out", str(out / "m.gguf"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device; nothing was written: free space" in err, err
    assert list(out.iterdir()) == []
