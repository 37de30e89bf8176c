"""Perplexity against the deployed file's size: uniform choices, and mixed allocations between them.

    .venv/bin/python tools/bench_mixed.py --target gguf|onnx [--recipe fast | --iters 0] \
        [--uniform q4_0,q4_1,q5_0,q5_1,q8_0] [--between 1 | --budgets-mb 62.5,...] [--probe-windows 4] \
        [--seqlen 256] [--windows 40] [--out out/bench-mixed-gguf]

Every point is tuned with the same recipe (`--iters 0`: round to nearest):
  uniform  GGUF `signround tune --gguf T`; ONNX `--bits B --group-size G` (labels like w4g64)
  mixed    `signround tune --target T --size-mb M`, M spread evenly between each pair of neighbouring
           uniform sizes (--between points per gap), M counting the decoder-block linears' bytes in the file
and scored on ../shared/data/wikitext-2/valid.txt (--windows windows of 512 tokens, no BOS):
  GGUF     the file (`export gguf --float-type q8_0`) through llama.cpp (tools/bench_gguf.py's scoring)
  ONNX     the checkpoint's PyTorch reference (`signround eval`), which ONNX validation matches at
           accuracy level 0; the file (`export onnx --max-block 128`) gives the size
Writes OUT/results.json (a rerun skips points already scored), OUT/ppl-vs-mb.png, and prints a Markdown
table; each mixed checkpoint holds its allocation.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import MODEL, REPO, SIGNROUND, TEXT, evaluate, machine, run

sys.path.insert(0, str(REPO))
from signround_export.model.load import load_float_model  # noqa: E402
from signround_export.plots import pyplot, save_png  # noqa: E402
from signround_export.tune.allocate import Allocation  # noqa: E402
from signround_export.tune.costs import cost_table  # noqa: E402
from signround_export.tune.pipeline import linear_shapes  # noqa: E402

UNIFORM = {"gguf": "q4_0,q4_1,q5_0,q5_1,q8_0", "onnx": "w2g64,w4g128,w4g32,w8g32"}


def uniform_flags(target: str, label: str) -> list[str]:
    if target == "gguf":
        return ["--gguf", label]
    bits, group = label[1:].split("g")
    return ["--bits", bits, "--group-size", group, "--asym"]


def score(target: str, model: Path, ckpt: Path, out: Path, windows: int) -> dict:
    """The deployed file's bytes and the perplexity of the point."""
    if target == "gguf":
        from bench_gguf import perplexity

        from signround_export.data import encode, load_tokenizer, read_text
        from signround_export.validation.metrics import windows as cut_windows

        path = out / f"{ckpt.name}.gguf"
        run([SIGNROUND, "export", "gguf", str(ckpt), "--out", str(path), "--float-type", "q8_0", "--quiet"])
        w = cut_windows(encode(load_tokenizer(model), read_text(TEXT)), 512, windows)
        return {"file_bytes": path.stat().st_size, "ppl": perplexity(path, w), "scored_by": "llama.cpp"}
    folder = out / f"{ckpt.name}-onnx"
    run([SIGNROUND, "export", "onnx", str(ckpt), "--out", str(folder), "--max-block", "128", "--quiet"])
    size = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
    return {"file_bytes": size, "ppl": evaluate(ckpt, out / f"{ckpt.name}.eval.json", windows),
            "scored_by": "reference (signround eval)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=["gguf", "onnx"], required=True)
    ap.add_argument("--uniform", help="the uniform points (default: GGUF " + UNIFORM["gguf"] + "; ONNX "
                                      + UNIFORM["onnx"] + ")")
    ap.add_argument("--between", type=int, default=1, help="mixed points in each gap between uniform sizes")
    ap.add_argument("--budgets-mb", help="the mixed points' --size-mb instead, comma-separated")
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--iters", type=int, help="override the recipe's iters (0: round to nearest)")
    ap.add_argument("--seqlen", type=int, help="override the recipe's calibration window length")
    ap.add_argument("--probe-windows", type=int, default=4, help="windows the allocation measures its KL on")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--model", type=Path, default=MODEL)
    args = ap.parse_args()
    out = args.out or REPO / "out" / f"bench-mixed-{args.target}"
    out.mkdir(parents=True, exist_ok=True)
    common = ["--recipe", args.recipe, "--quiet"]
    common += ["--iters", str(args.iters)] if args.iters is not None else []
    common += ["--seqlen", str(args.seqlen)] if args.seqlen is not None else []
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"points": {}}
    results |= {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
                "machine": machine(), "windows": args.windows}

    shapes = linear_shapes(load_float_model(args.model)[0])
    table = cost_table(args.target, shapes, sym=args.target == "gguf")
    uniform = (args.uniform or UNIFORM[args.target]).split(",")
    linears = {u: sum(table[n][u.upper()][1] for n in shapes) for u in uniform}
    uniform.sort(key=linears.get)

    def point(name: str, kind: str, flags: list[str]) -> None:
        if name in results["points"]:
            return
        ckpt = out / name
        t0 = time.perf_counter()
        if not ckpt.is_dir():
            run([SIGNROUND, "tune", str(args.model), "--out", str(ckpt), *common, *flags])
        tuned = time.perf_counter() - t0
        row = {"kind": kind, "flags": flags, "tune_seconds": round(tuned, 1)} | score(args.target, args.model, ckpt, out,
                                                                                       args.windows)
        log = json.loads((ckpt / "tuning_log.json").read_text()).get("allocation")
        if log:
            row |= {k: log[k] for k in ("nbytes", "uniform", "uniform_kl", "predicted", "knapsack_kl", "measured",
                                        "lower_bound", "moves", "evaluations")}
            row["counts"] = Allocation.from_json(log).counts()
        else:
            row["nbytes"] = linears[name]
        results["points"][name] = row
        results_file.write_text(json.dumps(results, indent=2))
        print(f"{name}: {row['file_bytes'] / 1e6:.2f} MB, ppl {row['ppl']:.4f}", file=sys.stderr, flush=True)

    for u in uniform:
        point(u, "uniform", uniform_flags(args.target, u))
    budgets = [float(b) for b in args.budgets_mb.split(",")] if args.budgets_mb else [
        (linears[lo] + (linears[hi] - linears[lo]) * i / (args.between + 1)) / 1e6
        for lo, hi in zip(uniform, uniform[1:]) for i in range(1, args.between + 1)]
    for mb in budgets:
        point(f"mixed-{mb:.2f}mb", "mixed", ["--target", args.target, "--size-mb", f"{mb:.2f}",
                                             "--probe-windows", str(args.probe_windows)])
    print(f"\n{results['date']}, {results['machine']}; {args.windows} windows of 512 tokens of {TEXT.name}, no BOS; "
          f"linears: the decoder-block linears' bytes in the file\n")
    print("| point | file MB | linears MB | perplexity | base | KL base / predicted / knapsack / final | choices |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    rows = sorted(results["points"].items(), key=lambda kv: kv[1]["file_bytes"])
    for name, r in rows:
        kl = (f"{r['uniform_kl']:.4f} / {r['predicted']:.4f} / {r['knapsack_kl']:.4f} / {r['measured']:.4f}"
              if r["kind"] == "mixed" else "")
        counts = ", ".join(f"{n} {c}" for c, n in r.get("counts", {}).items())
        print(f"| {name} | {r['file_bytes'] / 1e6:.2f} | {r['nbytes'] / 1e6:.2f} | {r['ppl']:.4f} | "
              f"{r.get('uniform') or ''} | {kl} | {counts} |")
    plot(rows, out / "ppl-vs-mb.png", args.target, results)


def plot(rows, path: Path, target: str, results: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    uni = [(r["file_bytes"] / 1e6, r["ppl"], n) for n, r in rows if r["kind"] == "uniform"]
    mixed = [(r["file_bytes"] / 1e6, r["ppl"]) for n, r in rows if r["kind"] == "mixed"]
    ax.plot([u[0] for u in uni], [u[1] for u in uni], "o-", label="uniform")
    for x, y, n in uni:
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if mixed:
        ax.plot([m[0] for m in mixed], [m[1] for m in mixed], "s", color="C3", label="mixed (--size-mb)")
    ax.set_xlabel(f"{target.upper()} file MB")
    ax.set_ylabel(f"perplexity, wikitext-2, {results['windows']} x 512 tokens")
    ax.set_title(f"{target.upper()}: perplexity against file size ({results['date'][:10]})", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_png(fig, path)


if __name__ == "__main__":
    main()
