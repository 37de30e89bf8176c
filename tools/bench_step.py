"""How close one SignRound tuning step runs to this machine's plain matmul throughput.

    .venv/bin/python tools/bench_step.py [--batch-size 8] [--seqlen 512] [--steps 10]

Times (1) a plain matmul at the block's shapes in float32 and bfloat16, and (2) full tuning steps
(fake-quantize, forward, backward, signed update) on block 0 of the default model, then reports the
step's matmul FLOPs (forward + weight gradients + input gradients, counted per layer) over its time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from signround_export.checkpoint.qweight import Scheme
from signround_export.model.forward import block_forward
from signround_export.model.load import load_float_model
from signround_export.tune.signround import BlockTuner

MODEL = Path(__file__).resolve().parents[1] / "models" / "smollm2-135m-instruct"


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    model, _, _ = load_float_model(MODEL)
    cfg = model.cfg
    tokens = args.batch_size * args.seqlen
    for dtype in (torch.float32, torch.bfloat16):
        g = matmul_gflops(tokens, cfg.hidden_size, cfg.intermediate_size, dtype)
        print(f"plain matmul [{tokens}x{cfg.hidden_size}] x [{cfg.hidden_size}x{cfg.intermediate_size}] "
              f"{str(dtype)[6:]}: {g:.1f} GFLOP/s")
    peak = matmul_gflops(tokens, cfg.hidden_size, cfg.intermediate_size, torch.float32)

    p = model.block_params(0)
    tuner = BlockTuner(p, {n[: -len(".weight")]: Scheme(args.bits, args.group_size, False)
                           for n in p if n.endswith("proj.weight")}, "cpu")
    x = torch.randn(args.batch_size, args.seqlen, cfg.hidden_size)
    y = torch.randn_like(x)
    rope = model.ropes(args.seqlen)[0]

    def step():
        loss = F.mse_loss(block_forward(cfg, tuner.weights(), x, *rope), y)
        loss.backward()
        tuner.step(0.005)

    step()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - t) / args.steps
    flops = step_matmul_flops(cfg, tokens, args.seqlen)
    print(f"tuning step: {seconds * 1000:.0f} ms, {flops / 1e9:.1f} GFLOP of matmuls -> {flops / seconds / 1e9:.1f} "
          f"GFLOP/s = {flops / seconds / 1e9 / peak:.2f} of the plain float32 matmul rate")


if __name__ == "__main__":
    main()
