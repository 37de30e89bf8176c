"""The ablation switches of tuning (TuneConfig.optimizer, tune_clip, lr_schedule, patience, best): each at
its default leaves the integers as they are, and each otherwise does what it says, on a tiny model."""

import json
import math

import numpy as np
import pytest
import torch

from signround_export import cli, tune_memory
from signround_export.checkpoint.qweight import Scheme
from signround_export.data import calibration_samples, default_calibration_text, encode, load_tokenizer
from signround_export.errors import TuneError
from signround_export.model.forward import block_forward
from signround_export.model.load import load_float_model
from signround_export.tune.config import ABLATION_SETTINGS, TuneConfig
from signround_export.tune.quantizer import quantize
from signround_export.tune.resume import ResumeStore
from signround_export.tune.signround import (BlockLog, BlockTuner, batch_order, batched, block_loss, input_power,
                                             lr_at, to_compute, tune, tune_block)

SMALL = dict(bits=4, group_size=32, nsamples=8, seqlen=32, batch_size=2)


@pytest.fixture(scope="module")
def setup(tiny_model):
    model, _, folder = load_float_model(tiny_model)
    ids = encode(load_tokenizer(folder), default_calibration_text())
    return model, calibration_samples(ids, SMALL["nsamples"], SMALL["seqlen"], 42)


@pytest.fixture(scope="module")
def block0(setup):
    """Block 0's float tensors, inputs and float targets: what tune() hands tune_block for the first block."""
    model, calib = setup
    params = model.block_params(0)
    x = model.embed(calib).detach()
    rope = model.ropes(calib.shape[1])[0]
    y = batched(lambda b: block_forward(model.cfg, params, b, *rope, window=model.cfg.window(0)), x, 2,
                torch.float32)
    return model, params, x, y, rope


def run_block(block0, trace=None, **settings):
    model, params, x, y, rope = block0
    config = TuneConfig(**(SMALL | settings))
    config.check()
    return tune_block(model, 0, params, x, y, rope, config, torch.float32, False, trace)


def recorder():
    events = []
    return events, lambda kind, it, idx, loss: events.append((kind, it, idx.tolist(), loss))


