"""signround-export vs auto-round on identical settings, in one run: tuning time and perplexity.

    .venv/bin/python tools/bench_vs_autoround.py --ar-python /tmp/ar-venv/bin/python \
        [--bits 4 --group-size 64 --asym --iters 200 --nsamples 64 --seqlen 512 --batch-size 8] \
        [--compile both|on|off] [--amp off|on]

auto-round lives in a throwaway venv, never in the project's: for example
    python3 -m venv /tmp/ar-venv && /tmp/ar-venv/bin/pip install torch==2.13.0 && \
        /tmp/ar-venv/bin/pip install auto-round==0.16.1
Both tools get the very same calibration token windows (chosen here, saved as .npy), the same
threads (torch's default, every core), and their checkpoints are evaluated by the same
`signround eval` (auto-round's output is read by our auto-round format reader) on
../shared/data/wikitext-2/valid.txt, 40 windows of 512 tokens, no BOS.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import MODEL, REPO, SIGNROUND, evaluate, machine, run


def autoround_worker(a) -> None:
    """Runs inside the auto-round venv: tune with auto-round on the given token windows and save."""
    import numpy as np
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = np.load(a.calib_ids)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    calib = [torch.from_numpy(row[None].astype(np.int64)) for row in ids]
    t0 = time.perf_counter()
    settings = dict(bits=a.bits, group_size=a.group_size, sym=a.sym, iters=a.iters, nsamples=len(calib),
                    seqlen=ids.shape[1], batch_size=a.batch_size, device_map="cpu", seed=a.seed,
                    enable_torch_compile=a.compile == "on", amp=a.amp == "on")
    # keywords given by the caller (a benchmark arm's lr, iters, ...) win over the scheme's
    ar = AutoRound(model, tokenizer=tok, dataset=calib, **(settings | json.loads(a.ar_kwargs)))
    if a.ar_packing == "gptq":
        # auto-round's auto_round format packs 4-bit asymmetric weights as AWQ, which cannot hold a short last
        # group (SmolLM2's 576 inputs in groups of 128); with no AWQ backend it packs them in its own GPTQ
        # layout, zero points as they are ("auto_round"), which has room for one
        from auto_round.export.formats.backends import autoround as formats

        formats.AutoAWQFormat = lambda *args, **kwargs: None
    ar.quantize_and_save(a.out, format="auto_round")
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def tune_autoround(ar_python: str, model: Path, calib_file: Path, out: Path, scheme: list[str], compile_: str,
                   amp: str, kwargs: dict | None = None, packing: str = "auto") -> float:
    """Tune with auto-round in its venv (this script's worker mode) on the saved token windows, into out.
    scheme: the worker's --bits .. --seed flags; kwargs: more AutoRound keywords; packing: auto
    (auto-round's choice for its auto_round format) or gptq (its own GPTQ layout even where it would
    choose AWQ). Returns the seconds the worker measured around tuning and saving."""
    out = run([ar_python, __file__, "--worker", "--model", str(model), "--calib-ids", str(calib_file),
               "--out", str(out), "--compile", compile_, "--amp", amp, "--ar-kwargs", json.dumps(kwargs or {}),
               "--ar-packing", packing, *scheme])
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def find_checkpoint(folder: Path) -> Path:
    """auto-round saves into a subfolder named after the scheme."""
    hits = [p.parent for p in folder.rglob("config.json")]
    if len(hits) != 1:
        raise SystemExit(f"expected one checkpoint under {folder}, found {hits}")
    return hits[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ar-python", default="/tmp/ar-venv/bin/python")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--sym", action="store_true")
    ap.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--compile", choices=["on", "off", "both"], default="both")
    ap.add_argument("--amp", choices=["on", "off"], default="off")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "bench-vs-autoround")
    # worker mode, inside the auto-round venv
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--calib-ids", help=argparse.SUPPRESS)
    ap.add_argument("--ar-kwargs", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--ar-packing", choices=["auto", "gptq"], default="auto", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return autoround_worker(a)

    import numpy as np

    from signround_export.data import calibration_samples, default_calibration_text, encode, load_tokenizer

    a.out.mkdir(parents=True, exist_ok=True)
    ids = calibration_samples(encode(load_tokenizer(a.model), default_calibration_text()), a.nsamples, a.seqlen,
                              a.seed)
    calib_file = a.out / "calib_ids.npy"
    np.save(calib_file, ids.numpy())
    scheme = ["--bits", str(a.bits), "--group-size", str(a.group_size), "--sym" if a.sym else "--asym",
              "--iters", str(a.iters), "--batch-size", str(a.batch_size), "--seed", str(a.seed)]
    results = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": " ".join(sys.argv), "settings": vars(a) | {
        "out": str(a.out), "model": str(a.model)}, "runs": {}}

    ours = a.out / "signround"
    t0 = time.perf_counter()
    run([SIGNROUND, "tune", str(a.model), "--out", str(ours), "--quiet",
         "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), *scheme])
    results["runs"]["signround-export"] = {"seconds": round(time.perf_counter() - t0, 1),
                                           "ppl": evaluate(ours, a.out / "signround.json", a.windows)}
    print(json.dumps(results["runs"]), flush=True)

    for compile_ in (["on", "off"] if a.compile == "both" else [a.compile]):
        name = f"auto-round compile={compile_} amp={a.amp}"
        folder = a.out / f"autoround-compile-{compile_}"
        t0 = time.perf_counter()
        tuned = tune_autoround(a.ar_python, a.model, calib_file, folder, scheme, compile_, a.amp)
        results["runs"][name] = {"seconds": round(time.perf_counter() - t0, 1), "tune_seconds": round(tuned, 1),
                                 "ppl": evaluate(find_checkpoint(folder), a.out / f"{folder.name}.json", a.windows)}
        print(json.dumps(results["runs"]), flush=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
