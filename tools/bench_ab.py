"""Two ONNX exports of one model side by side in one process: the speed ratio of a graph change.

    .venv/bin/python tools/bench_ab.py A_FOLDER B_FOLDER [--threads 1,2] [--prompt 256] [--new 64] [--rounds 16]

Both folders are loaded in this process and timed through the neutral harness's calls (bench_runtime.py:
the runtime's own step, the cache bound once per run, only prefill and each decode step timed), the
same prompt ids, alternating A B, B A, ... for --rounds rounds per thread count, so that the machine's
drift falls on both alike. Prints each side's median prefill and decode tokens/s and the medians' ratio
B / A, and whether both decoded the same greedy tokens (a graph change that should not change the
arithmetic must give the same tokens).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import bench_runtime as br


def rounds(folders: dict[str, Path], ids: list[int], new: int, threads: int, n: int) -> dict[str, list[dict]]:
    calls = {k: br.ours(br.Job("ours", str(p), ids, new, threads)) for k, p in folders.items()}
    for c in calls.values():
        br.timed_run(c, ids, br.WARMUP_STEPS)
    runs: dict[str, list[dict]] = {k: [] for k in folders}
    for r in range(n):
        for k in (folders if r % 2 == 0 else reversed(list(folders))):
            runs[k].append(br.timed_run(calls[k], ids, new))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--threads", type=br.int_list, default=[1, 2])
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens (from --text, as the neutral harness)")
    ap.add_argument("--new", type=int, default=64, help="greedy tokens decoded after the prompt")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--text", type=Path, default=br.TEXT)
    a = ap.parse_args()
    ids = br.prompt_ids(a.a, a.text, a.prompt)
    print(f"A {a.a}\nB {a.b}\n{a.prompt}-token prompt, {a.new} decoded tokens, {a.rounds} alternating rounds; "
          f"{br.machine()}")
    print("| threads | A prefill tok/s | B prefill tok/s | B / A | A decode tok/s | B decode tok/s | B / A | same tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for threads in a.threads:
        runs = rounds({"A": a.a, "B": a.b}, ids, a.new, threads, a.rounds)
        med = {k: (statistics.median(a.prompt / r["prefill_s"] for r in v),
                   statistics.median(a.new / r["decode_s"] for r in v)) for k, v in runs.items()}
        same = all(x["tokens"] == runs["A"][0]["tokens"] for v in runs.values() for x in v)
        print(f"| {threads} | {med['A'][0]:.1f} | {med['B'][0]:.1f} | {med['B'][0] / med['A'][0]:.3f} | "
              f"{med['A'][1]:.1f} | {med['B'][1]:.1f} | {med['B'][1] / med['A'][1]:.3f} | {'yes' if same else 'NO'} |",
              flush=True)


if __name__ == "__main__":
    main()
