"""`signround`: tune a model with SignRound, evaluate it, export it, validate the exports.

Parsing and printing only: each command calls the Python API (signround_export/__init__.py), whose
parameter names are the flags' dests. A SignroundError ends the command with its message, parameter
names turned into the flags that set them, and exit code 2.
"""

from __future__ import annotations

import argparse
import errno
import inspect
import json
import os
import re
import sys
import time
from pathlib import Path

from . import export_gguf, export_onnx, quantize, tune_memory, validate, write_report
from .atomic import atomic_file
from .data import CALIB_WINDOWS
from .errors import SignroundError
from .export.gguf.mixes import TYPES as GGUF_TYPES
from .tune.config import BATCH_ORDERS, BEST_RULES, LR_SCHEDULES, OPTIMIZERS, RECIPES
from .tune.costs import TARGETS
from .tune.parallel import DP_REDUCES
from .validation import Thresholds, folder_perplexity


def positive(kind):
    def parse(s):
        v = kind(s)
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {s}")
        return v
    return parse


def non_negative_int(s):
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {s}")
    return v


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """API parameter name (an argument's dest) -> the long flag that sets it, for error messages."""
    flags: dict[str, str] = {}
    for action in parser._actions:
        long = [o for o in action.option_strings if o.startswith("--")]
        if long:
            flags.setdefault(action.dest, long[0])
    return flags


