"""SignRound: tune rounding offsets and clipping ranges block by block with signed gradient descent.

For each decoder block, in order:
  1. the float block maps the float model's inputs X to targets Y (computed once);
  2. every quantizable linear gets a rounding offset V (per weight, starts at 0, kept in [-0.5, 0.5])
     and clipping factors min_scale / max_scale (per group, start at 1, kept in [0, 1]; with
     clip_search they start at its factor, and the bound is widened to it where it lies above 1);
  3. for `iters` steps, a random batch of the quantized model's inputs X_q goes through the block
     with fake-quantized weights; the loss is MSE(block_q(X_q), Y); each parameter moves by
     lr_t * sign(grad), with lr_t decaying linearly from lr to 0;
  4. the parameters of the step with the lowest loss are kept and turned into integers;
  5. X_q <- the quantized block (dequantized from those integers) applied to X_q, X <- Y.

Each finished block is persisted (resume.py), so a killed run resumes from the last finished block and ends
with the same integers (the batch order of block i depends only on the seed and i).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..checkpoint.format import GPTQ, GPTQ_V1
from ..checkpoint.qweight import QuantWeight, Scheme
from ..errors import TuneError
from ..model.forward import Model, block_forward
from . import memory
from .clip import clip_search
from .config import TuneConfig
from .quantizer import dequantize, group_range, quantize, to_qweight

if TYPE_CHECKING:  # resume.py stores BlockLogs: it imports this module
    from .resume import ResumeStore


@dataclass
class BlockLog:
    block: int
    loss_before: float | None  # MSE at RTN (step 0)
    loss_after: float | None  # best MSE kept
    best_iter: int | None
    seconds: float


@dataclass
class TuneResult:
    qweights: Mapping[str, QuantWeight]  # in memory, or read from the resume store when tune() was given one
    blocks: list[BlockLog] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    dtype: str = "float32"
    device: str = "cpu"
    resumed_blocks: int = 0

    def log(self, config: TuneConfig) -> dict:
        return {
            "args": asdict(config) | {"lr": config.effective_lr()},
            "device": self.device,
            "compute_dtype": self.dtype,
            "seconds": round(self.seconds, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "resumed_blocks": self.resumed_blocks,
            "blocks": [asdict(b) for b in self.blocks],
        }

    def summary(self) -> str:
        """A line of totals, then a row per tuned block."""
        lines = [f"tuned {len(self.blocks)} blocks in {self.seconds:.1f} s on {self.device} ({self.dtype}), "
                 f"peak RSS {self.peak_rss_mb:.0f} MB" + (f", {self.resumed_blocks} resumed" if self.resumed_blocks else "")]
        tuned = [b for b in self.blocks if b.loss_before is not None]
        if tuned:
            lines.append("block  loss before  loss after  best iter  seconds")
            for b in tuned:
                lines.append(f"{b.block:5d}  {b.loss_before:11.4g}  {b.loss_after:10.4g}  {b.best_iter:9d}  "
                             f"{b.seconds:7.1f}")
        return "\n".join(lines)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TuneError("`device` 'cuda': no CUDA device is available; use 'cpu' or 'auto'", param="device")
    return torch.device(name)


def pick_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 matmuls on CUDA, and on CPUs whose oneDNN has native bf16 (AVX512-BF16 or AMX); without
    it, bf16 matmuls run several times slower than float32 (measured: tools/bench_step.py). A capability
    check, not a timing, so that the same machine always makes the same choice and the same integers."""
    if device.type == "cuda":
        return torch.bfloat16
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return torch.bfloat16 if native else torch.float32


def activation_dtype(config: TuneConfig) -> torch.dtype:
    return getattr(torch, config.act_dtype)


