"""The memory a tuning run needs, from config.json and the safetensors headers alone (no weight is read).

What tune() holds at its peak, part by part (bytes; H hidden, I intermediate, W a block's linear
weights, T = batch_size x seqlen tokens per step):
  - the process itself: Python, torch and this package, measured as the planning process's RSS;
  - the embedding in float32, read whole to embed the calibration windows (dropped before the first
    block), and each float tensor again, one at a time, when the checkpoint is written;
  - two decoder blocks in float32 (the one being tuned and the one read next, or its dequantized twin);
  - one block's tuning state: the rounding offsets, their gradients and the best step's copy (12 B per
    weight; 8 more for Adam's moments with optimizer "adam"), and the fake-quantized weights as the
    matmuls keep them for the backward pass (2 B per weight in bfloat16, 4 in float32), and the rounding's
    own intermediates: RECOMPUTE B per weight (measured on Llama-3.1-8B-sized blocks). A block whose
    rounding would take more than KEPT_ROUNDING recomputes it in the backward pass
    (signround.BlockTuner.weights), so that only the largest linear's are alive at a time;
  - one step's activations kept for the backward pass and their gradients: 2 x (24 H + 16 I) B per token
    with float32 matmuls, 2 x (20 H + 8 I) B with bfloat16 ones (saved-tensor hooks, SmolLM2 and
    Llama-3.2-1B blocks), plus the attention scores where SDPA's fused path does not apply;
  - the clipping search's temporaries: 5 x the largest linear in float32 (measured 3.6-4.5 x);
  - the calibration activations: three chains (float inputs, quantized inputs, targets) of
    nsamples x seqlen x H in their storage dtype, on the tuning device or the CPU.
  - with `calib self`, before the tuning: the whole float model in transformers (selfcalib.py), its
    weight files mapped while it loads, one batch's KV cache (measured on SmolLM2 below the estimate);
  - the checkpoint writer at the end: one tensor at a time (checkpoint/shards.py writes each into its
    shard and drops it), so the largest float tensor in float32 and one layer's codes (1 B per weight)
    with their packed form (bits / 8 B per weight).
The parts do not all peak at once: `calib self`'s generation is over before the tuning; the tuning
phase holds the blocks, their state and the activations; the writing phase, after it, one float tensor
and one packed layer (the embedding read at the start is dropped before the first block). A total is
the process plus the largest phase.
"""

from __future__ import annotations

import resource
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..model.config import ModelConfig
from ..selfcalib import BATCH
from .config import TuneConfig

MB = 2**20
GB = 2**30
TUNING_STATE = 12  # bytes per linear weight: offsets, their gradients, the best step's copy
ADAM_STATE = 8  # and with optimizer "adam": its two moments of each offset in float32
RECOMPUTE = 16  # bytes per weight of the rounding's intermediates, as the backward pass needs them
KEPT_ROUNDING = 512 * MB  # a block whose rounding fits in this keeps it through the step (no recomputation)
CLIP_TEMPORARIES = 5  # the clipping search's peak, in float32 copies of the largest linear
STEP_BYTES = {torch.float32: (24, 16), torch.bfloat16: (20, 8)}  # saved per token: (x H, x I) bytes
ACT_BYTES = {"float32": 4, "bfloat16": 2}


# `calib self` samples its text, then the blocks are tuned, then the checkpoint is written
PHASES = ("calibration", "tuning", "writing")
TRANSFORMERS_IMPORT = 110 * MB  # measured: what importing transformers and its Llama code adds to the RSS


@dataclass
class Part:
    name: str
    nbytes: int
    where: str  # "cpu" or "gpu"
    how: str  # the formula, for the table
    phase: str = ""  # one of PHASES, or "" for all of the run