def add_tune(sub):
    p = sub.add_parser("tune", help="quantize a model with SignRound into a checkpoint",
                       description="Quantize every decoder-block linear of MODEL with SignRound and write an "
                                   "auto-round format checkpoint to --out. A killed run resumes when started "
                                   "again with the same arguments.")
    p.add_argument("model", help="HF model folder (config.json, *.safetensors, tokenizer.json) or hub id")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder to write")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="best",
                   help="preset for iters/nsamples/seqlen/batch-size: " + "; ".join(
                       f"{k}: {', '.join(f'{a}={b}' for a, b in v.items())}" for k, v in RECIPES.items())
                   + " (default: best)")
    p.add_argument("--bits", type=int, choices=[2, 3, 4, 5, 6, 8], help="bits per weight (default: 4)")
    p.add_argument("--group-size", type=int, choices=[16, 32, 64, 128, -1],
                   help="weights per scale along the input dimension; -1 = one per row (default: 128)")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None,
                     help="symmetric: zero point fixed at 2^(bits-1)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric: a zero point per group (default)")
    p.add_argument("--gguf", type=str.upper, metavar="TYPE", choices=GGUF_TYPES,
                   help="tune every layer on the grid of the GGUF type it will be written as, so that `export gguf` "
                        "carries the tuned integers bit for bit: " + ", ".join(t.lower() for t in GGUF_TYPES)
                        + "; q2_k and the _S/_M/_L mixes follow llama.cpp's per-tensor choices (README; replaces --bits, "
                          "--group-size, --sym)")
    p.add_argument("--clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help="start each group's clipping at the factor with the least input-weighted error instead of "
                        "the full range (default: on when --iters > 0); with --iters 0, that search's result is "
                        "the checkpoint (calibration statistics, no SignRound steps)")
    p.add_argument("--iters", type=non_negative_int, help="tuning steps per block; 0 = round-to-nearest (RTN)")
    p.add_argument("--nsamples", type=positive(int), help="calibration sequences")
    p.add_argument("--seqlen", type=positive(int), help="tokens per calibration sequence")
    p.add_argument("--batch-size", type=positive(int), help="sequences per tuning step")
    p.add_argument("--lr", type=positive(float), help="learning rate (default: 1/iters, decaying linearly to 0)")
    p.add_argument("--calib", metavar="SPEC",
                   help="calibration text: a .txt file, a .jsonl file (a \"text\" field per line), `pydoc` (the "
                        "default text), or `self` (text sampled from the float model itself, data-free: loads the "
                        "whole float model; the ids are "
                        "kept in the checkpoint as calibration-self.safetensors); several, comma-separated "
                        "(a.txt,pydoc,self), share --nsamples evenly. A path with a comma is not supported "
                        "(default: Python's pydoc_data.topics)")
    p.add_argument("--calib-windows", choices=CALIB_WINDOWS, default="stream",
                   help="stream: each source is one stream of tokens cut into windows, no BOS; documents: each "
                        "document (a .jsonl line, a whole .txt, a pydoc topic) is tokenized on its own, windows "
                        "never cross a document and start with BOS where the model's tokenizer adds one "
                        "(default: stream)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--act-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="how the calibration activations are stored: bfloat16 halves their memory (three chains "
                        "of nsamples x seqlen x hidden) and changes the integers (default: float32)")
    p.add_argument("--act-device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where they are kept: auto = the tuning device, or the CPU when a GPU's free memory "
                        "would not hold them (each step's batch then moves to the GPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory the run needs, part by part, from config.json and the safetensors "
                        "headers alone, and exit (--device cuda plans for a GPU even without one)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quant-lm-head", action="store_true", help="also quantize the lm_head (round-to-nearest)")
    p.add_argument("--shard-size", default="5GB",
                   help="largest weight file of the checkpoint, e.g. 5GB, 500MB, 2GiB; larger checkpoints are split "
                        "into model-0000X-of-0000Y.safetensors with an index, as transformers does (default: 5GB)")
    mixed = p.add_argument_group("mixed precision", "each layer's grid chosen under a byte budget of the deployed file, "
                                                   "by the measured loss (README)")
    mixed.add_argument("--target", choices=TARGETS,
                       help="the file the budget counts: onnx (each layer's bits 2, 4, 8 and block 32, 64, 128; "
                            "export with --max-block 128 for these sizes) or gguf (each layer's type among those its "
                            "row width admits)")
    budget = mixed.add_mutually_exclusive_group()
    budget.add_argument("--size-mb", type=positive(float),
                        help="megabytes (10^6 bytes) of the decoder-block linears in the target file; the embedding, "
                             "norms, head and metadata come on top")
    budget.add_argument("--avg-bits", type=positive(float),
                        help="the same budget as bits per weight of those linears in the target file")
    mixed.add_argument("--probe-windows", type=positive(int), default=4,
                       help="calibration windows the allocation measures its KL on (default: 4)")
    mixed.add_argument("--allocation", type=Path,
                       help="bits per layer from a JSON file instead ({\"bits\": {layer: bits}}, the group and "
                            "symmetry of --group-size and --sym)")
    add_ablation(p)
    p.add_argument("--dp-reduce", choices=DP_REDUCES, default="sum",
                   help="under torchrun (data-parallel tuning, README): how the ranks' gradients are combined at "
                        "each step; sum: their float sum, the single-process integers in float32 (default); sign: "
                        "a majority vote of their int8 signs, a quarter of the bytes, accuracy not yet measured "
                        "(signsgd only)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_tune, flags=flag_names(p))


def add_ablation(p) -> None:
    """tune's switches of SignRound's own choices, one at a time, for measurement."""
    a = p.add_argument_group("ablation", "switch one of SignRound's choices at a time to measure it; the defaults "
                                         "are SignRound's, and with them the integers are unchanged")
    a.add_argument("--optimizer", choices=OPTIMIZERS, default="signsgd",
                   help="signsgd: lr x sign(gradient) (default); adam: torch's Adam on the same variables, schedule "
                        "and bounds (its useful --lr may differ from the default 1/iters)")
    a.add_argument("--tune-clip", action=argparse.BooleanOptionalAction, default=True,
                   help="tune the clipping factors with the rounding offsets (default); --no-tune-clip holds them at "
                        "their start (full range, or --clip-search's)")
    a.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="linear",
                   help="linear: decay to 0 (default); constant; cosine: half a period down to 0")
    a.add_argument("--patience", type=int, default=0,
                   help="stop a block after this many steps without a lower loss (default 0: run every step)")
    a.add_argument("--best", choices=BEST_RULES, default="batch",
                   help="the parameters a block keeps: batch, the lowest loss on the step's own batch (default); "
                        "last, the final ones; fixed, the lowest loss on one fixed batch of the block's samples, "
                        "measured every --eval-every steps and at the end")
    a.add_argument("--eval-every", type=int, default=10, help="steps between measurements of --best fixed (default 10)")
    a.add_argument("--batch-order", choices=BATCH_ORDERS, default="random",
                   help="random: batches cut from random permutations of the samples (default); strata: one sample "
                        "from each of --batch-size contiguous strata per batch, which splits every batch evenly over "
                        "torchrun's ranks (--nsamples a multiple of --batch-size)")


def cmd_tune(args) -> int:
    if args.dry_run:  # under torchrun: each rank's part, printed once
        plan = call_api(tune_memory, args)
        if os.environ.get("RANK", "0") == "0":
            print(plan.table())
        return 0
    result = call_api(quantize, args)
    if not result.written:  # a rank other than 0 of a parallel run: rank 0 reports
        return 0
    if not args.quiet:
        print(result.summary(), file=sys.stderr)
    print(f"wrote {args.out}")
    return 0


def call_api(fn, args, **settings):
    """fn with every parameter the parsed arguments hold (dests are the API's parameter names), then
    `settings`; progress unless --quiet, where fn takes it."""
    params = inspect.signature(fn).parameters
    given = {name: value for name, value in vars(args).items() if name in params}
    progress = {"progress": not args.quiet} if "progress" in params else {}
    return fn(**(given | progress | settings))


def add_eval(sub):
    p = sub.add_parser("eval", help="perplexity of a float model or of a checkpoint's PyTorch reference",
                       description="Perplexity over non-overlapping windows, no BOS added, the first --windows "
                                   "windows. A checkpoint is evaluated through weights dequantized from its integers.")
    p.add_argument("model", help="HF model folder or quantized checkpoint folder")
    p.add_argument("--text", type=Path, help="evaluation text (default: the held-out slice of the default "
                                            "calibration text)")
    p.add_argument("--window", type=positive(int), default=512)
    p.add_argument("--windows", type=positive(int), default=40, help="number of windows (default: 40)")
    p.add_argument("--json", type=Path, help="also write the result as JSON here")
    add_no_verify(p, "a checkpoint's tensors")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval, flags=flag_names(p))


