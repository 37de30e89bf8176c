"""Calibration activations' storage (dtype, device) in tune(), and the memory plan of `tune --dry-run`."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import signround_export as sr
from signround_export.data import calibration_samples, default_calibration_text, encode, load_tokenizer
from signround_export.model.forward import block_forward
from signround_export.model.load import load_float_model
from signround_export.model.store import TensorStore
from signround_export.tune import memory
from signround_export.tune.config import TuneConfig
from signround_export.tune.signround import batched, tune

from conftest import write_tiny_model


@pytest.fixture(scope="module")
def setup(tiny_model):
    model, hf, folder = load_float_model(tiny_model)
    ids = encode(load_tokenizer(folder), default_calibration_text())
    config = TuneConfig(bits=4, group_size=32, iters=20, nsamples=8, seqlen=32, batch_size=2)
    return model, calibration_samples(ids, config.nsamples, config.seqlen, config.seed), config


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools import gpu_check

    return gpu_check


def same_integers(a, b) -> bool:
    return a.keys() == b.keys() and all(
        all(np.array_equal(getattr(a[n], f), getattr(b[n], f)) for f in ("q", "scale", "zero")) for n in a)


def test_activations_on_the_cpu_give_the_integers_of_the_default(setup):
    model, calib, config = setup
    default = tune(model, calib, config, device="cpu", progress=False)
    on_cpu = tune(model, calib, config, device="cpu", act_device="cpu", progress=False)
    assert same_integers(default.qweights, on_cpu.qweights)
    assert [b.loss_after for b in default.blocks] == [b.loss_after for b in on_cpu.blocks]


def test_batched_writes_in_place_what_the_concatenation_gave(setup):
    """The default path (float32 on the device) is bit for bit the former torch.cat of float32 batches."""
    model, calib, _ = setup
    params, rope = model.block_params(0), model.ropes(calib.shape[1])[0]
    x = model.embed(calib)
    fn = lambda b: block_forward(model.cfg, params, b, *rope)  # noqa: E731
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            before = torch.cat([fn(x[i : i + 3]).float() for i in range(0, len(x), 3)])
        assert torch.equal(batched(fn, x, 3, dtype), before)


def test_bfloat16_activations_are_stored_so_and_computed_in_float32(setup):
    model, calib, _ = setup
    params, rope = model.block_params(0), model.ropes(calib.shape[1])[0]
    x = model.embed(calib).to(torch.bfloat16)
    fn = lambda b: block_forward(model.cfg, params, b, *rope)  # noqa: E731
    out = batched(fn, x, 3, torch.float32, "cpu")
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(out, batched(fn, x.float(), 3, torch.float32).to(torch.bfloat16))


def test_bfloat16_activations_tune_close_to_float32(setup, gpu_check):
    """Half the activation memory: every block still improves on round-to-nearest, and the weights stay
    within one quantization step of those tuned on float32 activations, as gpu_check requires of a GPU
    run (the codes themselves move as much as with another seed)."""
    model, calib, config = setup
    f32 = tune(model, calib, config, device="cpu", progress=False)
    bf16 = tune(model, calib, replace(config, act_dtype="bfloat16"), device="cpu", progress=False)
    for log in bf16.blocks:
        assert log.loss_after < log.loss_before
    assert not same_integers(f32.qweights, bf16.qweights)  # the option is honoured
    assert min(gpu_check.within_step(f32.qweights, bf16.qweights).values()) >= gpu_check.MIN_WITHIN_STEP
    for b32, b16 in zip(f32.blocks, bf16.blocks):
        assert b16.loss_after <= b32.loss_after * gpu_check.MAX_LOSS_RATIO


def test_a_bad_activation_setting_is_refused(setup):
    model, calib, config = setup
    with pytest.raises(sr.TuneError, match="act_dtype"):
        TuneConfig(act_dtype="float16").check()
    with pytest.raises(sr.TuneError, match="act_device.*cuda"):
        tune(model, calib, config, device="cpu", act_device="cuda", progress=False)


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("plan") / "model", hidden=64, intermediate=160, layers=3,
                            tied=False)


def test_the_plan_reads_headers_only_and_counts_each_part(untied_model, monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"the plan read {name}")

    monkeypatch.setattr(TensorStore, "__getitem__", refuse)
    plan = sr.tune_memory(untied_model, recipe="fast", device="cpu")
    parts = {p.name: p for p in plan.parts}
    shapes = json.loads((untied_model / "config.json").read_text())
    vocab, hidden = shapes["vocab_size"], shapes["hidden_size"]
    block = sum(t.numel() for n, t in load_model_tensors(untied_model).items() if n.startswith("model.layers.0."))
    assert parts["the largest float tensor (float32)"].nbytes == 4 * vocab * hidden
    assert parts["two decoder blocks (float32)"].nbytes == 2 * 4 * block
    assert parts["calibration activations (float32)"].nbytes == 3 * 64 * 256 * hidden * 4
    phase = {ph: sum(p.nbytes for p in plan.parts if p.phase == ph) for ph in ("", "tuning", "writing")}
    assert plan.total("cpu") == phase[""] + max(phase["tuning"], phase["writing"]) and plan.total("gpu") == 0
    assert parts["the largest float tensor (float32)"].phase == "writing"
    assert parts["tuning state of one block"].phase == "tuning"
    half = sr.tune_memory(untied_model, recipe="fast", device="cpu", act_dtype="bfloat16")
    assert {p.name: p.nbytes for p in half.parts}["calibration activations (bfloat16)"] * 2 == \
        parts["calibration activations (float32)"].nbytes
    assert "the block's rounding, kept" in parts  # a tiny block keeps it (memory.recomputes)
    monkeypatch.setattr(memory, "KEPT_ROUNDING", 0)
    assert "one linear's rounding, recomputed" in {p.name for p in sr.tune_memory(untied_model, device="cpu").parts}
    rtn = {p.name for p in sr.tune_memory(untied_model, iters=0, clip_search=False, device="cpu").parts}
    assert not any("activations" in n or "tuning" in n or "clipping" in n for n in rtn)


def test_a_ranks_plan_holds_its_share(untied_model, monkeypatch):
    """Under torchrun each rank holds nsamples / ranks of the activation chains, and with the strata batch
    order batch_size / ranks samples of a step; WORLD_SIZE (torchrun's) says how many ranks by default."""
    def parts(**kw):
        return {p.name: p.nbytes for p in sr.tune_memory(untied_model, recipe="fast", device="cpu", **kw).parts}

    one, acts, step = parts(), "calibration activations (float32)", "one step's activations and gradients"
    two = parts(ranks=2)
    assert two[acts] * 2 == one[acts] and two[step] == one[step]  # a random batch may fall on one rank whole
    assert parts(ranks=2, batch_order="strata")[step] * 2 == one[step]
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert parts()[acts] * 4 == one[acts]
    with pytest.raises(sr.TuneError, match="not a multiple of the world size 3"):
        parts(ranks=3)
    with pytest.raises(sr.TuneError, match="`ranks` 0"):
        parts(ranks=0)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(sr.TuneError, match="WORLD_SIZE 'two'"):
        parts()


def load_model_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_a_gpu_plan_without_a_gpu_and_the_offload_rule(untied_model):
    gpu = sr.tune_memory(untied_model, device="cuda")
    acts = next(p for p in gpu.parts if p.name.startswith("calibration activations"))
    assert acts.where == "gpu" and gpu.total("gpu") > acts.nbytes
    assert memory.offload(gpu, free=gpu.total("gpu") - 1) and not memory.offload(gpu, free=gpu.total("gpu"))
    offloaded = sr.tune_memory(untied_model, device="cuda", act_device="cpu")
    assert offloaded.total("gpu") == gpu.total("gpu") - acts.nbytes
    assert [p.where for p in offloaded.parts if p.name == acts.name] == ["cpu"]


def signround(*args):
    return subprocess.run([sys.executable, "-m", "signround_export.cli", *map(str, args)], capture_output=True,
                          text=True)


def test_dry_run_prints_the_plan_writes_nothing_and_bounds_the_measured_peak(tmp_path):
    """The CPU total of --dry-run against the peak RSS of the same run (a block large enough that the
    weights and activations, not the interpreter, are most of it)."""
    model = write_tiny_model(tmp_path / "model", hidden=512, intermediate=1536, layers=2, heads=8, kv_heads=4)
    settings = ["--iters", "2", "--nsamples", "32", "--seqlen", "128", "--batch-size", "4", "--device", "cpu"]
    r = signround("tune", model, "--out", tmp_path / "ckpt", *settings, "--dry-run")
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "ckpt").exists()
    total = next(float(line.split()[-2]) for line in r.stdout.splitlines() if line.startswith("CPU total"))
    peak = measured_peak_mb(model, tmp_path / "ckpt", settings)
    assert peak <= total, (peak, total, r.stdout)