@dataclass
class MemoryPlan:
    """The parts a run holds, where and when; peak totals per kind of memory."""

    parts: list[Part]
    device: str  # the tuning device's type
    act_where: str  # where the activation chains are kept

    def total(self, where: str) -> int:
        """The peak: what every phase holds, plus the larger phase's own parts."""
        def held(phase: str) -> int:
            return sum(p.nbytes for p in self.parts if p.where == where and p.phase == phase)
        return held("") + max(held(phase) for phase in PHASES)

    def table(self) -> str:
        rows = [f"{p.name:<42} {p.nbytes / MB:>10.0f} MB  {p.where:<3}  {p.phase or 'all':<11}  {p.how}"
                for p in self.parts]
        rows.append(f"{'CPU total (the larger phase)':<42} {self.total('cpu') / MB:>10.0f} MB")
        gpu = f"{self.total('gpu') / MB:>10.0f} MB" if self.device == "cuda" else "      none (tuning on the CPU)"
        rows.append(f"{'GPU total':<42} {gpu}")
        return "\n".join(rows)


def tensor_shapes(tensors: Mapping) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape: from a TensorStore's headers (nothing read), or from the tensors."""
    shape = getattr(tensors, "shape", None)
    return {n: tuple(shape(n)) if shape else tuple(tensors[n].shape) for n in tensors}


def numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def block_sizes(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int]:
    """(the largest block's elements, the largest block's linear weights, the largest linear's weights)."""
    block = [0] * cfg.n_layers
    linear = [0] * cfg.n_layers
    largest = 0
    for name, shape in shapes.items():
        if not name.startswith("model.layers."):
            continue
        i, rest = name[len("model.layers."):].split(".", 1)
        block[int(i)] += numel(shape)
        if rest.endswith(".weight") and rest[: -len(".weight")] in cfg.family.linears:
            linear[int(i)] += numel(shape)
            largest = max(largest, numel(shape))
    return max(block, default=0), max(linear, default=0), largest


def recomputes(linear_weights: int) -> bool:
    """Whether a block of this many linear weights recomputes its rounding in the backward pass
    (signround.BlockTuner.weights): only where keeping every linear's would exceed KEPT_ROUNDING. Below,
    the second rounding costs time (2-5% of a step on SmolLM2) and saves little memory."""
    return RECOMPUTE * linear_weights > KEPT_ROUNDING


def step_bytes(cfg: ModelConfig, config: TuneConfig, dtype: torch.dtype, ranks: int = 1) -> tuple[int, str]:
    """One SignRound step's activations and their gradients, and the formula. Of ranks, each holds its
    slice of a batch under the strata order; a random batch may fall on one rank whole."""
    per_h, per_i = STEP_BYTES.get(dtype, STEP_BYTES[torch.float32])
    batch = config.batch_size // ranks if config.batch_order == "strata" else config.batch_size
    tokens = batch * config.seqlen
    n = 2 * tokens * (per_h * cfg.hidden_size + per_i * cfg.intermediate_size)
    how = f"2 x {tokens} tokens x ({per_h} H + {per_i} I) B"
    windowed = any(cfg.window(i) is not None and cfg.window(i) < config.seqlen for i in range(cfg.n_layers))
    if cfg.attn_softcap is not None or windowed:  # scores written out: [batch, heads, T, T], ~3 copies
        n += 3 * 4 * batch * cfg.n_heads * config.seqlen**2
        how += " + 3 float32 attention score tensors"
    return n, how


