"""SignRound on tiny random models: it beats round-to-nearest, is deterministic, and keeps its bounds."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from signround_export.checkpoint.qweight import Scheme
from signround_export.data import calibration_samples, default_calibration_text, encode, load_tokenizer
from signround_export.model.load import load_float_model
from signround_export.tune.clip import clip_search
from signround_export.tune.config import TuneConfig
from signround_export.tune.quantizer import group_range, grouped, quantize
from signround_export.tune import memory, signround
from signround_export.tune.signround import BlockTuner, tune


@pytest.fixture(scope="module")
def setup(tiny_model):
    model, hf, folder = load_float_model(tiny_model)
    ids = encode(load_tokenizer(folder), default_calibration_text())
    return model, ids


def output_error(model, qweights, ids):
    """Mean KL of the quantized model's next-token distribution from the float model's."""
    tensors = dict(model.tensors)
    for name, qw in qweights.items():
        tensors[name + ".weight"] = torch.from_numpy(qw.dequantize())
    quantized = type(model)(model.cfg, tensors)
    p, q = model.logits(ids).log_softmax(-1), quantized.logits(ids).log_softmax(-1)
    return F.kl_div(q, p, log_target=True, reduction="none").sum(-1).mean().item()


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (2, 64, False), (3, 32, True)])
def test_signround_beats_rtn(setup, bits, group, sym):
    model, ids = setup
    args = TuneConfig(bits=bits, group_size=group, sym=sym, iters=60, nsamples=16, seqlen=64, batch_size=4)
    calib = calibration_samples(ids, args.nsamples, args.seqlen, args.seed)
    tuned = tune(model, calib, args, progress=False)
    rtn = tune(model, None, TuneConfig(bits=bits, group_size=group, sym=sym, iters=0), progress=False)
    for log in tuned.blocks:
        assert log.loss_after < log.loss_before
    held_out = calibration_samples(ids[len(ids) // 2 :], 4, 64, seed=7)
    assert output_error(model, tuned.qweights, held_out) < output_error(model, rtn.qweights, held_out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_seed_same_integers(setup, monkeypatch, dtype):
    """Twice with the same seed: the same integers, also when the second run recomputes each rounding in
    the backward pass (as a block too large to keep it does) instead of keeping it."""
    model, ids = setup
    monkeypatch.setattr(signround, "pick_dtype", lambda device: getattr(torch, dtype))
    args = TuneConfig(bits=4, group_size=32, iters=10, nsamples=8, seqlen=32, batch_size=2)
    calib = calibration_samples(ids, args.nsamples, args.seqlen, args.seed)
    a = tune(model, calib, args, progress=False).qweights
    monkeypatch.setattr(memory, "KEPT_ROUNDING", 0)
    b = tune(model, calib, args, progress=False).qweights
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name].q, b[name].q)
        np.testing.assert_array_equal(a[name].scale, b[name].scale)
        np.testing.assert_array_equal(a[name].zero, b[name].zero)


def test_rtn_needs_no_data_and_quantizes_every_linear(setup):
    model, _ = setup
    result = tune(model, None, TuneConfig(bits=4, group_size=-1, iters=0, quant_lm_head=True), progress=False)
    assert len(result.qweights) == 7 * model.cfg.n_layers + 1
    assert result.qweights["lm_head"].shape == (model.cfg.vocab_size, model.cfg.hidden_size)


def test_signed_steps_stay_within_bounds():
    w = torch.randn(8, 64)
    params = {"self_attn.q_proj.weight": w}
    tuner = BlockTuner(params, {"self_attn.q_proj": Scheme(4, 32, False)}, "cpu")
    for _ in range(40):  # a large rate pushes every parameter to its bound
        loss = (quantize(w, Scheme(4, 32, False), tuner.v["self_attn.q_proj"], tuner.min_scale["self_attn.q_proj"],
                         tuner.max_scale["self_attn.q_proj"]).weight * torch.randn(8, 64)).sum()
        loss.backward()
        tuner.step(0.3)
    assert tuner.v["self_attn.q_proj"].abs().max() <= 0.5
    for t in (tuner.min_scale["self_attn.q_proj"], tuner.max_scale["self_attn.q_proj"]):
        assert t.min() >= 0 and t.max() <= 1


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_lowers_the_input_weighted_error(sym):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g) * 0.02
    w[torch.rand(w.shape, generator=g) < 0.02] *= 8  # outliers that max-based scales stretch for
    power = torch.rand(256, generator=g) ** 4
    scheme, rng = Scheme(4, 32, sym), group_range(w, 32)

    def err(f_lo, f_hi):
        return (grouped((w - quantize(w, scheme, None, f_lo, f_hi, rng).weight) ** 2 * power, 32)).sum(-1)

    f_lo, f_hi = clip_search(w, scheme, power, rng)
    ones = torch.ones_like(f_lo)
    assert torch.all(err(f_lo, f_hi) <= err(ones, ones)) and err(f_lo, f_hi).sum() < 0.9 * err(ones, ones).sum()
    for f in (f_lo, f_hi):
        assert f.min() < 1 and f.max() <= 1.5
    if sym:
        assert torch.equal(f_lo, f_hi)  # one scale: both ends move together
    else:
        assert (f_lo != f_hi).float().mean() > 0.2  # the least-squares line moves each end on its own


def test_clip_search_finds_a_coarser_grid_the_weights_lie_on():
    """Weights on a 4-bit grid (a step and a minimum per group of 32, as a model shipped in Q4_1 is) lie
    exactly on a 5-bit grid of half the step; the full-range 5-bit step, range / 31, misses it."""
    g = torch.Generator().manual_seed(1)
    d = (torch.rand(16, 8, 1, generator=g) * 0.01 + 0.004).half().float()
    m = (-torch.rand(16, 8, 1, generator=g) * 0.05).half().float()  # groups hold both signs: m + 15 d > 0
    codes = torch.randint(0, 16, (16, 8, 32), generator=g)
    codes[..., 0], codes[..., 1] = 0, 15  # each group spans its whole range
    w = (m + d * codes).reshape(16, 256)
    scheme = Scheme(5, 32, False, float_offset=True)  # Q5_1's grid
    rng = group_range(w, 32)
    assert (quantize(w, scheme, None, None, None, rng).weight - w).abs().max() > 1e-4
    f_lo, f_hi = clip_search(w, scheme, torch.ones(256), rng)
    assert (quantize(w, scheme, None, f_lo, f_hi, rng).weight - w).abs().max() < 1e-6


@pytest.mark.parametrize("sym", [True, False])
def test_iters_0_with_clip_search_keeps_the_search_result(setup, sym):
    """--iters 0 --clip-search: calibration statistics choose each group's clipping, no SignRound step
    runs, and the model is closer to the float one than plain round-to-nearest on held-out text."""
    model, ids = setup
    args = TuneConfig(bits=3, group_size=32, sym=sym, iters=0, clip_search=True, nsamples=16, seqlen=64, batch_size=4)
    calib = calibration_samples(ids, args.nsamples, args.seqlen, args.seed)
    searched = tune(model, calib, args, progress=False)
    rtn = tune(model, None, TuneConfig(bits=3, group_size=32, sym=sym, iters=0), progress=False)
    assert all(b.best_iter is None for b in searched.blocks)
    assert any(not np.array_equal(searched.qweights[n].q, rtn.qweights[n].q) for n in rtn.qweights)
    held_out = calibration_samples(ids[len(ids) // 2 :], 4, 64, seed=7)
    assert output_error(model, searched.qweights, held_out) < output_error(model, rtn.qweights, held_out)


def test_rtn_default_ignores_calibration(setup):
    """Without --clip-search, --iters 0 stays plain round-to-nearest even when data is at hand."""
    model, ids = setup
    calib = calibration_samples(ids, 4, 32, 0)
    a = tune(model, calib, TuneConfig(bits=4, group_size=32, iters=0), progress=False).qweights
    b = tune(model, None, TuneConfig(bits=4, group_size=32, iters=0), progress=False).qweights
    for name in a:
        np.testing.assert_array_equal(a[name].q, b[name].q)


SCHEMES = [Scheme(4, 32, False), Scheme(3, 32, True), Scheme(2, 16, False, sub_scale_bits=4, float_offset=True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scheme", SCHEMES, ids=["asym", "sym", "k-quant"])
def test_recomputed_fake_quant_gives_the_kept_graphs_gradients(scheme, dtype):
    """weights() recomputes the rounding in the backward pass (a block too large to keep it; forced here):
    the gradients must be bit for bit those of the graph that keeps it."""
    torch.manual_seed(0)
    w, x = torch.randn(48, 256), torch.randn(4, 10, 256)
    tuner = BlockTuner({"mlp.up_proj.weight": w}, {"mlp.up_proj": scheme}, "cpu")
    assert not tuner.recompute  # a small block keeps the rounding
    tuner.recompute = True
    with torch.no_grad():  # away from the starting point, so that every part of the rounding has a gradient
        tuner.v["mlp.up_proj"].uniform_(-0.5, 0.5)
        tuner.min_scale["mlp.up_proj"].uniform_(0.7, 1.0)
        tuner.max_scale["mlp.up_proj"].uniform_(0.7, 1.0)

    def grads(weight) -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = F.linear(x, weight()).float().square().mean()
        loss.backward()
        out = [t.grad.clone() for t in tuner.tensors()]
        for t in tuner.tensors():
            t.grad = None
        return out

    kept = grads(lambda: quantize(w, scheme, tuner.v["mlp.up_proj"], tuner.min_scale["mlp.up_proj"],
                                  tuner.max_scale["mlp.up_proj"], tuner.ranges["mlp.up_proj"]).weight)
    recomputed = grads(lambda: tuner.weights(dtype)["mlp.up_proj.weight"])
    for a, b in zip(kept, recomputed):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_a_step_keeps_little_per_weight():
    """What autograd keeps of a block's fake-quantized weights through a step: the matmul's own copy of
    each weight (2 bytes in bfloat16), not the rounding's intermediates (about 10 bytes more)."""
    torch.manual_seed(0)
    shapes = {"self_attn.q_proj": (256, 256), "mlp.up_proj": (512, 256)}
    params = {n + ".weight": torch.randn(*s) for n, s in shapes.items()}
    tuner = BlockTuner(params, {n: Scheme(4, 32, False) for n in shapes}, "cpu")
    tuner.recompute = True  # as a block too large to keep its rounding
    saved = []

    def keep(t):
        saved.append(t.numel() * t.element_size() if t.numel() >= 256 * 256 else 0)  # the weight-sized ones
        return t

    x = torch.randn(2, 256)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        p = tuner.weights(torch.bfloat16)
        loss = sum(F.linear(x, p[n + ".weight"]).float().sum() for n in shapes)
    loss.backward()
    weights = sum(a * b for a, b in shapes.values())
    assert sum(saved) <= 2 * weights
