"""What tuning a real-size model of each family costs on this machine: seconds per block and peak RSS.

    .venv/bin/python tools/bench_families.py [--families llama3.2-1b,qwen3-0.6b,phi4-mini,gemma3-1b]
        [--layers 2] [--iters 4] [--nsamples 8] [--seqlen 256] [--batch-size 4]

Each model is the real config of a published checkpoint (hidden size, heads, vocabulary, rope, ...)
with only `--layers` blocks and random bfloat16 weights, written shard by shard by
tools/random_model.py: no real weights are downloaded, and building it never holds a float32 copy.
The tokenizer is the default model's (its ids fit every vocabulary here). Each run is
one `signround tune` process; its tuning_log.json gives the seconds of every block and the peak RSS.
A block's time does not depend on the weights' values, so the figures say what tuning the real model
costs: seconds per block x its layer count, at these settings.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from common import REPO, SIGNROUND, machine, run

# The configs of the published checkpoints (their config.json), every key the forward reads.
CONFIGS = {
    "llama3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256, rms_norm_eps=1e-5,
        rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)),
    "qwen3-0.6b": dict(
        model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True),
    "phi4-mini": dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, vocab_size=200064, rms_norm_eps=1e-5,
        rope_theta=10000.0, partial_rotary_factor=0.75, max_position_embeddings=131072,
        original_max_position_embeddings=4096, tie_word_embeddings=True, sliding_window=262144,
        rope_scaling=dict(rope_type="longrope", short_factor=[1.0] * 48, long_factor=[1.5] * 48)),
    "gemma3-1b": dict(
        model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
        num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, query_pre_attn_scalar=256, sliding_window=512,
        sliding_window_pattern=6, max_position_embeddings=32768, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh"),
}


def bench(name: str, args) -> dict:
    folder, config = args.out / name, args.out / f"{name}.json"
    shutil.rmtree(folder, ignore_errors=True)
    config.write_text(json.dumps(CONFIGS[name]))
    # in a process of its own: Linux keeps a process's peak RSS across exec, so a model written here
    # would count in every later tuning run's peak
    run([sys.executable, str(REPO / "tools" / "random_model.py"), str(config), str(folder), "--layers",
         str(args.layers)])
    ckpt = args.out / f"{name}-ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    t0 = time.perf_counter()
    run([SIGNROUND, "tune", str(folder), "--out", str(ckpt), "--iters", str(args.iters), "--nsamples",
         str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size),
         "--bits", "4", "--group-size", "128", "--quiet"])
    wall = time.perf_counter() - t0
    log = json.loads((ckpt / "tuning_log.json").read_text())
    block_seconds = [b["seconds"] for b in log["blocks"]]
    per_block = sum(block_seconds) / len(block_seconds)
    real_layers = CONFIGS[name]["num_hidden_layers"]
    return {"family": name, "model_type": CONFIGS[name]["model_type"], "layers": args.layers,
            "real_layers": real_layers, "block_seconds": block_seconds, "seconds_per_block": round(per_block, 2),
            "seconds_per_step": round(per_block / max(args.iters, 1), 3),
            "whole_model_seconds": round(per_block * real_layers, 1), "peak_rss_mb": log["peak_rss_mb"],
            "wall_seconds": round(wall, 1), "dtype": log["compute_dtype"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(CONFIGS))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--iters", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-families")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    unknown = [f for f in args.families.split(",") if f not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown families {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": " ".join(sys.argv), "rows": []}
    print(f"{results['machine']}\n| model | layers run | s / block | s / step | whole model, these settings (s) "
          "| peak RSS (MB) | dtype |\n| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for name in args.families.split(","):
        row = bench(name, args)
        results["rows"].append(row)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"| {name} ({row['model_type']}) | {row['layers']} of {row['real_layers']} | "
              f"{row['seconds_per_block']:.1f} | {row['seconds_per_step']:.2f} | {row['whole_model_seconds']:.0f} | "
              f"{row['peak_rss_mb']:.0f} | {row['dtype']} |", flush=True)


if __name__ == "__main__":
    main()
