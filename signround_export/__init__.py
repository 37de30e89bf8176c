"""SignRound quantization of Hugging Face LLMs, exported to ONNX (MatMulNBits) and GGUF, validated
against a PyTorch reference. The Python API; the `signround` command is a thin layer over it.

    import signround_export as sr

    result = sr.quantize("models/smollm2-135m-instruct", "out/w4g128", bits=4, group_size=128)
    sr.export_onnx(result.checkpoint, "out/w4g128-onnx")
    sr.export_gguf(result.checkpoint, "out/w4g128.gguf")
    report = sr.validate(result.checkpoint, onnx="out/w4g128-onnx", gguf="out/w4g128.gguf")

Every refusal of bad input is a SignroundError (a ValueError) whose message names the parameter at
fault; `error.param` holds its name when the message is about one parameter.
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint.format import Checkpoint, QuantConfig
from .checkpoint.qweight import QuantWeight, Scheme
from .checkpoint.read import read_checkpoint
from .errors import (
    CheckpointError,
    DataError,
    ExportError,
    GGUFExportError,
    MatMulNBitsError,
    ModelError,
    ONNXExportError,
    SignroundError,
    TuneError,
    UnsupportedModelError,
    ValidationError,
)
from .export.gguf import write as gguf_write
from .export.gguf.write import GGUFExport
from .export.onnx import build as onnx_build
from .export.onnx.build import ONNXExport
from .tune.config import RECIPES, TuneConfig
from .tune.memory import MemoryPlan
from .tune.pipeline import LayerBits, QuantizeResult, export_source, plan_memory, quantize_model
from .validation import Perplexity, Thresholds, ValidationResult, folder_perplexity, perplexity, validate, write_report

__all__ = [
    "quantize", "tune_memory", "export_onnx", "export_gguf", "validate", "evaluate", "perplexity", "read_checkpoint",
    "write_report", "Thresholds", "ValidationResult", "QuantizeResult", "MemoryPlan", "TuneConfig", "RECIPES", "Checkpoint", "QuantConfig",
    "QuantWeight", "Scheme", "ONNXExport", "GGUFExport", "Perplexity",
    "SignroundError", "ModelError", "UnsupportedModelError", "DataError", "CheckpointError", "TuneError",
    "ExportError", "ONNXExportError", "MatMulNBitsError", "GGUFExportError", "ValidationError",
]

Source = str | Path | Checkpoint  # what an exporter takes: a checkpoint (folder or read) or a float model folder


def quantize(model: str | Path, out: str | Path, *, bits: int | None = None, group_size: int | None = None,
             sym: bool | None = None, gguf: str | None = None, recipe: str = "best", iters: int | None = None,
             nsamples: int | None = None, seqlen: int | None = None, batch_size: int | None = None,
             lr: float | None = None, clip_search: bool | None = None, quant_lm_head: bool = False,
             target: str | None = None, size_mb: float | None = None, avg_bits: float | None = None,
             probe_windows: int = 4, allocation: str | Path | None = None, calib: str | Path | None = None,
             device: str = "auto", seed: int = 42, shard_size: int | str = "5GB", progress: bool = True,
             act_dtype: str = "float32", act_device: str = "auto", calib_windows: str = "stream",
             optimizer: str = "signsgd", tune_clip: bool = True, lr_schedule: str = "linear",
             patience: int = 0, best: str = "batch", eval_every: int = 10, batch_order: str = "random",
             dp_reduce: str = "sum") -> QuantizeResult:
    """Quantize every decoder-block linear of a float HF model with SignRound into a checkpoint folder.

    model: a float HF model folder (config.json, *.safetensors, tokenizer.json) or a hub id.
    out: the checkpoint folder to write (auto-round format); it appears only once whole. A killed run
        resumes from `out`.progress when started again with the same settings.
    bits, group_size, sym: the scheme (default 4, 128, asymmetric); group_size -1 is one group per row.
    gguf: tune every layer on the grid of the GGUF type it will be written as (e.g. "q4_k_m"), so that
        export_gguf carries the tuned integers bit for bit; replaces bits, group_size and sym.
    recipe: "best" or "fast", the defaults of iters, nsamples, seqlen and batch_size (RECIPES).
    iters: SignRound steps per block, 0 for round to nearest; nsamples, seqlen: calibration windows;
        batch_size: windows per step; lr: learning rate (default 1 / iters, decaying linearly to 0).
    clip_search: start each group's clipping at the factor with the least input-weighted error
        (default: when iters > 0); with iters 0 its result is the checkpoint.
    quant_lm_head: also round the lm_head to nearest.
    target, size_mb, avg_bits: mixed precision under a budget of the deployed file: target "onnx" (each
        layer's bits 2, 4, 8 and block 32, 64, 128 of MatMulNBits) or "gguf" (each layer's GGUF type),
        size_mb the megabytes (10^6 bytes) the decoder-block linears take in that file, or avg_bits their
        bits per weight there; the choices minimise the measured KL against the float model on
        probe_windows calibration windows (tune/allocate.py).
    allocation: bits per layer from a JSON file {"bits": {layer: bits}} instead.
    calib: calibration text: a .txt or .jsonl (a "text" field per line) path, or comma-separated sources
        "a.txt,b.jsonl,self" sharing nsamples evenly, where `self` is text sampled from the float model
        itself (data-free; the whole float model is loaded for it, and the ids are kept in the checkpoint
        as calibration-self.safetensors); default: Python's pydoc_data.topics. A path with a comma is
        not supported.
    calib_windows: "stream" (each source one stream of tokens cut into windows, no BOS) or "documents"
        (each document, a .jsonl line or a whole .txt, tokenized on its own; windows never cross a
        document and start with BOS where the model's tokenizer adds one).
    device: "auto", "cpu" or "cuda". progress: progress bars and notes on stderr.
    act_dtype: how the calibration activations are stored, "float32" or "bfloat16" (half the memory;
        the integers change). act_device: where they are kept, "auto" (the tuning device, or the CPU
        where a GPU's free memory would not hold them), "cpu" or "cuda". tune_memory() tells the memory
        a run needs.
    shard_size: the largest weight file, in bytes or as "5GB", "500MB", "2GiB"; a larger checkpoint is
        written as model-0000X-of-0000Y.safetensors with model.safetensors.index.json (a layer is never
        split), a smaller one as model.safetensors.

    For measuring SignRound's choices one at a time (the defaults are SignRound's, and with them the
    integers are those of a run without these settings):
    optimizer: "signsgd" or "adam" (torch.optim.Adam on the same variables, schedule and bounds; its
        useful lr may differ from the default 1 / iters). tune_clip: False holds the clipping factors at
        their start (full range, or clip_search's) and tunes only the rounding offsets.
    lr_schedule: "linear" (decay to 0), "constant" or "cosine". patience: stop a block after this many
        steps without a lower loss (0: never). best: the parameters kept, "batch" (the lowest loss on the
        step's own batch), "last" (the final ones) or "fixed" (the lowest loss on one fixed batch of the
        block's samples, measured every eval_every steps and at the end).
    batch_order: "random" (batches cut from random permutations of the samples) or "strata" (one sample
        from each of batch_size contiguous strata per batch: an even split of every batch over the ranks
        of a data-parallel run; nsamples must be a multiple of batch_size).

    Started by torchrun (several processes, on one machine or several), every rank tunes its share of
    the calibration samples and their gradients are summed at every step (dp_reduce "sum": the
    single-process integers in float32; in bfloat16 each rank's gradients are rounded before the sum,
    so the run differs from one process's), or their signs voted on (dp_reduce "sign": int8 signs, a
    quarter of the bytes; its accuracy is not yet measured); rank 0 writes the checkpoint, the others
    return QuantizeResult.written False. SIGNROUND_DIST_TIMEOUT: the seconds a rank waits for the others.

    Raises TuneError, ModelError, DataError (SignroundErrors) for bad settings or inputs.
    """
    given = [name for name, value in (("bits", bits), ("group_size", group_size), ("sym", sym)) if value is not None]
    layer_bits = LayerBits(gguf=gguf, target=target, size_mb=size_mb, avg_bits=avg_bits,
                           probe_windows=probe_windows, allocation=allocation)
    layer_bits.check(scheme_given=given)
    config = TuneConfig.from_recipe(recipe, bits=bits, group_size=group_size, sym=sym, iters=iters,
                                    nsamples=nsamples, seqlen=seqlen, batch_size=batch_size, lr=lr, seed=seed,
                                    clip_search=clip_search, quant_lm_head=quant_lm_head, act_dtype=act_dtype,
                                    calib_windows=calib_windows, optimizer=optimizer, tune_clip=tune_clip,
                                    lr_schedule=lr_schedule, patience=patience, best=best,
                                    eval_every=eval_every, batch_order=batch_order)
    return quantize_model(model, out, config, layer_bits, recipe=recipe, calib=calib, device=device,
                          progress=progress, act_device=act_device,
                          shard_size=shard_size, dp_reduce=dp_reduce)


def tune_memory(model: str | Path, *, recipe: str = "best", iters: int | None = None, nsamples: int | None = None,
                seqlen: int | None = None, batch_size: int | None = None, clip_search: bool | None = None,
                quant_lm_head: bool = False, act_dtype: str = "float32", device: str = "auto",
                act_device: str = "auto", optimizer: str = "signsgd", calib: str | Path | None = None,
                batch_order: str = "random", ranks: int | None = None) -> MemoryPlan:
    """The memory quantize() would need for `model` with these settings, part by part (MemoryPlan.table()),
    from its config.json and safetensors headers alone: no weight is read. Parameters as quantize's;
    device "cuda" plans for a GPU even where there is none. Bits and group size do not change it; Adam's
    moments (optimizer "adam") do, and calib where it holds `self` (the float model is loaded whole to
    sample from, before the tuning). ranks: the processes of a data-parallel run, each planned with its
    share of the samples (None: torchrun's WORLD_SIZE where it launched this process, else 1)."""
    config = TuneConfig.from_recipe(recipe, iters=iters, nsamples=nsamples, seqlen=seqlen, batch_size=batch_size,
                                    clip_search=clip_search, quant_lm_head=quant_lm_head, act_dtype=act_dtype,
                                    optimizer=optimizer, batch_order=batch_order)
    return plan_memory(model, config, device=device, act_device=act_device, calib=calib, ranks=ranks)


def export_onnx(source: Source, out: str | Path, *, accuracy_level: int = 4, lm_head_bits: int | None = None,
                max_block: int = 32, bits: int = 4, group_size: int = 32, sym: bool = True,
                progress: bool = True, verify: bool = True) -> ONNXExport:
    """Write an ONNX folder (model.onnx with MatMulNBits weights repacked exactly from the checkpoint's
    integers, genai_config.json, tokenizer files) for onnxruntime and onnxruntime-genai.

    source: a checkpoint folder, a Checkpoint, or a float model folder, which is first rounded to
        nearest at bits / group_size / sym (bits 16: kept float).
    accuracy_level: MatMulNBits accuracy level, 0 (float32, matches the reference) to 4 (int8
        activations per block, the fast CPU path). lm_head_bits: 4 or 8 round a float head to nearest.
    max_block: the largest MatMulNBits block; larger groups ride in blocks of this size (exact).
    verify: check a checkpoint folder's tensors against the digests written with them (False reads a
    damaged file as it is). The folder gets sha256sums.txt, the digests of its files.
    """
    with export_source(source, bits=bits, group_size=group_size, sym=sym, progress=progress, verify=verify) as ckpt:
        return onnx_build.export_onnx(ckpt, out, accuracy_level=accuracy_level, lm_head_bits=lm_head_bits,
                                      max_block=max_block, progress=progress)


def export_gguf(source: Source, out: str | Path, *, asym4: str = "q5_0", float_type: str = "f16",
                kquant: bool = False, tokenizer_pre_name: str | None = None, bits: int = 4, group_size: int = 32,
                sym: bool = True, progress: bool = True, verify: bool = True) -> GGUFExport:
    """Write one GGUF file for llama.cpp; each quantized layer goes into a block type that holds its
    integers exactly where one exists, and the report gives every tensor's type and error.

    source: as for export_onnx. asym4: carrier of 4-bit asymmetric layers, "q5_0" (exact) or "q4_1"
    (smaller). float_type: "f16", "f32" or "q8_0" for float matrices. kquant: Q4_K for layers of up to
    4 bits whose rows are a multiple of 256 (not exact). tokenizer_pre_name: llama.cpp's pre-tokenizer
    name of a byte-level BPE whose vocabulary and split regex are not recognised. verify: as for
    export_onnx. The file's metadata holds the digest of each tensor's data (signround.tensor_sha256).
    """
    with export_source(source, bits=bits, group_size=group_size, sym=sym, progress=progress, verify=verify) as ckpt:
        return gguf_write.export_gguf(ckpt, out, asym4=asym4, float_type=float_type, kquant=kquant,
                                      tokenizer_pre_name=tokenizer_pre_name, progress=progress)


def evaluate(model: str | Path, *, text: str | Path | None = None, window: int = 512, windows: int = 40,
             progress: bool = True, verify: bool = True) -> Perplexity:
    """Perplexity of a float model folder, or of a checkpoint's PyTorch reference (weights dequantized
    from its integers), over the first `windows` non-overlapping windows of `window` tokens, no BOS.
    text: a .txt or .jsonl file (default: the held-out slice of the default calibration text).
    verify: check a checkpoint's tensors against the digests written with them."""
    return folder_perplexity(model, text, window=window, max_windows=windows, progress=progress, verify=verify)[0]
