"""RTN vs SignRound on the default model: perplexity, tuning time and peak RSS per scheme.

    .venv/bin/python tools/bench_tune.py [--recipe fast] [--schemes W4G128a,W4G128s,W4G32s,W3G128a,W2G64a]

Each tuning run is its own `signround tune` process (so its peak RSS is its own), evaluated with
`signround eval` on ../shared/data/wikitext-2/valid.txt (40 windows of 512 tokens, no BOS).
Prints a Markdown table and writes every figure to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from common import MODEL, REPO, SIGNROUND, evaluate, machine, run

SCHEMES = "W4G128a,W4G128s,W4G32s,W3G128a,W2G64a"


def parse_scheme(s: str) -> list[str]:
    m = re.fullmatch(r"W(\d)G(-?\d+)([as])", s)
    if not m:
        raise SystemExit(f"bad scheme {s!r}: expected e.g. W4G128a (a = asymmetric, s = symmetric)")
    return ["--bits", m[1], "--group-size", m[2], "--sym" if m[3] == "s" else "--asym"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--schemes", default=SCHEMES)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-tune")
    ap.add_argument("--model", type=Path, default=MODEL)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    signround = SIGNROUND
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "recipe": args.recipe, "command": " ".join(sys.argv), "rows": []}
    results["float_ppl"] = evaluate(args.model, args.out / "float.json", args.windows)
    for scheme in args.schemes.split(","):
        row = {"scheme": scheme}
        for method, iters in (("rtn", ["--iters", "0"]), ("signround", [])):
            ckpt = args.out / f"{scheme}-{method}"
            t0 = time.perf_counter()
            run([signround, "tune", str(args.model), "--out", str(ckpt), "--recipe", args.recipe, "--quiet",
                 *parse_scheme(scheme), *iters])
            log = json.loads((ckpt / "tuning_log.json").read_text())
            row[method] = {"ppl": evaluate(ckpt, args.out / f"{scheme}-{method}.json", args.windows),
                           "tune_seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": log["peak_rss_mb"]}
        results["rows"].append(row)
        (args.out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"| {scheme} | {row['rtn']['ppl']:.3f} | {row['signround']['ppl']:.3f} | "
              f"{row['signround']['tune_seconds']:.0f} | {row['signround']['peak_rss_mb']:.0f} |", flush=True)
    print(f"float perplexity {results['float_ppl']:.3f}")


if __name__ == "__main__":
    main()