def activation_device(choice: str, dev: torch.device, model: Model, config: TuneConfig,
                      progress: bool) -> torch.device:
    """Where the calibration activations are kept: "cpu", "cuda" (the tuning device must be that GPU), or
    "auto": the tuning device, unless it is a GPU whose free memory would not hold them with the block's
    work (memory.py's plan), in which case the CPU, each step's batch moving to the GPU."""
    if choice == "cuda" and dev.type != "cuda":
        raise TuneError("`act_device` 'cuda': activations stay on the GPU only when the blocks are tuned there; "
                        "give `device` cuda (or auto on a machine with a GPU)", param="act_device")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "auto" and dev.type == "cuda":
        need = memory.plan(model.cfg, memory.tensor_shapes(model.tensors), config, "cuda", pick_dtype(dev), "gpu", 0)
        free, _ = torch.cuda.mem_get_info(dev)
        if memory.offload(need, free):
            if progress:
                print(f"activations kept on the CPU: the GPU needs {need.total('gpu') / 2**20:.0f} MB with them, "
                      f"{free / 2**20:.0f} MB are free", file=sys.stderr)
            return torch.device("cpu")
    return dev


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def input_power(cfg, params: dict[str, torch.Tensor], x: torch.Tensor, rope, batch: int,
                dtype=torch.float32, window: int | None = None) -> dict[str, torch.Tensor]:
    """Mean over calibration tokens of each linear's squared input, per input column (matmuls in dtype);
    window: the block's sliding window."""
    sums: dict[str, torch.Tensor] = {}

    def tap(name: str, t: torch.Tensor) -> None:
        s = t.detach().float().pow(2).reshape(-1, t.shape[-1]).sum(0)
        sums[name] = sums[name] + s if name in sums else s

    device = next(iter(params.values())).device
    batched(lambda b: block_forward(cfg, params, b, *rope, tap=tap, window=window), x, batch, dtype, device)
    tokens = x.shape[0] * x.shape[1]
    return {n: s / tokens for n, s in sums.items()}