def add_no_verify(p, what: str) -> None:
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help=f"read {what} without checking them against the sha256 digests written with them "
                        "(checked by default; files written by other tools carry none and are read either way)")


def cmd_eval(args) -> int:
    t0 = time.perf_counter()
    result, kind = folder_perplexity(args.model, args.text, window=args.window, max_windows=args.windows,
                                     progress=not args.quiet, verify=args.verify)
    source = str(args.text) if args.text else "held-out pydoc_data.topics"
    print(f"perplexity {result.ppl:.4f}  ({kind}; {source}; {result.protocol()}; {time.perf_counter() - t0:.0f} s)")
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(result.to_dict() | {"model": str(args.model), "kind": kind, "text": source},
                                      indent=2) + "\n")
    return 0


def add_validate(sub):
    p = sub.add_parser("validate", help="prove a deployed file's accuracy against the checkpoint's reference",
                       description="Run the checkpoint's PyTorch reference, the float source model when present, and "
                                   "each artifact over the same tokens; report perplexity, top-1 agreement and KL; "
                                   "exit 1 when an artifact misses a threshold.")
    p.add_argument("checkpoint", help="quantized checkpoint folder")
    p.add_argument("--onnx", type=Path, help="exported ONNX folder")
    p.add_argument("--gguf", type=Path, help="exported GGUF file")
    p.add_argument("--float", dest="float_model", type=Path,
                   help="float source model (default: the one the tuning log names, when present)")
    p.add_argument("--text", type=Path, help="evaluation text (default: the held-out slice of pydoc_data.topics)")
    p.add_argument("--tokens", type=positive(int), default=2048, help="tokens to run (default: 2048)")
    p.add_argument("--window", type=positive(int), default=512)
    t = Thresholds()
    p.add_argument("--max-kl", type=positive(float), default=t.max_kl, help=f"mean KL limit (default {t.max_kl})")
    p.add_argument("--min-top1", type=positive(float), default=t.min_top1,
                   help=f"least top-1 agreement with the reference (default {t.min_top1})")
    p.add_argument("--max-ppl-increase", type=positive(float), default=t.max_ppl_increase,
                   help=f"largest relative perplexity increase over the reference (default {t.max_ppl_increase})")
    p.add_argument("--gguf-runner", choices=["auto", "llama.cpp", "numpy"], default="auto",
                   help="run the GGUF in llama.cpp (auto: when installed) or as numpy-dequantized weights")
    p.add_argument("--report", type=Path, help="report folder (default: CHECKPOINT.validation next to it)")
    add_no_verify(p, "the checkpoint's tensors, the ONNX folder's files and the GGUF file's tensors")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_validate, flags=flag_names(p))


