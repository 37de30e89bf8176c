"""Our GGUF files against llama.cpp's own quantizer, perplexity computed by llama.cpp on the same text.

    .venv/bin/python tools/bench_gguf.py --ckpt out/bench-tune/W4G32s-signround [--ckpt ...] \
        [--windows 40] [--types q4_0,q4_1,q5_0,q4_k_m] [--out out/bench-gguf]

1. An F16 GGUF of the float model (`signround export gguf MODEL --bits 16`).
2. llama.cpp's quantizer (llama_model_quantize, through llama-cpp-python) turns it into each --types.
3. Each --ckpt is exported by us (`signround export gguf --float-type q8_0`; asymmetric 4-bit once as
   exact Q5_0 and once as Q4_1).
4. Every file runs in llama.cpp over the same windows of ../shared/data/wikitext-2/valid.txt (512
   tokens, no BOS): perplexity, and bits per weight = file bytes * 8 / parameters.
Prints a Markdown table; writes every figure to OUT/results.json (a rerun skips files already scored).

--llama-bin DIR adds llama.cpp's importance-matrix variants: DIR holds the llama-imatrix and
llama-quantize programs (built from the llama.cpp sources inside the llama-cpp-python sdist, see
docs/benchmarks.md); the matrix comes from the F16 file over our default calibration text, and
llama-quantize applies it to each --imatrix-types.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import MODEL, TEXT, machine  # noqa: E402

from signround_export.checkpoint.read import read_checkpoint  # noqa: E402
from signround_export.data import default_calibration_text, encode, load_tokenizer, read_text  # noqa: E402
from signround_export.export.gguf import export_gguf  # noqa: E402
from signround_export.model.load import float_checkpoint  # noqa: E402
from signround_export.validation.metrics import Accumulator  # noqa: E402
from signround_export.validation.metrics import windows as cut_windows  # noqa: E402
from signround_export.validation.runners import llama_cpp_runner  # noqa: E402


def llama_quantize(src: Path, dst: Path, type_name: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name.upper()}")
    params.nthread = 2
    tmp = dst.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize {type_name} failed")
    tmp.rename(dst)


def imatrix_files(bin_dir: Path, f16: Path, out: Path, types: list[str], chunks: int) -> dict[str, Path]:
    """llama-quantize with an importance matrix computed by llama-imatrix over the calibration text."""
    matrix = out / "imatrix.gguf"
    if not matrix.is_file():
        calib = out / "calibration.txt"
        calib.write_text(default_calibration_text())
        subprocess.run([str(bin_dir / "llama-imatrix"), "-m", str(f16), "-f", str(calib), "-o", str(matrix),
                        "-c", "512", "--chunks", str(chunks), "-t", "2"], check=True, capture_output=True)
    files = {}
    for t in types:
        dst = out / f"llama-{t}-imatrix.gguf"
        if not dst.is_file():
            subprocess.run([str(bin_dir / "llama-quantize"), "--imatrix", str(matrix), str(f16), str(dst), t.upper(),
                            "2"], check=True, capture_output=True)
        files[f"llama-quantize {t.upper()} + imatrix"] = dst
    return files


def perplexity(path: Path, w) -> float:
    runner = llama_cpp_runner(path, w.shape[1])
    acc = Accumulator()
    for ids, logits in zip(w, runner.logits(w)):
        acc.add(ids, logits, None)
    return acc.scores(False).ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--ckpt", type=Path, action="append", default=[], help="our checkpoints to export (repeatable)")
    ap.add_argument("--types", default="q4_0,q4_1,q5_0,q4_k_m", help="llama-quantize types of the F16 file")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-gguf")
    ap.add_argument("--llama-bin", type=Path, help="folder with llama-imatrix and llama-quantize (see above)")
    ap.add_argument("--imatrix-types", default="q4_0,q4_k_m", help="types quantized with the importance matrix")
    ap.add_argument("--imatrix-chunks", type=int, default=32, help="512-token chunks of calibration text")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    f16 = args.out / "f16.gguf"
    if not f16.is_file():
        export_gguf(float_checkpoint(args.model), f16, float_type="F16")
    files = {"F16 (float model)": f16}
    for t in args.types.split(","):
        dst = args.out / f"llama-{t}.gguf"
        if not dst.is_file():
            llama_quantize(f16, dst, t)
        files[f"llama-quantize {t.upper()}"] = dst
    if args.llama_bin:
        files |= imatrix_files(args.llama_bin, f16, args.out, args.imatrix_types.split(","), args.imatrix_chunks)
    for ckpt_dir in args.ckpt:
        ckpt = read_checkpoint(ckpt_dir)
        variants = ["Q5_0", "Q4_1"] if not ckpt.quant.sym and ckpt.quant.bits == 4 else ["Q5_0"]
        for asym4 in variants:
            dst = args.out / f"ours-{ckpt_dir.name}-{asym4.lower()}.gguf"
            if not dst.is_file():
                report = export_gguf(ckpt, dst, asym4=asym4, float_type="Q8_0")
                print(report.summary())
            files[f"ours {ckpt_dir.name} ({report_type(dst)})"] = dst

    from gguf import GGUFReader

    params = sum(int(t.n_elements) for t in GGUFReader(str(f16)).tensors)
    w = cut_windows(encode(load_tokenizer(args.model), read_text(TEXT)), 512, args.windows)
    for name, path in files.items():
        key = f"{name}|{args.windows}"
        if key not in results:
            t0 = time.perf_counter()
            results[key] = {"file": str(path), "ppl": perplexity(path, w), "bytes": path.stat().st_size,
                            "bpw": path.stat().st_size * 8 / params, "seconds": round(time.perf_counter() - t0, 1)}
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            print(f"{name}: ppl {results[key]['ppl']:.4f}", file=sys.stderr)

    import llama_cpp

    print(f"\n{time.strftime('%Y-%m-%d')}, {machine()}, llama-cpp-python {llama_cpp.__version__}; "
          f"{args.windows} windows of 512 tokens of {TEXT.name}, no BOS; {params} parameters\n")
    print("| file | MiB | bits/weight | perplexity (llama.cpp) |\n| --- | --- | --- | --- |")
    for name, path in files.items():
        r = results[f"{name}|{args.windows}"]
        print(f"| {name} | {r['bytes'] / 2**20:.1f} | {r['bpw']:.3f} | {r['ppl']:.4f} |")


def report_type(path: Path) -> str:
    """The block types of the decoder-block matrices, most common first (e.g. "Q4_0 + Q3_K")."""
    from collections import Counter

    from gguf import GGUFReader

    types = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors
                    if t.name.startswith("blk.") and len(t.shape) == 2)
    return " + ".join(t for t, _ in types.most_common()) or "?"


if __name__ == "__main__":
    main()
