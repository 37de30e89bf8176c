"""Mixed precision: the bit allocation solver, the importance measures and `tune --avg-bits`."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

from signround_export.checkpoint.read import read_checkpoint
from signround_export.cli import main
from signround_export.model.load import load_float_model
from signround_export.tune.allocate import depth_allocation, lagrangian_bound, layer_file_bits, solve
from signround_export.model.forward import block_forward
from signround_export.model.load import in_memory
from signround_export.tune.importance import MEASURES, block_linear_names, importance, rtn_error


def brute_force(cost, error, budget):
    best = math.inf
    for pick in itertools.product(range(cost.shape[1]), repeat=cost.shape[0]):
        rows = np.arange(cost.shape[0])
        if cost[rows, pick].sum() <= budget:
            best = min(best, error[rows, pick].sum())
    return best


def random_problem(rng, layers=7, choices=(2, 4, 8)):
    sizes = rng.integers(1, 20, size=layers) * 1000
    cost = np.array([[s * b + s // 16 for b in choices] for s in sizes], dtype=float)
    # errors fall with bits, by layer-dependent factors: like real importance scores
    error = np.array([[rng.uniform(0.5, 5) * 4.0 ** -(b / 2) * s for b in choices] for s in sizes])
    return list(choices), cost, error, int(sizes.sum())


@pytest.mark.parametrize("seed", range(6))
def test_solver_is_optimal_within_its_bound_and_fits_the_budget(seed):
    rng = np.random.default_rng(seed)
    choices, cost, error, n = random_problem(rng)
    avg = rng.uniform(2.5, 6)
    alloc = solve([f"l{i}" for i in range(len(cost))], choices, cost, error, n, avg)
    optimum = brute_force(cost, error, avg * n)
    assert alloc.avg_bits <= avg + 1e-12
    assert alloc.lower_bound <= optimum + 1e-9
    assert alloc.error >= optimum - 1e-9
    # the grid of 20000 units costs at most a hair of budget: the answer is the true optimum here
    assert alloc.error == pytest.approx(optimum, rel=1e-9)
    assert 0 <= alloc.gap() < 0.5


def test_lagrangian_bound_when_the_budget_does_not_bind():
    cost = np.array([[2.0, 4.0], [2.0, 4.0]])
    error = np.array([[3.0, 1.0], [5.0, 2.0]])
    assert lagrangian_bound(cost, error, budget=100.0) == pytest.approx(3.0)


def test_budget_below_the_smallest_size_is_a_clear_error():
    choices, cost, error, n = random_problem(np.random.default_rng(0))
    with pytest.raises(ValueError, match="below the smallest possible size"):
        solve([f"l{i}" for i in range(len(cost))], choices, cost, error, n, avg_bits=1.0)


@pytest.mark.parametrize("bits,group", [(2, 32), (3, 64), (4, 128), (8, -1)])
def test_layer_file_bits_counts_what_the_checkpoint_stores(tmp_path, tiny_model, bits, group):
    from conftest import rtn_checkpoint
    from safetensors.numpy import load_file

    ckpt = rtn_checkpoint(tiny_model, tmp_path / "c", bits=bits, group_size=group)
    tensors = load_file(str(ckpt / "model.safetensors"))
    for name, qw in read_checkpoint(ckpt).qweights.items():
        stored = sum(tensors[f"{name}.{t}"].nbytes * 8 for t in ("qweight", "qzeros", "scales"))
        assert layer_file_bits(*qw.shape, bits, group) == stored, name


def test_depth_baseline_raises_the_ends_first():
    names = [f"model.layers.{b}.x" for b in range(6)]
    cost = np.array([[200.0, 400.0]] * 6)
    bits = depth_allocation(names, list(range(6)), [2, 4], cost, n_weights=6 * 100, avg_bits=2.7)
    assert [bits[n] for n in names] == [4, 2, 2, 2, 2, 4]  # first and last raised: 2*400 + 4*200 = 1600 <= 1620


def whole_model_forward(model, override, ids):
    """Logits with some weights replaced, through every block in one autograd graph."""
    x = model.embed(ids)
    ropes = model.ropes(ids.shape[1])
    for i in range(model.cfg.n_layers):
        p = model.block_params(i)
        prefix = f"model.layers.{i}."
        p.update({n[len(prefix):]: t for n, t in override.items() if n.startswith(prefix)})
        x = block_forward(model.cfg, p, x, *ropes[i], window=model.cfg.window(i))
    return model.head(x)


def whole_model_importance(model, calib, choices, group_size, sym, measure, batch_size):
    """The scores as the whole model in memory gives them: every layer's errors at once, one backward of
    the whole model per batch (gradient measures) or every linear's input watched through F.linear
    (activation): what the block-by-block pass must reproduce."""
    model = in_memory(model)
    names = block_linear_names(model)
    weights = {n: model.tensors[n + ".weight"] for n in names}
    errors = {n: [rtn_error(w, b, group_size, sym) for b in choices] for n, w in weights.items()}
    batches = [calib[i : i + batch_size] for i in range(0, len(calib), batch_size)]
    scores = np.zeros((len(names), len(choices)))
    if measure == "activation":
        by_id = {id(w): n for n, w in weights.items()}
        sums = {n: torch.zeros(w.shape[1]) for n, w in weights.items()}

        class Watch(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is torch.nn.functional.linear and id(args[1]) in by_id:
                    x = args[0].detach()
                    sums[by_id[id(args[1])]] += x.reshape(-1, x.shape[-1]).float().pow(2).sum(0)
                return func(*args, **(kwargs or {}))

        with torch.no_grad(), Watch():
            for ids in batches:
                whole_model_forward(model, {}, ids)
        tokens = sum(ids.numel() for ids in batches)
        for li, n in enumerate(names):
            for j, dw in enumerate(errors[n]):
                scores[li, j] = float((dw.pow(2).sum(0) * sums[n] / tokens).sum())
        return scores
    for ids in batches:
        leaves = {n + ".weight": w.detach().requires_grad_(True) for n, w in weights.items()}
        logits = whole_model_forward(model, leaves, ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        for li, n in enumerate(names):
            for j, dw in enumerate(errors[n]):
                d = float((leaves[n + ".weight"].grad * dw).sum())
                scores[li, j] += abs(d) if measure == "gradient" else d * d
    return scores


@pytest.mark.parametrize("measure", MEASURES)
def test_block_by_block_importance_gives_the_whole_model_scores_and_allocation(tiny_model, measure):
    """The pass that holds one block at a time against the whole-model pass, on 3 batches of 2 x 32 tokens
    (the last batch a single sequence). Tolerance rel 1e-5, about 100 float32 ulps: both run the same float32
    arithmetic per block, but the split can change the order of float32 sums (the head's gradient is taken a
    sequence at a time, a linear's input moments are summed by another expression), and a score adds
    ~10^4 float32 products. Measured here: gradient and fisher bit for bit the same, activation within
    2e-7 relative."""
    model, _, _ = load_float_model(tiny_model)
    ids = torch.randint(0, model.cfg.vocab_size, (5, 32), generator=torch.Generator().manual_seed(3))
    choices = [2, 4, 8]
    names, scores = importance(model, ids, choices, 32, False, measure, batch_size=2, progress=False)
    expected = whole_model_importance(model, ids, choices, 32, False, measure, batch_size=2)
    assert names == block_linear_names(model)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=0)
    shapes = [model.tensors.shape(n + ".weight") for n in names]
    cost = np.array([[layer_file_bits(n, k, b, 32) for b in choices] for n, k in shapes])
    weights = sum(n * k for n, k in shapes)
    for avg in (3.0, 4.0, 5.0):
        got = solve(names, choices, cost, scores, weights, avg).bits
        assert got == solve(names, choices, cost, expected, weights, avg).bits
        assert len(set(got.values())) > 1  # a budget that makes the scores choose, not every layer alike


@pytest.mark.parametrize("family", ["phi3", "gemma2"])
def test_block_by_block_importance_in_fused_and_windowed_families(tmp_path, family):
    """The same equality where blocks differ most from llama's: phi3's fused qkv and gate_up linears, and
    gemma2's sandwich norms, soft caps and an 8-position window on 32-token sequences."""
    from test_gemma import gemma_model
    from test_phi3 import phi3_model

    folder = gemma_model(tmp_path / "m") if family == "gemma2" else phi3_model(tmp_path / "m")
    model, _, _ = load_float_model(folder)
    ids = torch.randint(0, model.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(4))
    for measure in MEASURES:
        scores = importance(model, ids, [2, 4, 8], 32, False, measure, batch_size=2, progress=False)[1]
        expected = whole_model_importance(model, ids, [2, 4, 8], 32, False, measure, batch_size=2)
        np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=0, err_msg=measure)