class BlockTuner:
    """The tunable parameters of one block's linears and the fake-quantized weights they give."""

    def __init__(self, params: dict[str, torch.Tensor], schemes: dict[str, Scheme], device,
                 power: dict[str, torch.Tensor] | None = None):
        """power: each linear's mean squared input per column; given, the clipping starts at clip_search's."""
        self.params = params
        self.schemes = schemes
        self.ranges, self.v, self.min_scale, self.max_scale, self.clip_max = {}, {}, {}, {}, {}
        for name, scheme in schemes.items():
            w = params[name + ".weight"]
            lo, hi = group_range(w, scheme.resolved_group(w.shape[1]))
            self.ranges[name] = (lo, hi)
            n, g = lo.shape
            group = scheme.resolved_group(w.shape[1])
            ones = torch.ones(n, g, device=device)
            f_lo, f_hi = clip_search(w, scheme, power[name], (lo, hi)) if power else (ones, ones)
            self.v[name] = torch.zeros(n, g, group, device=device, requires_grad=True)
            self.min_scale[name] = f_lo.clone().requires_grad_()
            self.max_scale[name] = f_hi.clone().requires_grad_()
            self.clip_max[name] = (f_lo.clamp(min=1.0), f_hi.clamp(min=1.0))

    def tensors(self) -> list[torch.Tensor]:
        return [*self.v.values(), *self.min_scale.values(), *self.max_scale.values()]

    def weights(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The block's tensors with every tuned linear fake-quantized under the current parameters, in
        dtype (the matmuls' dtype: the cast autocast would make, made here).

        Each fake-quantized weight is recomputed in the backward pass instead of kept: autograd would
        otherwise hold about 10 bytes per weight of the rounding's intermediates for the whole step, the
        largest part of a block's tuning memory. The recomputation repeats the same operations, so the
        gradients are bit for bit those of the kept graph."""
        p = dict(self.params)
        for name in self.schemes:
            p[name + ".weight"] = checkpoint(self.fake_quant, name, dtype, use_reentrant=False)
        return p

    def fake_quant(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        w = quantize(self.params[name + ".weight"], self.schemes[name], self.v[name], self.min_scale[name],
                     self.max_scale[name], self.ranges[name]).weight
        return w.to(dtype)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """Signed gradient descent, then the bounds: the published [0, 1] for the clipping factors,
        widened above 1 to the start where clip_search began above it."""
        for t in self.v.values():
            t.sub_(lr * t.grad.sign()).clamp_(-0.5, 0.5)
        for name, tops in self.clip_max.items():
            for t, top in zip((self.min_scale[name], self.max_scale[name]), tops):
                t.sub_(lr * t.grad.sign()).clamp_(min=0.0).copy_(torch.minimum(t, top))
        for t in self.tensors():
            t.grad = None

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {f"{kind}:{n}": t.detach().clone() for kind, d in
                (("v", self.v), ("min", self.min_scale), ("max", self.max_scale)) for n, t in d.items()}

    def qweights(self, snapshot: dict[str, torch.Tensor] | None) -> dict[str, QuantWeight]:
        out = {}
        for name, scheme in self.schemes.items():
            tuned = (snapshot[f"v:{name}"], snapshot[f"min:{name}"], snapshot[f"max:{name}"]) if snapshot else ()
            out[name] = to_qweight(self.params[name + ".weight"], scheme, *tuned, bias=self.params.get(name + ".bias"))
        return out


def batched(fn, x: torch.Tensor, batch: int, dtype, device=None) -> torch.Tensor:
    """fn over x in batches, without gradients, its matmuls in dtype on device (default: x's). Each batch
    moves to device as float32 and its result back into a tensor shaped and stored like x (its dtype and
    device); both moves are no-ops where x already is float32 on device. Written in place, so the input,
    the output and one batch are all that is held."""
    device = x.device if device is None else torch.device(device)
    out = torch.empty_like(x)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        for i in range(0, len(x), batch):
            out[i : i + batch] = fn(to_compute(x[i : i + batch], device)).to(x.device, x.dtype)
    return out


def to_compute(t: torch.Tensor, device) -> torch.Tensor:
    """A batch of stored activations as the block computes on it: float32 on the tuning device."""
    return t.to(device, torch.float32)


def block_loss(cfg, tuner: BlockTuner, x: torch.Tensor, y: torch.Tensor, rope, window: int | None,
               dtype: torch.dtype) -> torch.Tensor:
    """MSE between the block's output on x under the tuner's fake-quantized weights (matmuls in dtype) and
    the float targets y: the loss one SignRound step differentiates."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        out = block_forward(cfg, tuner.weights(dtype), x, *rope, window=window)
    return F.mse_loss(out.float(), y)


def tune_block(model: Model, i: int, params: dict[str, torch.Tensor], x_q: torch.Tensor, y: torch.Tensor, rope,
               config: TuneConfig, dtype, progress: bool) -> tuple[dict[str, QuantWeight], BlockLog]:
    """SignRound on block i (params: its float tensors on the tuning device): x_q the quantized model's
    inputs of the block, y the float block's outputs (stored in any dtype, on any device: each step's
    batch moves to the tuning device)."""
    t0 = time.perf_counter()
    device = next(iter(params.values())).device
    schemes = {n: config.scheme(f"model.layers.{i}.{n}") for n in model.cfg.family.linears}
    window = model.cfg.window(i)
    power = input_power(model.cfg, params, x_q, rope, config.batch_size, dtype, window) if config.searches() else None
    tuner = BlockTuner(params, schemes, device, power)
    g = torch.Generator().manual_seed(config.seed * 100003 + i)
    lr0, batch = config.effective_lr(), min(config.batch_size, len(x_q))
    order, pos = torch.randperm(len(x_q), generator=g), 0
    best, best_loss, best_iter, first_loss = None, float("inf"), None, None
    bar = tqdm(range(config.iters), desc=f"block {i}", leave=False, unit="it", disable=not progress)
    for it in bar:
        if pos + batch > len(order):  # reshuffle once every sample has been seen
            order, pos = torch.randperm(len(x_q), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        loss = block_loss(model.cfg, tuner, to_compute(x_q[idx], device), to_compute(y[idx], device), rope, window,
                          dtype)
        value = loss.item()
        if first_loss is None:
            first_loss = value
        if value < best_loss:  # the loss of the parameters before this step's update
            best_loss, best_iter, best = value, it, tuner.snapshot()
        loss.backward()
        tuner.step(lr0 * (1 - it / config.iters))
        if it % 10 == 0:
            bar.set_postfix(loss=f"{value:.3g}", best=f"{best_loss:.3g}")
    bar.close()
    kept = best if best is not None else tuner.snapshot()  # iters 0: clip_search's start as is
    qweights = {f"model.layers.{i}.{n}": qw for n, qw in tuner.qweights(kept).items()}
    log = BlockLog(i, first_loss, best_loss if best is not None else None, best_iter,
                   round(time.perf_counter() - t0, 2))
    return qweights, log


def rtn_block(p: dict[str, torch.Tensor], linears: tuple[str, ...], i: int,
              config: TuneConfig) -> dict[str, QuantWeight]:
    """Round-to-nearest integers of block i's linears (p: its float tensors; linears: the family's)."""
    names = {n: f"model.layers.{i}.{n}" for n in linears}
    return {name: to_qweight(p[n + ".weight"], config.scheme(name), bias=p.get(n + ".bias"))
            for n, name in names.items()}


def quantized_params(params: dict[str, torch.Tensor], i: int, qweights: dict[str, QuantWeight], device
                     ) -> dict[str, torch.Tensor]:
    """Block i's tensors (params, on device) with its linears dequantized from their integers."""
    p = dict(params)
    for name, qw in qweights.items():
        p[name.split(f"model.layers.{i}.", 1)[-1] + ".weight"] = dequantize(qw, device)
    return p


def packing_format(model: Model, config: TuneConfig) -> str:
    """The checkpoint's packing format: GPTQ's "zero - 1" when every layer is symmetric (it cannot hold an
    asymmetric layer's zero point of 0), zero points as they are otherwise."""
    names = [f"model.layers.{i}.{n}" for i in range(model.cfg.n_layers) for n in model.cfg.family.linears]
    names += ["lm_head"] if config.quant_lm_head else []
    return GPTQ_V1 if all(config.scheme(n).sym for n in names) else GPTQ


def tune(model: Model, calib: torch.Tensor | None, config: TuneConfig, resume: ResumeStore | None = None,
         device: str = "auto", progress: bool = True, act_device: str = "auto") -> TuneResult:
    """Quantize every block's linears (and the lm_head with quant_lm_head). calib: [nsamples, seqlen]
    token ids, unused by plain round-to-nearest (iters 0 without clip_search). resume: where finished
    blocks are kept, and read back instead of tuned again; given, each finished block goes there and is
    not held (result.qweights reads them back from it). Each block's float tensors are read from
    model.tensors once, when the block is reached, and dropped when the next one is read.
    act_device: where the calibration activations are kept, in config.act_dtype ("auto": the tuning
    device, or the CPU where a GPU's free memory would not hold them; memory.py)."""
    start = time.perf_counter()
    dev = pick_device(device)
    dtype = pick_dtype(dev) if config.iters > 0 else torch.float32
    result = TuneResult(qweights={}, device=str(dev), dtype=str(dtype).replace("torch.", ""))
    if resume is not None:
        resume.begin(asdict(config) | {"device": dev.type, "compute_dtype": result.dtype},
                     packing_format(model, config))
    cfg = model.cfg

    x = x_q = ropes = y = None
    if config.uses_data():
        store = activation_device(act_device, dev, model, config, progress)
        with torch.no_grad():
            x = model.embed(calib).to(store, activation_dtype(config))
        x_q = x.clone()
        ropes = model.ropes(calib.shape[1], dev)

    bar = tqdm(range(cfg.n_layers), desc="tuning", unit="block", disable=not progress)
    for i in bar:
        rope = ropes[i] if ropes is not None else None
        block = model.block_params(i)  # replaces the previous block's: at most two blocks are held
        params = {n: t.to(dev) for n, t in block.items()}
        if config.iters > 0:  # the float block's outputs: targets of this block, inputs of the next
            y = batched(lambda b: block_forward(cfg, params, b, *rope, window=cfg.window(i)), x, config.batch_size,
                        dtype, dev)
        x = y  # the float chain moves on: its inputs of this block are needed no more
        saved = resume.load_block(i) if resume is not None else None
        if saved is not None:
            qws, log = saved
            result.resumed_blocks += 1
        else:
            if not config.uses_data():
                qws, log = rtn_block(block, model.cfg.family.linears, i, config), BlockLog(i, None, None, None, 0.0)
            else:
                qws, log = tune_block(model, i, params, x_q, y, rope, config, dtype, progress)
            if resume is not None:
                resume.save_block(i, qws, log)
        if resume is None:
            result.qweights.update(qws)
        result.blocks.append(log)
        if config.uses_data():  # the quantized model's inputs of the next block
            qp = quantized_params(params, i, qws, dev)
            x_q = batched(lambda b: block_forward(cfg, qp, b, *rope, window=cfg.window(i)), x_q,
                          config.batch_size, dtype, dev)
            del qp  # not held while the next block is tuned
        if log.loss_before is not None:
            bar.set_postfix_str(f"loss {log.loss_before:.3g} -> {log.loss_after:.3g}")

    if config.quant_lm_head and not (resume is not None and resume.has("lm_head")):
        # round-to-nearest: tuning it would need the full-vocabulary logits of every sample
        head = {"lm_head": to_qweight(model.lm_head_weight(), config.scheme("lm_head"),
                                      bias=model.tensors.get("lm_head.bias"))}
        if resume is not None:
            resume.save_layers("lm_head", head)
        else:
            result.qweights.update(head)
    if resume is not None:
        result.qweights = resume.qweights()
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = peak_rss_mb()
    return result
