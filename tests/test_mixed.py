"""Mixed precision under a byte budget of the deployed file: the knapsack, the KL probe, the allocation,
and `tune --target onnx|gguf --size-mb|--avg-bits` through to the exported files."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from signround_export import export_gguf, export_onnx
from signround_export.checkpoint.read import read_checkpoint
from signround_export.cli import main
from signround_export.export.gguf.read import read_gguf_weights
from signround_export.model.config import ModelConfig
from signround_export.model.load import load_float_model
from signround_export.tune.allocate import Problem, allocate, knapsack, lagrangian_bound
from signround_export.tune.costs import cost_table
from signround_export.tune.kl_probe import KLProbe, block_linear_names
from signround_export.tune.pipeline import linear_shapes


def brute_force(cost, error, budget):
    best = math.inf
    for pick in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        rows = np.arange(cost.shape[0])
        if cost[rows, pick].sum() <= budget:
            best = min(best, error[rows, pick].sum())
    return best


@pytest.mark.parametrize("seed", range(6))
def test_knapsack_is_optimal_within_its_bound_and_fits_the_budget(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 20, size=7) * 1000
    cost = np.array([[s * b / 8 + s / 64 for b in (2, 4, 5, 8)] for s in sizes])
    error = np.array([[rng.uniform(0.5, 5) * 4.0 ** -(b / 2) * s for b in (2, 4, 5, 8)] for s in sizes])
    cost[rng.random(cost.shape) < 0.2] = np.inf  # some layers do not admit some choices
    cost[:, 0] = sizes / 4
    error[~np.isfinite(cost)] = np.inf
    budget = cost[:, 0].sum() * rng.uniform(1.2, 3)
    chosen = knapsack(cost, error, budget)
    rows = np.arange(len(cost))
    optimum = brute_force(cost, error, budget)
    assert cost[rows, chosen].sum() <= budget
    assert error[rows, chosen].sum() == pytest.approx(optimum, rel=1e-9)
    assert lagrangian_bound(cost, error, budget) <= optimum + 1e-9


def test_lagrangian_bound_when_the_budget_does_not_bind():
    cost = np.array([[2.0, 4.0], [2.0, np.inf]])
    error = np.array([[3.0, 1.0], [5.0, np.inf]])
    assert lagrangian_bound(cost, error, budget=100.0) == pytest.approx(6.0)


@pytest.fixture(scope="module")
def probe_model(tiny_model):
    model, _, _ = load_float_model(tiny_model)
    ids = torch.randint(0, model.cfg.vocab_size, (3, 32), generator=torch.Generator().manual_seed(5))
    return model, ids


def test_the_probe_reruns_from_the_first_changed_block_as_a_full_run_does(probe_model):
    model, ids = probe_model
    table = cost_table("gguf", linear_shapes(model), True)
    names = block_linear_names(model)
    q4 = {n: table[n]["Q4_0"][0].scheme for n in names}
    probe = KLProbe(model, ids)
    base = probe.pin(q4)
    assert base > 0
    late = names[-1]  # the last block only is rerun
    changed = probe.kl({late: table[late]["Q8_0"][0].scheme})
    assert changed == pytest.approx(KLProbe(model, ids).pin(q4 | {late: table[late]["Q8_0"][0].scheme}), rel=1e-6)
    assert probe.kl({}) == pytest.approx(base, rel=1e-9)
    assert KLProbe(model, ids).pin({n: table[n]["Q8_0"][0].scheme for n in names}) < base / 10


@pytest.mark.parametrize("target,uniform", [("gguf", "Q5_0"), ("onnx", "W4G64")])
def test_a_budget_of_a_uniform_size_gives_no_worse_a_measured_loss(probe_model, target, uniform):
    model, ids = probe_model
    shapes = linear_shapes(model)
    table = cost_table(target, shapes, target == "gguf")
    budget = sum(table[n][uniform][1] for n in shapes)
    alloc = allocate(KLProbe(model, ids), table, shapes, budget, target, tries=3, rounds=2)
    assert alloc.nbytes <= budget
    assert alloc.nbytes == sum(table[n][c][1] for n, c in alloc.choices.items())
    # measured again on a fresh probe: the allocation's KL and the uniform's
    got = KLProbe(model, ids).pin({n: table[n][c][0].scheme for n, c in alloc.choices.items()})
    want = KLProbe(model, ids).pin({n: table[n][uniform][0].scheme for n in shapes})
    assert got == pytest.approx(alloc.measured, rel=1e-6)
    assert alloc.uniform_kls[uniform] == pytest.approx(want, rel=1e-6)
    assert alloc.uniform_kl == min(alloc.uniform_kls.values())  # the best uniform that fits is the base
    assert got <= want * (1 + 1e-6)
    assert alloc.predicted > 0 and alloc.lower_bound <= alloc.predicted + 1e-12


def test_the_knapsack_goes_at_most_one_measured_step_below_the_base(probe_model):
    """The model is measured one step under the base; it does not extrapolate further (rounds=0: the
    answer is the knapsack's or the base, no measured moves)."""
    model, ids = probe_model
    shapes = linear_shapes(model)
    table = cost_table("gguf", shapes, True)
    budget = sum(table[n]["Q5_1"][1] for n in shapes) * 0.95  # without the rule, 3 layers go 2 steps under
    alloc = allocate(KLProbe(model, ids), table, shapes, budget, "gguf", rounds=0)
    for n, c in alloc.choices.items():
        labels = list(table[n])  # cheapest first
        assert labels.index(c) >= labels.index(alloc.uniform) - 1, (n, c, alloc.uniform)
    assert alloc.choices != dict.fromkeys(shapes, alloc.uniform)  # the budget made it choose


def test_a_saved_allocation_is_read_back_only_under_the_same_settings(probe_model, tmp_path):
    from signround_export.tune.resume import ResumeStore

    model, ids = probe_model
    shapes = linear_shapes(model)
    table = cost_table("gguf", shapes, True)
    budget = sum(table[n]["Q5_0"][1] for n in shapes)
    alloc = allocate(KLProbe(model, ids), table, shapes, budget, "gguf", tries=1, rounds=1)
    store = ResumeStore(tmp_path / "p", "5GB", "pydoc")
    store.save_allocation({"size_mb": 1.0}, alloc)
    assert store.load_allocation({"size_mb": 1.0}) == alloc
    assert store.load_allocation({"size_mb": 2.0}) is None


def test_budgets_no_file_meets_are_refused():
    table = {"a": {"Q4_0": (None, 100), "Q8_0": (None, 200)}, "b": {"Q4_0": (None, 100), "Q8_0": (None, 200)}}
    with pytest.raises(ValueError, match="below the smallest file"):
        Problem.of(table).check_budget(199, "`size_mb` x")
    with pytest.raises(ValueError, match="at or above the largest file"):
        Problem.of(table).check_budget(400, "`size_mb` x")
    Problem.of(table).check_budget(300, "`size_mb` x")


def initializer_bytes(folder) -> int:
    graph = onnx.load(str(folder / "model.onnx")).graph
    return sum(numpy_helper.to_array(t).nbytes for t in graph.initializer
               if t.name.endswith((".B", ".scales", ".zero_points")))


TUNE = ["--iters", "0", "--nsamples", "4", "--seqlen", "32", "--probe-windows", "2", "--quiet"]


def test_tune_for_gguf_under_a_size_writes_the_chosen_types(tiny_model, tmp_path):
    shapes = linear_shapes(load_float_model(tiny_model)[0])
    table = cost_table("gguf", shapes, True)
    q5_1 = sum(table[n]["Q5_1"][1] for n in shapes)
    out = tmp_path / "mixed"
    assert main(["tune", str(tiny_model), "--out", str(out), "--target", "gguf", "--size-mb", str(q5_1 / 1e6),
                 *TUNE]) == 0
    log = json.loads((out / "tuning_log.json").read_text())["allocation"]
    assert log["nbytes"] <= q5_1 and log["measured"] <= log["uniform_kl"] == min(log["uniform_kls"].values())
    assert set(log["uniform_kls"]) == {"Q4_0", "Q4_1", "Q5_0", "Q5_1"}  # every uniform type that fits
    ckpt = read_checkpoint(out)
    export_gguf(ckpt, tmp_path / "m.gguf", progress=False)
    weights, types = read_gguf_weights(tmp_path / "m.gguf", ModelConfig.from_hf(ckpt.hf_config))
    assert {n: types[n + ".weight"] for n in shapes} == log["choices"]  # each layer written as chosen
    assert sum(weights.tensors[n + ".weight"].n_bytes for n in shapes) == log["nbytes"]
    assert (out / "allocation.png").stat().st_size > 1000
    assert not out.with_name("mixed.progress").exists()


def test_tune_for_onnx_under_avg_bits_writes_the_chosen_bits_and_blocks(tiny_model, tmp_path):
    out = tmp_path / "mixed"
    assert main(["tune", str(tiny_model), "--out", str(out), "--target", "onnx", "--avg-bits", "4.0", *TUNE]) == 0
    log = json.loads((out / "tuning_log.json").read_text())["allocation"]
    assert 8 * log["nbytes"] / log["n_weights"] <= 4.0
    ckpt = read_checkpoint(out)
    got = {n: f"W{qw.bits}G{qw.group_size}" for n, qw in ckpt.qweights.items() if n.startswith("model.layers.")}
    assert got == log["choices"]
    export_onnx(ckpt, tmp_path / "onnx", max_block=128, progress=False)
    assert initializer_bytes(tmp_path / "onnx") == log["nbytes"]


def test_bad_budgets_are_clear_errors(tiny_model, tmp_path, capsys):
    args = ["tune", str(tiny_model), "--out", str(tmp_path / "x"), *TUNE]
    assert main(args + ["--target", "gguf", "--avg-bits", "2.0"]) == 2
    assert "--avg-bits 2.0) is below the smallest file" in capsys.readouterr().err
    assert main(args + ["--target", "onnx", "--size-mb", "5"]) == 2
    assert "at or above the largest file" in capsys.readouterr().err
    assert main(args + ["--avg-bits", "4"]) == 2
    assert "--target None: a budget counts the bytes of one file" in capsys.readouterr().err
    assert main(args + ["--target", "onnx"]) == 2
    assert "give the budget" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_target_no_choice_reaches_is_refused(tmp_path, capsys):
    from conftest import write_tiny_model

    model = write_tiny_model(tmp_path / "m", hidden=48, intermediate=96)  # rows of 48: no GGUF block fits
    assert main(["tune", str(model), "--out", str(tmp_path / "x"), "--target", "gguf", "--avg-bits", "6", *TUNE]) == 2
    assert "no GGUF type holds model.layers.0.self_attn.q_proj" in capsys.readouterr().err


def test_tune_with_an_allocation_file(tiny_model, tmp_path, capsys):
    names = block_linear_names(load_float_model(tiny_model)[0])
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"bits": {n: (8 if "down_proj" in n else 2) for n in names}}))
    out = tmp_path / "c"
    base = ["tune", str(tiny_model), "--iters", "0", "--group-size", "32", "--quiet"]
    assert main(base + ["--out", str(out), "--allocation", str(alloc)]) == 0
    bits = {n: qw.bits for n, qw in read_checkpoint(out).qweights.items()}
    assert bits == {n: (8 if "down_proj" in n else 2) for n in names}

    alloc.write_text(json.dumps({"bits": {"model.layers.99.mlp.up_proj": 4}}))
    assert main(base + ["--out", str(tmp_path / "d"), "--allocation", str(alloc)]) == 2
    assert "not decoder-block linears of this model" in capsys.readouterr().err
    alloc.write_text("{not json")
    assert main(base + ["--out", str(tmp_path / "d"), "--allocation", str(alloc)]) == 2
    assert "expected a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_budget_and_an_allocation_together_are_refused(tiny_model, tmp_path, capsys):
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"bits": {}}))
    args = ["tune", str(tiny_model), "--out", str(tmp_path / "x"), "--iters", "0", "--target", "onnx",
            "--avg-bits", "3", "--allocation", str(alloc), "--quiet"]
    assert main(args) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