def assert_same_integers(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for field in ("q", "scale", "zero"):
            np.testing.assert_array_equal(getattr(a[name], field), getattr(b[name], field), err_msg=name)


def test_switches_at_their_defaults_tune_as_without_them(setup):
    model, calib = setup
    plain = tune(model, calib, TuneConfig(iters=12, **SMALL), progress=False)
    explicit = TuneConfig(iters=12, optimizer="signsgd", tune_clip=True, lr_schedule="linear", patience=0,
                          best="batch", eval_every=10, **SMALL)
    assert set(ABLATION_SETTINGS) <= set(vars(explicit))
    switched = tune(model, calib, explicit, progress=False)
    assert_same_integers(plain.qweights, switched.qweights)
    assert [(b.loss_before, b.loss_after, b.best_iter, b.steps) for b in plain.blocks] == \
        [(b.loss_before, b.loss_after, b.best_iter, b.steps) for b in switched.blocks]
    assert all(b.steps == 12 for b in plain.blocks)


def test_settings_a_rule_does_not_read_change_nothing(block0):
    """eval_every only matters to best "fixed"; a patience of at least iters never stops a block."""
    base_q, base_log = run_block(block0, iters=10)
    q, log = run_block(block0, iters=10, eval_every=3, patience=10)
    assert_same_integers(base_q, q)
    assert (log.loss_after, log.best_iter, log.steps) == (base_log.loss_after, base_log.best_iter, 10)


def test_lr_schedules():
    total, lr0 = 8, 0.5
    assert [lr_at("linear", lr0, t, total) for t in range(total)] == [lr0 * (1 - t / total) for t in range(total)]
    assert [lr_at("constant", lr0, t, total) for t in range(total)] == [lr0] * total
    cosine = [lr_at("cosine", lr0, t, total) for t in range(total)]
    assert cosine[0] == lr0 and cosine[4] == pytest.approx(lr0 / 2)
    assert all(a > b > 0 for a, b in zip(cosine, cosine[1:]))
    assert cosine[-1] == pytest.approx(lr0 * (1 + math.cos(math.pi * 7 / 8)) / 2)


@pytest.mark.parametrize("schedule", ["linear", "constant", "cosine"])
def test_each_step_runs_at_its_schedules_rate(block0, monkeypatch, schedule):
    rates = []
    step = BlockTuner.step
    monkeypatch.setattr(BlockTuner, "step", lambda self, lr: (rates.append(lr), step(self, lr))[1])
    run_block(block0, iters=6, lr=0.1, lr_schedule=schedule)
    assert rates == [lr_at(schedule, 0.1, t, 6) for t in range(6)]


def toy_tuner(optimizer, tune_clip=True):
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    return w, BlockTuner({"mlp.up_proj.weight": w}, {"mlp.up_proj": Scheme(4, 32, False)}, "cpu",
                         optimizer=optimizer, tune_clip=tune_clip)


def toy_backward(w, tuner, target):
    t = tuner
    loss = ((quantize(w, Scheme(4, 32, False), t.v["mlp.up_proj"], t.min_scale["mlp.up_proj"],
                      t.max_scale["mlp.up_proj"]).weight - target) ** 2).sum()
    loss.backward()


def test_adam_step_is_adams_update():
    """Three steps against Adam's update written out (betas 0.9, 0.999, eps 1e-8) and the bounds, each at
    its own rate; the first moves every offset with a gradient by about lr, as Adam's first step does."""
    w, tuner = toy_tuner("adam")
    torch.manual_seed(1)
    targets = [torch.randn(8, 64) for _ in range(3)]
    m = [torch.zeros_like(t) for t in tuner.variables()]
    v = [torch.zeros_like(t) for t in tuner.variables()]
    for step, (lr, target) in enumerate(zip((0.01, 0.005, 0.002), targets), start=1):
        before = [t.detach().clone() for t in tuner.variables()]
        toy_backward(w, tuner, target)
        grads = [t.grad.clone() for t in tuner.variables()]
        tuner.step(lr)
        for i, (b, g, t) in enumerate(zip(before, grads, tuner.variables())):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            expect = b - lr * (m[i] / (1 - 0.9**step)) / ((v[i] / (1 - 0.999**step)).sqrt() + 1e-8)
            expect = expect.clamp(-0.5, 0.5) if i == 0 else expect.clamp(0, 1)  # the offsets, then the factors
            torch.testing.assert_close(t.detach(), expect, rtol=1e-5, atol=1e-7)
            if step == 1 and i == 0:
                moved = (t.detach() - b)[g.abs() > 1e-4].abs()
                assert moved.numel() > 0 and torch.allclose(moved, torch.full_like(moved, lr), rtol=1e-3)
        assert all(t.grad is None for t in tuner.variables())


@pytest.mark.parametrize("optimizer", ["signsgd", "adam"])
def test_steps_keep_their_bounds(optimizer):
    w, tuner = toy_tuner(optimizer)
    torch.manual_seed(2)
    for _ in range(40):  # a large rate pushes every variable to its bound
        toy_backward(w, tuner, 10 * torch.randn(8, 64))
        tuner.step(0.3)
    v, lo, hi = tuner.v["mlp.up_proj"], tuner.min_scale["mlp.up_proj"], tuner.max_scale["mlp.up_proj"]
    assert v.abs().max() <= 0.5 and v.abs().max() == 0.5
    for t in (lo, hi):
        assert t.min() >= 0 and t.max() <= 1 and (t != 1).any()


def test_held_clipping_stays_where_it_starts():
    w, tuner = toy_tuner("adam", tune_clip=False)
    toy_backward(w, tuner, torch.randn(8, 64))
    tuner.step(0.1)
    assert tuner.variables() == list(tuner.v.values())
    assert (tuner.v["mlp.up_proj"] != 0).any()
    assert torch.equal(tuner.min_scale["mlp.up_proj"], torch.ones(8, 2))
    assert torch.equal(tuner.max_scale["mlp.up_proj"], torch.ones(8, 2))


@pytest.mark.parametrize("optimizer", ["signsgd", "adam"])
def test_both_optimizers_lower_the_block_loss_below_rtn(block0, optimizer):
    """Measured on the fixed batch, so that the comparison is of parameters, not of batches: at step 0
    (clip_search off) the parameters are round to nearest's."""
    events, trace = recorder()
    _, log = run_block(block0, trace, iters=30, clip_search=False, best="fixed", optimizer=optimizer)
    held = {it: loss for kind, it, _, loss in events if kind == "held"}
    assert log.loss_after == min(held.values()) and log.loss_after < 0.8 * held[0]


@pytest.mark.parametrize("clip_search", [False, True])
def test_no_tune_clip_keeps_the_starts_scales_and_moves_the_integers(block0, setup, clip_search):
    """On one block, so that both runs start from the same inputs (the next block's inputs follow the
    integers); without clip_search the start is round to nearest's, as tune() gives it."""
    start, log = run_block(block0, iters=0, clip_search=clip_search)
    held, _ = run_block(block0, iters=15, clip_search=clip_search, tune_clip=False)
    assert log.steps == 0
    for name in start:
        np.testing.assert_array_equal(held[name].scale, start[name].scale)
        np.testing.assert_array_equal(held[name].zero, start[name].zero)
    assert sum(int((held[n].q != start[n].q).sum()) for n in start) > 0
    if not clip_search:
        model, _ = setup
        rtn = tune(model, None, TuneConfig(iters=0, **SMALL), progress=False).qweights
        assert_same_integers(start, {n: qw for n, qw in rtn.items() if n in start})


def test_patience_stops_a_block_and_keeps_the_best_seen(block0):
    """At a constant rate the batch loss soon stops falling (it wanders with the batches); the block stops
    `patience` steps after its lowest loss and keeps the parameters of that step: those a run of exactly
    that many steps ends with (the constant schedule does not depend on iters, so the two runs step alike)."""
    events, trace = recorder()
    q, log = run_block(block0, trace, iters=60, lr=0.02, lr_schedule="constant", patience=4)
    losses = [loss for kind, _, _, loss in events if kind == "train"]
    assert log.steps < 60 and len(losses) == log.steps + 1  # the last loss measured stopped the block
    assert log.best_iter == int(np.argmin(losses)) > 0 and log.loss_after == min(losses)
    assert log.steps == log.best_iter + 4
    ended, _ = run_block(block0, iters=log.best_iter, lr=0.02, lr_schedule="constant", best="last")
    assert_same_integers(q, ended)


def test_last_keeps_the_end_state(block0):
    """best "last" against the loop written out: the same batches, the same rates, the final parameters."""
    events, trace = recorder()
    q, log = run_block(block0, trace, iters=12, best="last")
    model, params, x, y, rope = block0
    schemes = {n: Scheme(4, 32, False) for n in model.cfg.family.linears}
    config = TuneConfig(iters=12, **SMALL)
    power = input_power(model.cfg, params, x, rope, 2, torch.float32, model.cfg.window(0))
    tuner = BlockTuner(params, schemes, "cpu", power)
    batches = [idx for kind, _, idx, _ in events if kind == "train"]
    assert len(batches) == 12
    for it, idx in enumerate(batches):
        block_loss(model.cfg, tuner, to_compute(x[idx], "cpu"), to_compute(y[idx], "cpu"), rope,
                   model.cfg.window(0), torch.float32).backward()
        tuner.step(lr_at("linear", config.effective_lr(), it, 12))
    expect = {f"model.layers.0.{n}": qw for n, qw in tuner.qweights(tuner.snapshot()).items()}
    assert_same_integers(q, expect)
    assert (log.best_iter, log.steps) == (12, 12)


def test_fixed_keeps_the_lowest_loss_on_one_batch_and_trains_as_batch_does(block0):
    runs = {}
    for rule in ("batch", "fixed", "last"):
        events, trace = recorder()
        q, log = run_block(block0, trace, iters=25, best=rule)
        runs[rule] = events, q, log
    train = {rule: [(it, idx, loss) for kind, it, idx, loss in e if kind == "train"] for rule, (e, _, _) in
             runs.items()}
    assert train["batch"] == train["fixed"] == train["last"]  # the same batches, the same losses: the same steps
    held = [(it, idx, loss) for kind, it, idx, loss in runs["fixed"][0] if kind == "held"]
    assert [it for it, _, _ in held] == [0, 10, 20, 25]
    assert all(idx == held[0][1] for _, idx, _ in held) and len(held[0][1]) == SMALL["batch_size"]
    best = min(held, key=lambda h: h[2])
    assert (runs["fixed"][2].loss_after, runs["fixed"][2].best_iter) == (best[2], best[0])
    batch_log = runs["batch"][2]
    assert batch_log.loss_after == min(loss for _, _, loss in train["batch"])
    if best[0] == 25:  # kept the end state: the same integers as "last"
        assert_same_integers(runs["fixed"][1], runs["last"][1])


def test_an_old_block_log_and_an_old_store_still_load(tmp_path, setup):
    model, _ = setup
    qws = tune(model, None, TuneConfig(iters=0, **SMALL), progress=False).qweights
    block = {n: qw for n, qw in qws.items() if n.startswith("model.layers.0.")}
    config = TuneConfig(iters=5, **SMALL)
    fingerprint = json.loads(json.dumps(vars(config)))
    store = ResumeStore(tmp_path / "p")
    store.begin({k: v for k, v in fingerprint.items() if k not in ABLATION_SETTINGS}, "gptq")
    store.save_block(0, block, BlockLog(0, 1.0, 0.5, 3, 0.1, steps=5))
    record = json.loads((tmp_path / "p" / "block_000.json").read_text())
    del record["log"]["steps"]  # as a store written before BlockLog.steps holds it
    (tmp_path / "p" / "block_000.json").write_text(json.dumps(record))
    again = ResumeStore(tmp_path / "p")
    again.begin(fingerprint, "gptq")  # the switches at their defaults: the old run's settings
    _, log = again.load_block(0)
    assert log == BlockLog(0, 1.0, 0.5, 3, 0.1, steps=None)
    with pytest.raises(TuneError, match="patience"):
        ResumeStore(tmp_path / "p").begin(fingerprint | {"patience": 3}, "gptq")


@pytest.mark.parametrize("setting,value", [("optimizer", "sgd"), ("patience", -1), ("best", "worst"),
                                           ("lr_schedule", "step"), ("eval_every", 0), ("tune_clip", "no"),
                                           ("batch_order", "sorted")])
def test_bad_values_are_refused_by_name(setting, value):
    with pytest.raises(TuneError) as e:
        TuneConfig.from_recipe("fast", **{setting: value})
    assert e.value.param == setting and f"`{setting}` {value!r}" in str(e.value)


def epochs(order: str, n: int, batch: int, count: int) -> list[list[torch.Tensor]]:
    batches = batch_order(torch.Generator().manual_seed(0), n, batch, order)
    return [[next(batches) for _ in range(n // batch)] for _ in range(count)]


@pytest.mark.parametrize("order", ["random", "strata"])
def test_every_sample_once_per_epoch_in_either_order(order):
    for epoch in epochs(order, 12, 4, 3):
        assert sorted(torch.cat(epoch).tolist()) == list(range(12))


def test_strata_take_one_sample_of_each_stratum_per_batch_and_vary():
    """12 samples, batch 4: strata {0,1,2}, {3,4,5}, ...; every batch holds one of each, so any contiguous
    share of whole strata (2 ranks: 6 samples each) holds the same number of every batch's samples."""
    runs = epochs("strata", 12, 4, 4)
    for epoch in runs:
        for idx in epoch:
            assert sorted((idx // 3).tolist()) == [0, 1, 2, 3]
            assert torch.bincount(idx // 6, minlength=2).tolist() == [2, 2]
    assert len({tuple(torch.cat(e).tolist()) for e in runs}) > 1  # each epoch draws new permutations


def test_strata_need_a_batch_that_divides_the_samples():
    with pytest.raises(TuneError, match="multiple of batch_size") as e:
        TuneConfig.from_recipe("fast", nsamples=10, batch_size=4, batch_order="strata")
    assert e.value.param == "batch_order"
    TuneConfig.from_recipe("fast", nsamples=10, batch_size=4, batch_order="strata", iters=0)  # no steps, no batches


def test_the_cli_refuses_a_bad_patience_in_one_line(tiny_model, tmp_path, capsys):
    assert cli.main(["tune", str(tiny_model), "--out", str(tmp_path / "o"), "--patience", "-1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("signround tune: error: --patience -1: give") and "\n" not in err


def test_adams_moments_are_in_the_memory_plan(setup, tiny_model):
    """Two float32 moments per offset: 8 bytes more per weight of the block's linears."""
    model, _ = setup
    params = model.block_params(0)
    weights = sum(params[n + ".weight"].numel() for n in model.cfg.family.linears)
    plans = {o: tune_memory(tiny_model, iters=10, optimizer=o) for o in ("signsgd", "adam")}
    state = {o: next(p for p in plan.parts if p.name == "tuning state of one block") for o, plan in plans.items()}
    assert state["adam"].nbytes - state["signsgd"].nbytes == 8 * weights


def test_the_cli_flags_reach_the_tuning_and_its_log(tiny_model, tmp_path):
    out = tmp_path / "ckpt"
    assert cli.main(["tune", str(tiny_model), "--out", str(out), "--iters", "6", "--nsamples", "4", "--seqlen", "32",
                     "--batch-size", "2", "--group-size", "32", "--optimizer", "adam", "--no-tune-clip",
                     "--lr-schedule", "cosine", "--patience", "50", "--best", "fixed", "--eval-every", "4",
                     "--batch-order", "strata", "--quiet"]) == 0
    log = json.loads((out / "tuning_log.json").read_text())
    assert {k: log["args"][k] for k in ABLATION_SETTINGS} == dict(
        optimizer="adam", tune_clip=False, lr_schedule="cosine", patience=50, best="fixed", eval_every=4,
        batch_order="strata")
    assert [b["steps"] for b in log["blocks"]] == [6, 6] and all(b["best_iter"] in (0, 4, 6) for b in log["blocks"])
