"""Data-parallel SignRound (torchrun): what the ranks send per step, how far that lets it scale, and its
overhead on this machine.

    .venv/bin/python tools/bench_parallel.py traffic [--steps 200 --batch-size 8 --seqlen 2048 --gpu-tflops 400]
    .venv/bin/python tools/bench_parallel.py time [--rounds 2 --iters 10 --nsamples 16]

traffic: for SmolLM2 (the model folder's config), Llama-3.1-8B and -70B (tools/configs), W4G128: the
elements a step reduces (every rounding offset V and both clipping factors of a block's linears), the
bytes one rank puts into a step's reduction (parallel.step_bytes: float32 sum, or int8 signs), per block
of --steps steps, and what one reduction costs against the compute of one step. A ring all-reduce moves
2 (N - 1) / N times the buffer through each rank's link; the step's compute is its matmul FLOPs
(tools/bench_step.py's count: forward, weight and input gradients, attention) over --gpu-tflops, split
over N ranks. The batch order is the single process's (the same samples at every step); with tune's
default --batch-order random a rank's share of a batch is uneven: the busiest rank's share, averaged
over steps, is measured here by drawing the batches tune draws (signround.batch_order over nsamples,
contiguous shares); --batch-order strata gives every rank an even share. Efficiency at N ranks =
time of one rank's step / (N x (the busiest rank's compute + the reduction)).

time: 2 ranks x 1 thread (torchrun, gloo) against 1 process x 2 threads, same settings, alternating
rounds; each run's tuning time is the tuning log's (model loading excluded). On 2 cores this measures
the cost of splitting and communicating, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench_step import step_matmul_flops
from common import MODEL, REPO, SIGNROUND, machine

from signround_export.model.config import ModelConfig
from signround_export.model.shapes import DIMENSIONS, LINEAR_SHAPES
from signround_export.tune.config import BATCH_ORDERS
from signround_export.tune.parallel import step_bytes
from signround_export.tune.signround import batch_order

CONFIGS = {"SmolLM2-135M": MODEL / "config.json", "Llama-3.1-8B": REPO / "tools/configs/llama-3.1-8b.json",
           "Llama-3.1-70B": REPO / "tools/configs/llama-3.1-70b.json"}
# Links, bytes per second each way per GPU: NVLink 4 (H100 SXM, 18 links), PCIe 4.0 x16 as transfers reach
# it, 25 Gb Ethernet between machines
LINKS = {"NVLink": 450e9, "PCIe 4.0 x16": 25e9, "25 GbE": 25e9 / 8}
RANKS = (2, 4, 8)


def tuned_elements(cfg: ModelConfig, group: int) -> int:
    """The tensors a step reduces, one block: V (padded to whole groups) and 2 clipping factors per group."""
    total = 0
    for module in cfg.family.linears:
        rows, cols = (DIMENSIONS[d][0](cfg) for d in LINEAR_SHAPES[module])
        groups = -(-cols // group)
        total += rows * groups * (group + 2)
    return total


def busiest_share(nsamples: int, batch: int, ranks: int, steps: int = 2000, seed: int = 0,
                  order: str = "random") -> float:
    """The busiest rank's samples per batch, averaged over steps, over the even share batch / ranks, with
    tune's batch order `order`."""
    m, order = nsamples // ranks, batch_order(torch.Generator().manual_seed(seed), nsamples, batch, order)
    most = [torch.bincount(next(order) // m, minlength=ranks).max().item() for _ in range(steps)]
    return statistics.mean(most) / (batch / ranks)


def traffic(a) -> str:
    lines = [f"W4G128, {a.steps} steps per block, batch {a.batch_size} x {a.seqlen} tokens, {a.nsamples} samples; "
             f"compute at {a.gpu_tflops:g} TFLOP/s per GPU", "",
             "| model | elements per step | sum: bytes per step | sign: bytes per step | sum: per block | "
             "sign: per block | step compute on 1 GPU |", "| --- | --- | --- | --- | --- | --- | --- |"]
    rows = []
    for name, path in CONFIGS.items():
        cfg = ModelConfig.from_hf(json.loads(path.read_text()))
        numel = tuned_elements(cfg, 128)
        sent = step_bytes(numel, 2)
        compute = step_matmul_flops(cfg, a.batch_size * a.seqlen, a.seqlen) / (a.gpu_tflops * 1e12)
        lines.append(f"| {name} | {numel:,} | {sent['sum'] / 1e6:,.1f} MB | {sent['sign'] / 1e6:,.1f} MB | "
                     f"{sent['sum'] * a.steps / 1e9:,.2f} GB | {sent['sign'] * a.steps / 1e9:,.2f} GB | "
                     f"{compute * 1e3:,.1f} ms |")
        rows.append((name, numel, compute))
    share = {n: busiest_share(a.nsamples, a.batch_size, n, order=a.batch_order) for n in RANKS}
    lines += ["", f"The busiest rank's share of a batch over the even share (batch order {a.batch_order}): "
              + ", ".join(f"{n} ranks {s:.2f}x" for n, s in share.items()), "",
              "Efficiency (speed-up / ranks) at 2, 4, 8 ranks; a reduction's time in brackets:", "",
              "| model | link | reduce | " + " | ".join(f"{n} ranks" for n in RANKS) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in RANKS) + " |"]
    for name, numel, compute in rows:
        for link, rate in LINKS.items():
            for reduce in ("sum", "sign"):
                cells = []
                for n in RANKS:
                    comm = 2 * (n - 1) / n * step_bytes(numel, n)[reduce] / rate
                    step = compute / n * share[n] + comm
                    cells.append(f"{compute / (n * step):.0%} ({comm * 1e3:,.1f} ms)")
                lines.append(f"| {name} | {link} | {reduce} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tune_seconds(cmd: list[str], out: Path, env: dict) -> float:
    subprocess.run(cmd + ["--out", str(out), "--quiet"], check=True, env=env)
    return json.loads((out / "tuning_log.json").read_text())["seconds"]


def timing(a) -> str:
    flags = ["--iters", str(a.iters), "--nsamples", str(a.nsamples), "--batch-size", str(a.batch_size),
             "--seqlen", "512", "--bits", "4", "--group-size", "128", "--asym", "--batch-order", a.batch_order]
    runs = {"1 process x 2 threads": ([SIGNROUND, "tune", str(MODEL), *flags], {"OMP_NUM_THREADS": "2"}),
            "2 ranks x 1 thread": ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                    "-m", "signround_export", "tune", str(MODEL), *flags], {"OMP_NUM_THREADS": "1"})}
    times: dict[str, list[float]] = {k: [] for k in runs}
    (REPO / "out").mkdir(exist_ok=True)  # a fresh clone has none
    with tempfile.TemporaryDirectory(dir=REPO / "out") as tmp:
        for r in range(a.rounds):
            for k, (cmd, env) in (runs.items() if r % 2 == 0 else reversed(runs.items())):
                seconds = tune_seconds(cmd, Path(tmp) / f"{len(times[k])}-{k[0]}", os.environ | env)
                times[k].append(seconds)
                print(f"round {r}: {k}: {seconds:.1f} s", flush=True)
    base = statistics.median(times["1 process x 2 threads"])
    return "\n".join([f"{machine()}; SmolLM2, {' '.join(flags)}; {a.rounds} alternating rounds", "",
                      "| run | tuning seconds (median) | runs | vs 1 process |", "| --- | --- | --- | --- |"]
                     + [f"| {k} | {statistics.median(v):.1f} | {', '.join(f'{t:.1f}' for t in v)} | "
                        f"{statistics.median(v) / base:.2f}x |" for k, v in times.items()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("what", choices=["traffic", "time"])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=2048, help="traffic: tokens per sample")
    ap.add_argument("--nsamples", type=int, default=None, help="default: 128 (traffic), 16 (time)")
    ap.add_argument("--gpu-tflops", type=float, default=400.0,
                    help="bf16 matmul rate one GPU sustains (H100 SXM: 989 peak dense)")
    ap.add_argument("--iters", type=int, default=10, help="time: steps per block")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-order", choices=BATCH_ORDERS, default=BATCH_ORDERS[0],
                    help="tune's --batch-order: random splits batches unevenly over the ranks, strata evenly")
    a = ap.parse_args()
    a.nsamples = a.nsamples or (128 if a.what == "traffic" else 16)
    print(traffic(a) if a.what == "traffic" else timing(a))


if __name__ == "__main__":
    main()