def measured_peak_mb(model, out, settings) -> float:
    code = ("import resource, sys; from signround_export.cli import main; rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "tune", str(model), "--out", str(out), "--quiet", *settings],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.split()[-1])


def test_act_device_cuda_without_cuda_blocks_is_refused_by_flag(tmp_path, tiny_model):
    r = signround("tune", tiny_model, "--out", tmp_path / "o", "--device", "cpu", "--act-device", "cuda")
    assert r.returncode == 2 and "--act-device 'cuda'" in r.stderr and "--device cuda" in r.stderr, r.stderr


def test_gpu_check_compares_two_runs_and_catches_moved_codes(gpu_check):
    small = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256}
    model = gpu_check.random_model(gpu_check.TINY | small)
    result = gpu_check.check("tiny", model, TuneConfig(iters=3, nsamples=4, seqlen=32, batch_size=2), "cpu", "cpu")
    assert result.passed() and gpu_check.same_codes(result.reference.qweights, result.run.qweights) == 1.0
    assert "tiny: ok" in result.row()
    name = next(iter(result.run.qweights))
    qw = result.run.qweights[name]
    moved = np.where(qw.q >= 2, qw.q - 2, qw.q + 2).astype(np.uint8)  # two steps away: beyond the tolerance
    result.run.qweights[name] = replace(qw, q=moved)
    assert not result.passed() and "FAILED" in result.row() and name in result.row()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_gpu_check_without_cuda_says_so_and_exits_2(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err
