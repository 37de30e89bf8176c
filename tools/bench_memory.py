"""Peak memory and time of every stage on one model folder, each stage in a process of its own.

    .venv/bin/python tools/bench_memory.py MODEL WORK [--iters 2] [--nsamples 16] [--seqlen 256]
        [--[no-]clip-search]
        [--stages tune,onnx,gguf,validate] [--tokens 1024]

Runs, one `signround` process each (so that one stage's peak never hides another's; Linux keeps a
process's peak RSS across exec, hence a fresh process, not a forked one, per stage):
  tune      signround tune MODEL --out WORK/ckpt --recipe fast --iters N --nsamples N --seqlen N [--[no-]clip-search]
  onnx      signround export onnx WORK/ckpt --out WORK/onnx
  gguf      signround export gguf WORK/ckpt --out WORK/model.gguf
  validate  signround validate WORK/ckpt --onnx WORK/onnx --gguf WORK/model.gguf --tokens T --window 512
and prints, per stage, the wall time and the peak resident set size that GNU time reports, with the
sizes the issue's bound is made of (embedding, head and one block in float32, read from the headers).
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path

from common import REPO, SIGNROUND, machine

sys.path.insert(0, str(REPO))
from signround_export.model.folder import safetensors_headers  # noqa: E402

STAGES = ("tune", "onnx", "gguf", "validate")


def stage_command(stage: str, model: Path, work: Path, args) -> list[str]:
    ckpt, onnx, gguf = work / "ckpt", work / "onnx", work / "model.gguf"
    return {
        "tune": [SIGNROUND, "tune", str(model), "--out", str(ckpt), "--recipe", "fast", "--iters", str(args.iters),
                 "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
                 *([] if args.clip_search is None else ["--clip-search" if args.clip_search else "--no-clip-search"])],
        "onnx": [SIGNROUND, "export", "onnx", str(ckpt), "--out", str(onnx)],
        "gguf": [SIGNROUND, "export", "gguf", str(ckpt), "--out", str(gguf)],
        "validate": [SIGNROUND, "validate", str(ckpt), "--onnx", str(onnx), "--gguf", str(gguf),
                     "--tokens", str(args.tokens), "--window", "512"],
    }[stage]


def measure(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit status) of one command run under GNU time. validate exits 1 when an
    artifact misses a threshold (random weights give near-uniform logits, whose top-1 is noise): its
    memory still counts, so the status is reported rather than stopping the benchmark."""
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with log.open("w") as f:
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text())
    if found is None:
        raise SystemExit(f"failed ({r.returncode}) without a GNU time report: {' '.join(cmd)}; see {log}")
    return seconds, int(found.group(1)) / 1024, r.returncode


def model_sizes(model: Path) -> dict[str, float]:
    """MB in float32 of the embedding, the head (0 when tied) and the largest block, from the headers."""
    sizes: dict[str, float] = {"embedding": 0.0, "head": 0.0}
    blocks: dict[str, float] = {}
    for name, h in safetensors_headers(model).items():
        mb = 4 * math.prod(h.shape) / 2**20
        if name == "model.embed_tokens.weight":
            sizes["embedding"] = mb
        elif name == "lm_head.weight":
            sizes["head"] = mb
        elif name.startswith("model.layers."):
            block = name.split(".")[2]
            blocks[block] = blocks.get(block, 0.0) + mb
    sizes["block"] = max(blocks.values())
    sizes["blocks"] = len(blocks)
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("work", type=Path)
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                    help="tune with or without the clipping search (default: when iters > 0)")
    ap.add_argument("--tokens", type=int, default=1024, help="validate's tokens (windows of 512)")
    ap.add_argument("--stages", default=",".join(STAGES))
    args = ap.parse_args()
    stages = args.stages.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = model_sizes(args.model)
    print(f"# {args.model.name} on {machine()}, {time.strftime('%Y-%m-%d')}")
    print(f"embedding {sizes['embedding']:.0f} MB, head {sizes['head']:.0f} MB, block {sizes['block']:.0f} MB "
          f"(float32), {sizes['blocks']:.0f} blocks")
    print("| stage | seconds | peak RSS MB | exit status |\n| --- | ---: | ---: | ---: |")
    for stage in stages:
        seconds, rss, status = measure(stage_command(stage, args.model, args.work, args), args.work / f"{stage}.log")
        print(f"| {stage} | {seconds:.0f} | {rss:.0f} | {status} |", flush=True)


if __name__ == "__main__":
    main()