def test_gradient_importance_predicts_the_loss_change(tiny_model):
    """The first-order score of one batch is |g . dW|: check it against the real loss change of
    quantizing that one layer, on a batch where the change is small enough to be first order."""
    model, _, _ = load_float_model(tiny_model)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    names, scores = importance(model, ids, [8], 32, False, "gradient", batch_size=2, progress=False)
    name = names[0]

    def loss(override):
        logits = whole_model_forward(model, override, ids)
        return float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()))

    w = model.tensors[name + ".weight"]
    change = loss({name + ".weight": w - rtn_error(w, 8, 32, False)}) - loss({})
    assert scores[0, 0] == pytest.approx(abs(change), rel=0.2)


@pytest.mark.parametrize("measure", ["gradient", "fisher", "activation"])
def test_importance_falls_with_bits(tiny_model, measure):
    model, _, _ = load_float_model(tiny_model)
    ids = torch.randint(0, model.cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    names, scores = importance(model, ids, [2, 4, 8], 32, False, measure, batch_size=2, progress=False)
    assert names == block_linear_names(model)
    assert scores.shape == (len(names), 3)
    assert np.all(scores >= 0)
    assert np.mean(scores[:, 0] > scores[:, 1]) > 0.9 and np.mean(scores[:, 1] > scores[:, 2]) > 0.9


def test_tune_with_avg_bits_writes_per_layer_bits_within_budget(tiny_model, tmp_path):
    out = tmp_path / "mixed"
    args = ["tune", str(tiny_model), "--out", str(out), "--iters", "2", "--nsamples", "8", "--seqlen", "32",
            "--batch-size", "4", "--group-size", "32", "--avg-bits", "3.0", "--bits-choices", "2,4,8", "--quiet"]
    assert main(args) == 0
    ckpt = read_checkpoint(out)
    log = json.loads((out / "tuning_log.json").read_text())["allocation"]
    block = {n: qw for n, qw in ckpt.qweights.items() if n.startswith("model.layers.")}
    assert {n: qw.bits for n, qw in block.items()} == log["bits"]
    assert len({qw.bits for qw in block.values()}) > 1  # a real mix, not one width
    # the budget holds on what the checkpoint actually stores
    stored = sum(layer_file_bits(*qw.shape, qw.bits, 32) for qw in block.values())
    weights = sum(qw.q.size for qw in block.values())
    assert stored / weights == pytest.approx(log["avg_bits"]) and stored / weights <= 3.0
    assert (out / "allocation.png").stat().st_size > 1000
    assert not out.with_name("mixed.progress").exists()


def test_bad_mixed_flags_are_clear_errors(tiny_model, tmp_path, capsys):
    args = ["tune", str(tiny_model), "--out", str(tmp_path / "x"), "--iters", "0", "--nsamples", "4",
            "--seqlen", "32", "--group-size", "32", "--quiet"]
    assert main(args + ["--avg-bits", "1.5"]) == 2
    assert "below the smallest possible size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):
        main(args + ["--avg-bits", "3", "--bits-choices", "2,7"])
    assert "bit widths must be among" in capsys.readouterr().err


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


def test_avg_bits_and_allocation_together_are_refused(tiny_model, tmp_path, capsys):
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"bits": {}}))
    args = ["tune", str(tiny_model), "--out", str(tmp_path / "x"), "--iters", "0", "--avg-bits", "3",
            "--allocation", str(alloc), "--quiet"]
    assert main(args) == 2
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
