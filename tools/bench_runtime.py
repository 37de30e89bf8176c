"""CPU speed of our ONNX export through the runtime against llama.cpp, measured side by side.

    .venv/bin/python tools/bench_runtime.py --onnx out/bench-speed/w4-onnx --onnx out/bench-speed/fp32-onnx \
        --gguf out/bench-gguf/llama-q4_0.gguf [--prompt 512] [--new 128] [--threads 2] [--rounds 3]

Each measurement is a fresh process (so peak RSS is its own): load the model, prefill a --prompt-token
prompt, then decode --new tokens greedily without stopping. Rounds alternate the models (A B C, A B C,
...) so drift on a shared machine hits all of them; the table gives medians and ratios to the first
--gguf file. The decode roofline is the bytes of weights one token reads (every matrix once; the
embedding only one row) over this machine's memory bandwidth, measured here with numpy reading a
1 GiB array from one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import TEXT, machine

ONNX_RUN = """
import json, resource, sys, time
from signround_runtime import Model
folder, n_prompt, n_new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter()
m = Model(folder, threads=threads)
load = time.perf_counter() - t
ids = m.encode(open(sys.argv[5]).read()[:20000])[:n_prompt]
g = m.generate([ids], max_new_tokens=n_new + 1, stop_ids=set())
print(json.dumps({"load_s": load, "prefill_tps": len(ids) / g.prefill_seconds,
                  "decode_tps": g.decode_steps / g.decode_seconds,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

GGUF_RUN = """
import json, resource, sys, time
import llama_cpp
path, n_prompt, n_new, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
t = time.perf_counter()
llm = llama_cpp.Llama(path, n_ctx=n_prompt + n_new + 8, n_batch=n_prompt, n_threads=threads, verbose=False)
load = time.perf_counter() - t
ids = llm.tokenize(open(sys.argv[5]).read()[:20000].encode(), add_bos=False)[:n_prompt]
t0 = time.perf_counter()
count = 0
for tok in llm.generate(ids, temp=0.0, top_k=1):
    count += 1
    if count == 1:
        t1 = time.perf_counter()
    if count == n_new + 1:
        break
t2 = time.perf_counter()
print(json.dumps({"load_s": load, "prefill_tps": len(ids) / (t1 - t0), "decode_tps": n_new / (t2 - t1),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(kind: str, path: Path, args) -> dict:
    code = ONNX_RUN if kind == "onnx" else GGUF_RUN
    out = subprocess.run([sys.executable, "-c", code, str(path), str(args.prompt), str(args.new), str(args.threads),
                          str(TEXT)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bandwidth_gbs() -> float:
    import numpy as np

    a = np.ones(2**27, dtype=np.float64)  # 1 GiB
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t) / 1e9)
    return best


def weight_bytes_per_token(kind: str, path: Path) -> int:
    """Bytes of weights one decode step reads: every initializer/tensor except the embedding table,
    of which one row is read (a tied head is read in full, as the head)."""
    if kind == "gguf":
        from gguf import GGUFReader

        tensors = GGUFReader(str(path)).tensors
        names = {t.name for t in tensors}
        total = 0
        for t in tensors:
            if t.name == "token_embd.weight" and "output.weight" in names:
                total += int(t.n_bytes) // int(t.shape[-1])  # one row
            else:
                total += int(t.n_bytes)
        return total
    import onnx

    model = onnx.load(str(path / "model.onnx"), load_external_data=False)
    skip = {"cos_cache", "sin_cache"}
    gemm_inputs = {i for n in model.graph.node if n.op_type in ("Gemm", "MatMulNBits", "MatMul") for i in n.input}
    total = 0
    for t in model.graph.initializer:
        if t.name in skip:
            continue
        size = len(t.raw_data)
        if t.name == "model.embed_tokens.weight" and t.name not in gemm_inputs:
            size //= t.dims[0]
        total += size
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", type=Path, action="append", default=[])
    ap.add_argument("--gguf", type=Path, action="append", default=[])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    models = [("gguf", p) for p in args.gguf] + [("onnx", p) for p in args.onnx]
    runs = {str(p): [] for _, p in models}
    for r in range(args.rounds):
        for kind, path in models:
            runs[str(path)].append(measure(kind, path, args))
            print(f"round {r + 1}: {path.name}: {runs[str(path)][-1]}", file=sys.stderr)
    bw = bandwidth_gbs()
    base = None
    rows = []
    for kind, path in models:
        med = {k: statistics.median(x[k] for x in runs[str(path)]) for k in runs[str(path)][0]}
        size = path.stat().st_size if kind == "gguf" else sum(f.stat().st_size for f in path.iterdir())
        per_token = weight_bytes_per_token(kind, path)
        roof = bw * 1e9 / per_token
        base = base or med
        rows.append({"model": str(path), "kind": kind, "MiB": size / 2**20, **med, "roofline_tps": roof,
                     "decode_vs_roofline": med["decode_tps"] / roof,
                     "prefill_ratio": med["prefill_tps"] / base["prefill_tps"],
                     "decode_ratio": med["decode_tps"] / base["decode_tps"]})
    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}, {args.threads} threads, prompt {args.prompt}, "
          f"decode {args.new}, {args.rounds} alternating rounds (medians); one-thread read bandwidth {bw:.1f} GB/s\n")
    print("| model | MiB | prefill tok/s | decode tok/s | prefill vs first | decode vs first | peak RSS MB "
          "| decode roofline tok/s | of roofline |\n" + "| --- " * 9 + "|")
    for r in rows:
        print(f"| {Path(r['model']).name} | {r['MiB']:.1f} | {r['prefill_tps']:.1f} | {r['decode_tps']:.1f} | "
              f"{r['prefill_ratio']:.2f}x | {r['decode_ratio']:.2f}x | {r['peak_rss_mb']:.0f} | "
              f"{r['roofline_tps']:.0f} | {100 * r['decode_vs_roofline']:.0f}% |")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "bandwidth_gbs": bw, "rows": rows, "args": vars(args) | {
            "onnx": [str(p) for p in args.onnx], "gguf": [str(p) for p in args.gguf], "json": str(args.json)}},
            indent=2))


if __name__ == "__main__":
    main()
