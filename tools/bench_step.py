"""How close one SignRound tuning step runs to this machine's plain matmul throughput (the roofline).

    .venv/bin/python tools/bench_step.py [--batch-size 8] [--seqlen 512 2048] [--steps 10] [--profile] [--rounding 20]

For each sequence length: times (1) a plain matmul at the block's shapes in float32 and in the tuning
dtype (bfloat16 where oneDNN has native bf16, as `tune` picks), and (2) full tuning steps as tune_block
runs them (signround.block_loss: fake-quantize, forward in the tuning dtype, MSE; backward; signed
update) on block 3 of the default model. Reports the step's matmul FLOPs (forward + weight gradients +
input gradients, counted per layer, attention included) over its time, and the step's time over the
time those FLOPs take at the plain matmul rate. --profile adds the share of a step per kind of work
(torch profiler: matmuls, attention, everything else). --rounding N times N steps that keep the
rounding's graph through the step against N that recompute it in the backward pass (BlockTuner.recompute),
alternated, on the tuning dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from signround_export.checkpoint.qweight import Scheme
from signround_export.model.load import load_float_model
from signround_export.tune.signround import BlockTuner, block_loss, pick_dtype

MODEL = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"
BLOCK = 3
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_weight_int8pack_mm"}


def matmul_gflops(m: int, k: int, n: int, dtype, reps: int = 5) -> float:
    """Best of `reps` timings: the machine is shared, so the fastest run is the machine's rate."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k, dtype=dtype)
    F.linear(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        F.linear(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def step_matmul_flops(cfg, tokens: int, seqlen: int) -> float:
    """Forward, weight-gradient and input-gradient matmuls of one step. q/k/v need no input gradient:
    their input is the normalized block input, which is data, not a parameter's function."""
    h, d, kv, f = cfg.hidden_size, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_size
    qkv, rest = h * (d + 2 * kv), d * h + 3 * h * f
    linear = 2 * tokens * (3 * rest + 2 * qkv)
    attention = 3 * 2 * 2 * tokens * seqlen * d / 2  # QK^T and AV, causal half, forward + 2 backward
    return linear + attention


def kind(op: str) -> str:
    if op in MATMUL_OPS:
        return "matmul"
    if "attention" in op or "sdpa" in op or "flash" in op:
        return "attention"
    return "other"


def profile_step(step) -> dict[str, float]:
    """Share of a step's self CPU time per kind of work (one profiled step after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    totals: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        totals[kind(e.key)] += e.self_cpu_time_total
    whole = sum(totals.values())
    return {k: v / whole for k, v in sorted(totals.items())}


def step_fn(model, dtype, batch: int, seqlen: int, bits: int, group: int, recompute: bool | None = None):
    """One tuning step of block BLOCK on fixed random activations, and its tuner. recompute: force the
    rounding's recomputation in the backward pass on or off (None: as tune chooses for the block)."""
    cfg = model.cfg
    p = model.block_params(BLOCK)
    tuner = BlockTuner(p, {n: Scheme(bits, group, False) for n in cfg.family.linears}, "cpu")
    if recompute is not None:
        tuner.recompute = recompute
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seqlen, cfg.hidden_size, generator=g)
    y = torch.randn(batch, seqlen, cfg.hidden_size, generator=g)
    rope = model.ropes(seqlen)[BLOCK]

    def step():
        loss = block_loss(cfg, tuner, x, y, rope, cfg.window(BLOCK), dtype)
        loss.backward()
        tuner.step(0.005)

    return step, tuner


def compare_rounding(model, dtype, batch: int, seqlen: int, rounds: int, bits: int, group: int) -> str:
    """The step with the rounding kept through it against the step that recomputes it in the backward
    pass, alternated step by step; the parameters of both must stay equal."""
    arms = {name: step_fn(model, dtype, batch, seqlen, bits, group, recompute=name == "recomputed")
            for name in ("kept", "recomputed")}
    times: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(rounds + 1):
        for name in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            t = time.perf_counter()
            arms[name][0]()
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    kept, recomputed = (statistics.median(times[n]) for n in arms)
    same = all(torch.equal(a, b) for a, b in zip(arms["kept"][1].tensors(), arms["recomputed"][1].tensors()))
    return (f"rounding kept {kept * 1000:.0f} ms, recomputed {recomputed * 1000:.0f} ms (medians of {rounds}, "
            f"alternated): kept / recomputed {kept / recomputed:.3f}; parameters equal after {rounds + 1} steps: {same}")


def time_step(model, dtype, batch: int, seqlen: int, steps: int, bits: int, group: int, profile: bool):
    step, _ = step_fn(model, dtype, batch, seqlen, bits, group)
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - t) / steps
    return seconds, (profile_step(step) if profile else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, nargs="+", default=[512])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--rounding", type=int, metavar="ROUNDS",
                    help="also time ROUNDS steps with the rounding kept against as many recomputing it, alternated")
    args = ap.parse_args()
    model, _, _ = load_float_model(MODEL)
    cfg = model.cfg
    tuning = pick_dtype(torch.device("cpu"))
    for seqlen in args.seqlen:
        tokens = args.batch_size * seqlen
        flops = step_matmul_flops(cfg, tokens, seqlen)
        print(f"--- batch {args.batch_size} x {seqlen} tokens, {flops / 1e9:.1f} GFLOP of matmuls per step")
        for dtype in dict.fromkeys((torch.float32, tuning)):
            rate = matmul_gflops(tokens, cfg.hidden_size, cfg.intermediate_size, dtype)
            seconds, shares = time_step(model, dtype, args.batch_size, seqlen, args.steps, args.bits,
                                        args.group_size, args.profile)
            roof = flops / (rate * 1e9)
            print(f"{str(dtype)[6:]:>9}: plain matmul {rate:.1f} GFLOP/s; step {seconds * 1000:.0f} ms = "
                  f"{flops / seconds / 1e9:.1f} GFLOP/s; {seconds / roof:.2f}x the time of its matmuls at the plain rate"
                  + ("" if shares is None else "; " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items())))
        if args.rounding:
            print(f"{str(tuning)[6:]:>9}: " + compare_rounding(model, tuning, args.batch_size, seqlen, args.rounding,
                                                                args.bits, args.group_size))


if __name__ == "__main__":
    main()
