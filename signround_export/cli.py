"""`signround`: tune a model with SignRound, evaluate it, export it."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from .export.gguf import mixes as gguf_mix

# Named settings for `tune`; explicit flags override them. "best" is the full default recipe.
RECIPES = {
    "best": dict(iters=200, nsamples=128, seqlen=512, batch_size=8),
    "fast": dict(iters=50, nsamples=64, seqlen=256, batch_size=4),
}


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
    p.add_argument("--gguf", type=str.upper, metavar="TYPE", choices=gguf_mix.TYPES,
                   help="tune every layer on the grid of the GGUF type it will be written as, so that `export gguf` "
                        "carries the tuned integers bit for bit: " + ", ".join(t.lower() for t in gguf_mix.TYPES)
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
    p.add_argument("--calib", type=Path, help="calibration text (.txt, or .jsonl with a \"text\" field); "
                                             "default: Python's pydoc_data.topics")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--quant-lm-head", action="store_true", help="also quantize the lm_head (round-to-nearest)")
    mixed = p.add_argument_group("mixed precision", "bits per layer chosen by importance under a size budget")
    mixed.add_argument("--avg-bits", type=positive(float),
                       help="average bits per weight of the quantized linears, counting scales and zero points as "
                            "the checkpoint stores them; the decoder-block linears get bits from --bits-choices")
    mixed.add_argument("--bits-choices", type=bits_list, default=[2, 4, 8],
                       help="bit widths a layer may get (default: 2,4,8, which ONNX MatMulNBits runs natively)")
    mixed.add_argument("--allocation", type=Path,
                       help="bits per layer from a JSON file instead ({\"bits\": {layer: bits}}, as tuning_log.json's "
                            "\"allocation\" holds them)")
    mixed.add_argument("--importance", choices=["gradient", "fisher", "activation"], default="fisher",
                       help="how a layer's quantization error is scored (default: fisher; see docs/benchmarks.md)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_tune)


def bits_list(s: str) -> list[int]:
    try:
        bits = sorted({int(b) for b in s.split(",") if b.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated bit widths like 2,4,8, got {s!r}") from None
    from .checkpoint.qweight import SUPPORTED_BITS

    if not bits or any(b not in SUPPORTED_BITS for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths must be among {','.join(map(str, SUPPORTED_BITS))}, got {s!r}")
    return bits


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
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_eval)


def checkpoint_parts(model, targs, qweights: dict):
    """The QuantConfig and float tensors that go beside the tuned integers into a checkpoint."""
    from .checkpoint.format import QuantConfig

    quantized = {n + suffix for n in qweights for suffix in (".weight", ".bias")}
    tensors = {n: t.numpy() for n, t in model.tensors.items() if n not in quantized}
    if model.cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    quant = QuantConfig(bits=targs.bits, group_size=targs.group_size, sym=targs.sym,
                        # auto_gptq's zero point minus 1 cannot hold an asymmetric layer's zero point of 0
                        packing_format="auto_round:auto_gptq" if all(q.sym for q in qweights.values()) else "auto_round",
                        extra_config={}, iters=targs.iters, tuning=asdict(targs))
    return quant, tensors


def cmd_tune(args) -> int:
    from .checkpoint.qweight import Scheme
    from .checkpoint.write import write_checkpoint
    from .data import calibration_samples, default_calibration_text, encode, load_tokenizer, read_text
    from .model.load import load_float_model
    from .tune.signround import TuneArgs, summary, tune

    recipe = dict(RECIPES[args.recipe])
    for key in recipe:
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    bits, group_size, sym = tune_scheme(args)
    targs = TuneArgs(bits=bits, group_size=group_size, sym=sym, lr=args.lr, seed=args.seed, clip_search=args.clip_search,
                     quant_lm_head=args.quant_lm_head, **recipe)
    if targs.uses_data() and targs.batch_size > targs.nsamples:
        raise ValueError(f"--batch-size {targs.batch_size} is larger than --nsamples {targs.nsamples}")
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    say(f"recipe {args.recipe}: " + ", ".join(f"{f.name}={getattr(targs, f.name)}" for f in fields(targs)))

    if args.avg_bits is not None and args.allocation is not None:
        raise ValueError("give --avg-bits (bits chosen by importance) or --allocation (bits from a file), not both")
    model, hf, folder = load_float_model(args.model)
    calib = None
    if targs.uses_data() or args.avg_bits is not None:
        tok = load_tokenizer(folder)
        text = read_text(args.calib) if args.calib else default_calibration_text()
        calib = calibration_samples(encode(tok, text), targs.nsamples, targs.seqlen, targs.seed)
    progress_dir = args.out.with_name(args.out.name + ".progress")
    allocation = None
    if args.avg_bits is not None:
        allocation = allocate_bits(model, calib, args, targs, progress_dir, say)
        targs.layer_schemes = {n: Scheme(b, group_size, sym) for n, b in allocation.bits.items()}
    elif args.allocation is not None:
        targs.layer_schemes = {n: Scheme(b, group_size, sym) for n, b in read_allocation(args.allocation, model).items()}
    elif args.gguf is not None:
        (targs.bits, targs.group_size, targs.sym, *_), targs.layer_schemes = gguf_schemes(model, args.gguf, say)
    result = tune(model, calib, targs, progress_dir=progress_dir, device=args.device, progress=not args.quiet)
    log = result.log(targs) | {"source_model": str(Path(args.model)), "recipe": args.recipe,
                               "calibration": str(args.calib) if args.calib else "pydoc_data.topics"}
    if allocation is not None:
        log["allocation"] = allocation.to_json() | {"importance": args.importance, "bits_choices": args.bits_choices}
    quant, tensors = checkpoint_parts(model, targs, result.qweights)
    write_checkpoint(args.out, hf, quant, result.qweights, tensors, tokenizer_src_dir=folder, tuning_log=log)
    if allocation is not None:
        from .plots import plot_allocation

        plot_allocation(allocation, args.out / "allocation.png")
    shutil.rmtree(progress_dir, ignore_errors=True)  # the checkpoint is whole: resume state is spent
    say(summary(result))
    print(f"wrote {args.out}")
    return 0


def tune_scheme(args) -> tuple[int, int, bool]:
    """(bits, group size, sym) from --bits/--group-size/--sym and their defaults."""
    if args.gguf is not None:
        given = [f for f, v in (("--bits", args.bits), ("--group-size", args.group_size), ("--sym/--asym", args.sym))
                 if v is not None]
        if given or (args.avg_bits or args.allocation) is not None:
            raise ValueError(f"--gguf sets every layer's bits and grid; it cannot be combined with "
                             f"{', '.join(given) or '--avg-bits or --allocation'}")
    return args.bits or 4, args.group_size or 128, bool(args.sym)


def gguf_schemes(model, gguf_type: str, say) -> tuple[tuple, dict]:
    """(the most common grid, {layer: Scheme} for every layer) for `tune --gguf`."""
    from collections import Counter
    from dataclasses import astuple

    from .tune.importance import block_linear_names

    shapes = {n: tuple(model.tensors[n + ".weight"].shape) for n in block_linear_names(model)}
    types = gguf_mix.layer_types(gguf_type, shapes, model.cfg.n_layers, model.cfg.n_heads // model.cfg.n_kv_heads)
    say(f"--gguf {gguf_type.lower()}: " + ", ".join(f"{c} layers {t}" for t, c in Counter(types.values()).most_common()))
    schemes = gguf_mix.layer_schemes(gguf_type, shapes, model.cfg.n_layers, model.cfg.n_heads // model.cfg.n_kv_heads)
    return astuple(Counter(schemes.values()).most_common(1)[0][0]), schemes


def allocate_bits(model, calib, args, targs, progress_dir: Path, say):
    """Bits per decoder-block linear under --avg-bits, kept in the progress folder so a resumed run
    tunes the same allocation."""
    import numpy as np

    from .fileio import atomic_file
    from .tune.allocate import Allocation, layer_file_bits, solve
    from .tune.importance import importance

    saved = progress_dir / "allocation.json"
    settings = {"avg_bits": args.avg_bits, "bits_choices": args.bits_choices, "importance": args.importance,
                "group_size": targs.group_size, "sym": targs.sym, "nsamples": targs.nsamples,
                "seqlen": targs.seqlen, "seed": targs.seed, "calib": str(args.calib)}
    if saved.is_file():
        record = json.loads(saved.read_text())
        if record["settings"] == settings:
            say(f"allocation read from {saved}")
            return Allocation.from_json(record["allocation"])
    names, scores = importance(model, calib, args.bits_choices, targs.group_size, targs.sym, args.importance,
                               batch_size=targs.batch_size, progress=not args.quiet)
    shapes = [tuple(model.tensors[n + ".weight"].shape) for n in names]
    cost = np.array([[layer_file_bits(n, k, b, targs.group_size) for b in args.bits_choices] for n, k in shapes])
    allocation = solve(names, args.bits_choices, cost, scores, sum(n * k for n, k in shapes), args.avg_bits)
    say(allocation.table())
    progress_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(saved) as tmp:
        tmp.write_text(json.dumps({"settings": settings, "allocation": allocation.to_json()}, indent=1))
    return allocation


def read_allocation(path: Path, model) -> dict[str, int]:
    from .checkpoint.qweight import SUPPORTED_BITS
    from .tune.importance import block_linear_names

    try:
        record = json.loads(Path(path).read_text())
        bits = record.get("allocation", record)["bits"]
        bits = {str(k): int(v) for k, v in bits.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--allocation {path}: expected a JSON object {{\"bits\": {{layer: bits}}}} ({e})") from None
    known = set(block_linear_names(model))
    unknown = sorted(set(bits) - known)
    if unknown:
        raise ValueError(f"--allocation {path}: {len(unknown)} names are not decoder-block linears of this model, "
                         f"e.g. {unknown[0]!r}")
    bad = sorted({b for b in bits.values() if b not in SUPPORTED_BITS})
    if bad:
        raise ValueError(f"--allocation {path}: bits {bad} are not among {', '.join(map(str, SUPPORTED_BITS))}")
    return bits


def cmd_eval(args) -> int:
    from .fileio import atomic_file
    from .validation import folder_perplexity

    t0 = time.perf_counter()
    result, kind = folder_perplexity(args.model, args.text, window=args.window, max_windows=args.windows,
                                     progress=not args.quiet)
    source = str(args.text) if args.text else "held-out pydoc_data.topics"
    print(f"perplexity {result.ppl:.4f}  ({kind}; {source}; {result.protocol()}; {time.perf_counter() - t0:.0f} s)")
    if args.json:
        with atomic_file(args.json) as tmp:
            tmp.write_text(json.dumps(result.to_dict() | {"model": str(args.model), "kind": kind, "text": source},
                                      indent=2) + "\n")
    return 0


def add_validate(sub):
    from .validation.validate import Thresholds

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
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args) -> int:
    from .validation import Thresholds, validate, write_report

    thresholds = Thresholds(max_kl=args.max_kl, min_top1=args.min_top1, max_ppl_increase=args.max_ppl_increase)
    result = validate(args.checkpoint, onnx=args.onnx, gguf=args.gguf, float_model=args.float_model, text=args.text,
                      tokens=args.tokens, window=args.window, thresholds=thresholds, gguf_runner=args.gguf_runner,
                      progress=not args.quiet)
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
    o.add_argument("--quiet", action="store_true")
    o.set_defaults(func=cmd_export_onnx)
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
    g.add_argument("--tokenizer-pre", help="llama.cpp pre-tokenizer name (default: recognised from the vocabulary)")
    add_rtn_args(g)
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_export_gguf)


def add_rtn_args(p):
    rtn = p.add_argument_group("float source", "round-to-nearest settings when SOURCE is a float model")
    rtn.add_argument("--bits", type=int, choices=[2, 3, 4, 5, 6, 8, 16], default=4,
                     help="16: no rounding, every weight stays float (F16 GGUF, float32 ONNX) (default: 4)")
    rtn.add_argument("--group-size", type=int, choices=[32, 64, 128, -1], default=32)
    rtn.add_argument("--asym", dest="sym", action="store_false", help="a zero point per group (default: symmetric)")
    p.set_defaults(sym=True)


def checkpoint_or_rtn(source: Path, args, stack):
    """The Checkpoint to export: source itself when it is one; for a float model, a round-to-nearest
    checkpoint of it in a temporary folder, or (--bits 16) its float weights."""
    import tempfile

    from .checkpoint.read import read_checkpoint
    from .model.load import float_checkpoint, is_checkpoint, resolve_model_dir

    folder = resolve_model_dir(source)
    if is_checkpoint(folder):
        return read_checkpoint(folder)
    if args.bits == 16:
        return float_checkpoint(folder)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="signround-rtn-")))
    argv = ["tune", str(folder), "--out", str(tmp / "rtn"), "--iters", "0", "--bits", str(args.bits),
            "--group-size", str(args.group_size), "--sym" if args.sym else "--asym", "--quiet"]
    if not args.quiet:
        print(f"{folder} is a float model: rounding to nearest at W{args.bits} group {args.group_size} "
              f"{'symmetric' if args.sym else 'asymmetric'} first", file=sys.stderr)
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the nested tune's "wrote" line names a temporary folder
        if main(argv) != 0:
            raise ValueError(f"could not quantize {folder}")
    return read_checkpoint(tmp / "rtn")


def cmd_export_onnx(args) -> int:
    import contextlib

    from .export.onnx.build import export_onnx

    with contextlib.ExitStack() as stack:
        ckpt = checkpoint_or_rtn(args.source, args, stack)
        report = export_onnx(ckpt, args.out, accuracy_level=args.accuracy_level, max_block=args.max_block,
                             lm_head_bits=None if args.lm_head_bits == 16 else args.lm_head_bits)
    print(report)
    return 0


def cmd_export_gguf(args) -> int:
    import contextlib

    from .export.gguf import export_gguf

    with contextlib.ExitStack() as stack:
        ckpt = checkpoint_or_rtn(args.source, args, stack)
        report = export_gguf(ckpt, args.out, asym4=args.asym4, float_type=args.float_type,
                             kquant=args.gguf_type == "q4_k",
                             tokenizer_pre_name=args.tokenizer_pre, progress=not args.quiet)
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="signround", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    add_tune(sub)
    add_eval(sub)
    add_export(sub)
    add_validate(sub)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import CheckpointError, DataError, ModelError, UnsupportedModelError

    try:
        return args.func(args)
    except (CheckpointError, DataError, ModelError, UnsupportedModelError, ValueError) as e:  # GGUFExportError too
        print(f"signround {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"signround {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