def cmd_validate(args) -> int:
    thresholds = Thresholds(max_kl=args.max_kl, min_top1=args.min_top1, max_ppl_increase=args.max_ppl_increase)
    result = validate(args.checkpoint, onnx=args.onnx, gguf=args.gguf, float_model=args.float_model, text=args.text,
                      tokens=args.tokens, window=args.window, thresholds=thresholds, gguf_runner=args.gguf_runner,
                      progress=not args.quiet, verify=args.verify)
    folder = Path(args.checkpoint)
    report = args.report or folder.with_name(folder.name + ".validation")
    written = write_report(result, report)
    print(result.markdown())
    print("wrote " + ", ".join(str(p) for p in written))
    for failure in result.failures():
        print(f"signround validate: FAILED {failure}", file=sys.stderr)
    return 0 if result.passed else 1


def add_export(sub):
    p = sub.add_parser("export", help="turn a checkpoint into a deployable file",
                       description="Export a quantized checkpoint (or a float model, rounded to nearest first).")
    kinds = p.add_subparsers(dest="kind", required=True)
    o = kinds.add_parser("onnx", help="an ONNX folder for onnxruntime (and onnxruntime-genai)",
                         description="Write DIR with model.onnx (MatMulNBits weights repacked exactly from the "
                                     "checkpoint's integers, fused GroupQueryAttention), genai_config.json and the "
                                     "tokenizer files. A float model is first rounded to nearest with "
                                     "--bits/--group-size/--asym (--bits 16: kept float).")
    o.add_argument("source", type=Path, help="quantized checkpoint folder, or a float HF model folder")
    o.add_argument("--out", required=True, type=Path, help="folder to write")
    o.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=4,
                   help="MatMulNBits accuracy level: 4 quantizes activations to int8 per block, the fast CPU path; "
                        "0 computes in float32 and matches the PyTorch reference to ~1e-6 (default: 4)")
    o.add_argument("--lm-head-bits", type=int, choices=[4, 8, 16], default=None,
                   help="round a float lm_head to nearest at 4 or 8 bits (group 32, symmetric): a float head over "
                        "a large vocabulary dominates decode time on small models; 16 or unset keeps the "
                        "checkpoint's head (its integers when it quantized the head)")
    o.add_argument("--max-block", type=int, choices=[16, 32, 64, 128, 256], default=32,
                   help="largest MatMulNBits block: a larger group rides in blocks of this size with its scale "
                        "repeated (exact). At accuracy level 4 activations are quantized per block, so 32 is more "
                        "accurate than the group itself (measured: KL 2.5e-3 against 7.7e-3 at group 128, same "
                        "speed) for a slightly larger file; 256 keeps one block per group (default: 32)")
    add_rtn_args(o)
    add_no_verify(o, "a checkpoint's tensors")
    o.add_argument("--quiet", action="store_true")
    o.set_defaults(func=cmd_export_onnx, flags=flag_names(o))
    g = kinds.add_parser("gguf", help="a GGUF file for llama.cpp",
                         description="Write a GGUF file for llama.cpp from SOURCE. A checkpoint's integers go into "
                                     "the smallest legacy block type that holds them exactly (4-bit symmetric and "
                                     "2/3-bit: Q4_0, 4-bit asymmetric: Q5_0, 8-bit: Q8_0); anything inexact is "
                                     "reported with its error. A float model is first rounded to nearest with "
                                     "--bits/--group-size/--asym (--bits 16: kept float).")
    g.add_argument("source", type=Path, help="quantized checkpoint folder, or a float HF model folder")
    g.add_argument("--out", required=True, type=Path, help="GGUF file to write")
    g.add_argument("--asym4", choices=["q5_0", "q4_1"], default="q5_0",
                   help="carrier of 4-bit asymmetric layers: q5_0 is exact (5.5 bits per weight), q4_1 is smaller "
                        "(5.0) with the zero point rounded into a float16 offset (default: q5_0)")
    g.add_argument("--type", dest="gguf_type", choices=["exact", "q4_k"], default="exact",
                   help="exact: the legacy types that hold the integers exactly (default); q4_k: Q4_K for layers "
                        "of up to 4 bits whose rows are a multiple of 256 (smaller, 4.5 bits per weight; not exact: "
                        "the scales are re-quantized to 6 bits, and the error is reported)")
    g.add_argument("--float-type", choices=["f16", "f32", "q8_0"], default="f16",
                   help="type of float matrices such as the embedding (default: f16; q8_0 rounds them to "
                        "8 bits, a quarter of the file for small models)")
    g.add_argument("--tokenizer-pre", dest="tokenizer_pre_name",
                   help="llama.cpp pre-tokenizer name of a byte-level BPE (default: recognised from the "
                        "vocabulary or its split regex)")
    add_rtn_args(g)
    add_no_verify(g, "a checkpoint's tensors")
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_export_gguf, flags=flag_names(g))