def plan(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], config: TuneConfig, device: str,
         dtype: torch.dtype, act_where: str, baseline: int, ranks: int = 1) -> MemoryPlan:
    """What a run of config on device ("cpu" or "cuda") holds; dtype: its matmuls' dtype; act_where: "cpu"
    or "gpu", where the activation chains are kept; baseline: the process's own bytes. ranks: torchrun's
    processes (parallel.py): the plan is each one's, holding its share of the samples."""
    on = "gpu" if device == "cuda" else "cpu"
    vocab, hidden = shapes["model.embed_tokens.weight"]
    block, linear, largest = block_sizes(cfg, shapes)
    untied = "lm_head.weight" in shapes or config.quant_lm_head
    parts = [Part("process (Python, torch, this package)", baseline, "cpu", "measured RSS of this process"),
             Part("the largest float tensor (float32)", 4 * vocab * hidden, "cpu",
                  f"embedding{' or head' if untied else ''}: {vocab} x {hidden} x 4 B, one at a time", "writing")]
    parts.append(Part("two decoder blocks (float32)", 2 * 4 * block, "cpu", f"2 x {block} x 4 B", "tuning"))
    if on == "gpu":
        parts.append(Part("two decoder blocks on the GPU", 2 * 4 * block, on, f"2 x {block} x 4 B", "tuning"))
    if config.iters > 0:
        state = TUNING_STATE + (ADAM_STATE if config.optimizer == "adam" else 0)
        kept = state + dtype.itemsize  # and the matmuls' copy of each fake-quantized weight
        parts.append(Part("tuning state of one block", kept * linear, on,
                          f"({state} + {dtype.itemsize}) B x {linear} linear weights", "tuning"))
        if recomputes(linear):
            parts.append(Part("one linear's rounding, recomputed", RECOMPUTE * largest, on,
                              f"{RECOMPUTE} B x {largest} (the largest linear)", "tuning"))
        else:
            parts.append(Part("the block's rounding, kept", RECOMPUTE * linear, on,
                              f"{RECOMPUTE} B x {linear} linear weights", "tuning"))
        n, how = step_bytes(cfg, config, dtype, ranks)
        parts.append(Part("one step's activations and gradients", n, on, how, "tuning"))
    if config.searches():
        parts.append(Part("clipping search temporaries", CLIP_TEMPORARIES * 4 * largest, on,
                          f"{CLIP_TEMPORARIES} x {largest} x 4 B (the largest linear)", "tuning"))
    if config.uses_data():
        act = ACT_BYTES[config.act_dtype]
        samples = config.nsamples // ranks
        share = f", one rank's {samples} of {config.nsamples} samples" if ranks > 1 else ""
        n = 3 * samples * config.seqlen * hidden * act
        parts.append(Part(f"calibration activations ({config.act_dtype})", n, act_where,
                          f"3 chains x {samples} x {config.seqlen} x {hidden} x {act} B{share}", "tuning"))
    parts.append(writer_part(config, vocab * hidden if config.quant_lm_head else largest))
    return MemoryPlan(parts, device, act_where)


def writer_part(config: TuneConfig, layer: int) -> Part:
    """The checkpoint writer: one layer at a time, its codes (1 B per weight) and their packed form."""
    packed = config.bits / 8
    return Part("checkpoint writing (one layer)", int(layer * (1 + packed)), "cpu",
                f"{layer} weights x (1 + {packed:g}) B", "writing")


def self_calibration_part(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], sequences: int, seqlen: int,
                          dtype: torch.dtype, file_bytes: int) -> Part:
    """`calib self`'s generation (selfcalib.py), before the tuning: transformers, the float model's
    weight files mapped while it loads, its weights in dtype, one batch's KV cache and last logits."""
    batch = min(BATCH, sequences)
    weights = sum(numel(s) for s in shapes.values()) * dtype.itemsize
    kv = 2 * cfg.n_layers * batch * seqlen * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
    logits = 2 * batch * cfg.vocab_size * 4
    how = (f"transformers {TRANSFORMERS_IMPORT // MB} MB + weight files {file_bytes / MB:.0f} MB + weights in "
           f"{str(dtype).removeprefix('torch.')} + KV cache 2 x {cfg.n_layers} x {batch} x {seqlen} x "
           f"{cfg.n_kv_heads} x {cfg.head_dim} x {dtype.itemsize} B + logits")
    return Part("calib self: the float model in transformers", TRANSFORMERS_IMPORT + file_bytes + weights + kv + logits,
                "cpu", how, "calibration")


def process_bytes() -> int:
    """This process's peak RSS so far: the baseline every run starts from."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def offload(plan_on_gpu: MemoryPlan, free: int) -> bool:
    """Whether the activation chains go to the CPU: the GPU's parts with them there exceed its free memory."""
    return plan_on_gpu.total("gpu") > free
