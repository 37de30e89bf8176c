"""Mixed precision vs uniform bits vs a depth-only heuristic, at equal checkpoint size, on the default model.

    .venv/bin/python tools/bench_mixed.py [--budgets 2.5,3.0,4.0] [--iters 0|--recipe fast]
        [--importance fisher,gradient,activation] [--bits-choices 2,4,8] [--group-size 128]

For each budget (average file bits per weight of the decoder-block linears, scales and zero points
counted as the checkpoint stores them):
  mixed-<measure>  `signround tune --avg-bits B --importance <measure>`
  depth            the same widths, whole blocks raised from the ends inwards (allocate.depth_allocation)
  uniform          the uniform width (2, 3, 4 or 8) whose size is nearest the budget
Every checkpoint is scored with `signround eval` on ../shared/data/wikitext-2/valid.txt (40 windows of
512 tokens, no BOS). Prints a Markdown table; writes every figure to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from common import MODEL, REPO, SIGNROUND, evaluate, machine, run

sys.path.insert(0, str(REPO))
from signround_export.model.config import ModelConfig  # noqa: E402
from signround_export.tune.allocate import depth_allocation, layer_file_bits  # noqa: E402


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    h, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    out_in = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f),
              "self_attn.qkv_proj": (q + 2 * kv, h), "mlp.gate_up_proj": (2 * f, h)}
    linears = cfg.family.linears
    assert set(linears) <= set(out_in)
    return {f"model.layers.{i}.{n}": out_in[n] for i in range(cfg.n_layers) for n in linears}


def file_bpw(shapes, bits: dict[str, int], group: int) -> float:
    return sum(layer_file_bits(n, k, bits[name], group) for name, (n, k) in shapes.items()) / \
        sum(n * k for n, k in shapes.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="2.5,3.0,4.0")
    ap.add_argument("--importance", default="fisher")
    ap.add_argument("--bits-choices", default="2,4,8")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--iters", type=int, help="override the recipe's iters (0: round to nearest, a quick comparison)")
    ap.add_argument("--methods", default="mixed,depth,uniform")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-mixed")
    ap.add_argument("--model", type=Path, default=MODEL)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_hf(json.loads((args.model / "config.json").read_text()))
    shapes = linear_shapes(cfg)
    names = list(shapes)
    choices = [int(b) for b in args.bits_choices.split(",")]
    common = ["--recipe", args.recipe, "--group-size", str(args.group_size), "--asym", "--quiet"]
    if args.iters is not None:
        common += ["--iters", str(args.iters)]
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"rows": []}
    results |= {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
                "machine": machine()}
    done = {(r["budget"], r["method"]) for r in results["rows"]}

    def measure(budget: float, method: str, flags: list[str]) -> None:
        if (budget, method) in done:
            return
        ckpt = args.out / f"{method}-{budget}"
        t0 = time.perf_counter()
        run([SIGNROUND, "tune", str(args.model), "--out", str(ckpt), *common, *flags])
        seconds = time.perf_counter() - t0
        from signround_export.checkpoint.read import read_checkpoint

        bits = {n: qw.bits for n, qw in read_checkpoint(ckpt).qweights.items() if n in shapes}
        row = {"budget": budget, "method": method, "bpw": round(file_bpw(shapes, bits, args.group_size), 4),
               "ppl": evaluate(ckpt, args.out / f"{method}-{budget}.json", args.windows),
               "tune_seconds": round(seconds, 1),
               "bits_count": {str(b): sum(1 for x in bits.values() if x == b) for b in sorted(set(bits.values()))}}
        results["rows"].append(row)
        results_file.write_text(json.dumps(results, indent=2))
        print(f"| {budget} | {method} | {row['bpw']:.3f} | {row['ppl']:.3f} | {row['bits_count']} |", flush=True)

    methods = args.methods.split(",")
    print("| budget | method | file bpw | perplexity | layers per width |\n| --- | --- | --- | --- | --- |")
    for budget in [float(b) for b in args.budgets.split(",")]:
        if "mixed" in methods:
            for imp in args.importance.split(","):
                measure(budget, f"mixed-{imp}", ["--avg-bits", str(budget), "--importance", imp,
                                                 "--bits-choices", args.bits_choices])
        if "depth" in methods:
            cost = np.array([[layer_file_bits(n, k, b, args.group_size) for b in choices] for n, k in shapes.values()])
            block_of = [int(name.split(".")[2]) for name in names]
            depth = depth_allocation(names, block_of, choices, cost, sum(n * k for n, k in shapes.values()), budget)
            alloc = args.out / f"depth-{budget}.allocation.json"
            alloc.write_text(json.dumps({"bits": depth}))
            measure(budget, "depth", ["--allocation", str(alloc)])
        if "uniform" in methods:
            sizes = {b: file_bpw(shapes, dict.fromkeys(names, b), args.group_size) for b in (2, 3, 4, 8)}
            nearest = min(sizes, key=lambda b: abs(sizes[b] - budget))
            measure(budget, f"uniform-w{nearest}", ["--bits", str(nearest)])


if __name__ == "__main__":
    main()