def add_rtn_args(p):
    rtn = p.add_argument_group("float source", "round-to-nearest settings when SOURCE is a float model")
    rtn.add_argument("--bits", type=int, choices=[2, 3, 4, 5, 6, 8, 16], default=4,
                     help="16: no rounding, every weight stays float (F16 GGUF, float32 ONNX) (default: 4)")
    rtn.add_argument("--group-size", type=int, choices=[32, 64, 128, -1], default=32)
    rtn.add_argument("--asym", dest="sym", action="store_false", help="a zero point per group (default: symmetric)")
    p.set_defaults(sym=True)


def cmd_export_onnx(args) -> int:
    print(call_api(export_onnx, args, lm_head_bits=None if args.lm_head_bits == 16 else args.lm_head_bits))
    return 0


def cmd_export_gguf(args) -> int:
    print(call_api(export_gguf, args, kquant=args.gguf_type == "q4_k").summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="signround", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    add_tune(sub)
    add_eval(sub)
    add_export(sub)
    add_validate(sub)
    return ap


def flagged(message: str, param: str | None, flags: dict[str, str]) -> str:
    """The message in the command line's words: every `name` in backquotes that is a parameter with a
    flag becomes the flag; when none names the error's parameter, so does the first bare word that
    does (a message names its parameter first; later the same word may mean something else)."""
    out = re.sub(r"`(\w+)`", lambda m: flags.get(m[1], m[0]), message)
    if param in flags and f"`{param}`" not in message:
        out = re.sub(rf"(?<![\w./-]){re.escape(param)}(?![\w/-]|\.\w)", flags[param], out, count=1)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SignroundError as e:
        print(f"signround {args.command}: error: {flagged(str(e), e.param, args.flags)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"signround {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # the disk, not the input: outputs are written atomically, so nothing is left half-made
        where = f" ({e.filename})" if e.filename else ""
        hint = OS_HINTS.get(e.errno, "")
        print(f"signround {args.command}: error: {e.strerror or e}{where}; nothing was written{hint}", file=sys.stderr)
        return 1


OS_HINTS = {errno.ENOSPC: ": free space on that disk, or write the output elsewhere",
            errno.EDQUOT: ": free space within your quota, or write the output elsewhere",
            errno.EACCES: ": write the output to a folder you may write to",
            errno.EROFS: ": write the output to a writable disk"}


if __name__ == "__main__":
    sys.exit(main())
