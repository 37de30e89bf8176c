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

TuneConfig's ablation switches change one of these choices at a time, for measurement: the update
(optimizer, in BlockTuner.step), whether the clipping moves (tune_clip), the rate's schedule (lr_at),
an early stop (patience) and which parameters are kept (best, in Keeper and BlockRun.finish).

Each finished block is persisted (resume.py), so a killed run resumes from the last finished block and ends
with the same integers (the batch order of block i depends only on the seed and i).

Under torchrun every rank holds its share of the samples (parallel.World): a step's loss and gradients
are summed over the ranks before the update, so every rank takes the same steps a single process would.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from ..checkpoint.format import GPTQ, GPTQ_LEVELS, GPTQ_V1
from ..checkpoint.qweight import UNIFORM, QuantWeight, Scheme
from ..digests import digest_of
from ..errors import TuneError
from ..model.forward import Model, block_forward
from . import memory
from .clip import clip_search
from .config import TuneConfig
from .parallel import SOLO, World
from .quantizer import dequantize, group_range, quantize, to_qweight

if TYPE_CHECKING:  # resume.py stores BlockLogs: it imports this module
    from .resume import ResumeStore


@dataclass
class BlockLog:
    block: int
    loss_before: float | None  # MSE at RTN (step 0)
    loss_after: float | None  # the kept parameters' MSE as the rule measured it: on its step's batch (best
    # "batch"), on the block's fixed batch ("fixed", "last")
    best_iter: int | None  # the kept parameters are those after this many updates
    seconds: float
    steps: int | None = None  # the updates made (fewer than iters when patience stopped the block); None:
    # not tuned, or a log written before this field existed


@dataclass
class TuneResult:
    qweights: Mapping[str, QuantWeight]  # in memory, or read from the resume store when tune() was given one
    blocks: list[BlockLog] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    dtype: str = "float32"
    device: str = "cpu"
    resumed_blocks: int = 0
    parallel: dict | None = None  # with several ranks: their number, the reduction and its bytes per block

    def log(self, config: TuneConfig) -> dict:
        return {
            "args": asdict(config) | {"lr": config.effective_lr()},
            "device": self.device,
            "compute_dtype": self.dtype,
            "seconds": round(self.seconds, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "resumed_blocks": self.resumed_blocks,
            "blocks": [asdict(b) for b in self.blocks],
        } | ({"parallel": self.parallel} if self.parallel else {})

    def summary(self) -> str:
        """A line of totals, then a row per tuned block."""
        lines = [f"tuned {len(self.blocks)} blocks in {self.seconds:.1f} s on {self.device} ({self.dtype}), "
                 f"peak RSS {self.peak_rss_mb:.0f} MB" + (f", {self.resumed_blocks} resumed" if self.resumed_blocks else "")]
        tuned = [b for b in self.blocks if b.loss_before is not None]
        if tuned:
            lines.append("block  loss before  loss after  best iter  steps  seconds")
            for b in tuned:
                steps = "" if b.steps is None else b.steps
                lines.append(f"{b.block:5d}  {b.loss_before:11.4g}  {b.loss_after:10.4g}  {b.best_iter:9d}  "
                             f"{steps:>5}  {b.seconds:7.1f}")
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
                dtype=torch.float32, window: int | None = None, world: World = SOLO) -> dict[str, torch.Tensor]:
    """Mean over calibration tokens of each linear's squared input, per input column (matmuls in dtype);
    window: the block's sliding window; x: this rank's share of the samples, the mean is over all."""
    parts: dict[str, list[torch.Tensor]] = {}  # each batch's sums, added in the samples' order over the ranks

    def tap(name: str, t: torch.Tensor) -> None:
        parts.setdefault(name, []).append(t.detach().float().pow(2).reshape(-1, t.shape[-1]).sum(0))

    device = next(iter(params.values())).device
    batched(lambda b: block_forward(cfg, params, b, *rope, tap=tap, window=window), x, batch, dtype, device)
    sums = world.ordered_sums(parts)
    tokens = x.shape[0] * world.size * x.shape[1]
    return {n: s / tokens for n, s in sums.items()}


class BlockTuner:
    """The tunable parameters of one block's linears and the fake-quantized weights they give."""

    def __init__(self, params: dict[str, torch.Tensor], schemes: dict[str, Scheme], device,
                 power: dict[str, torch.Tensor] | None = None, optimizer: str = "signsgd", tune_clip: bool = True):
        """power: each linear's mean squared input per column; given, the clipping starts at clip_search's.
        optimizer: "signsgd" or "adam" (torch.optim.Adam on the same variables); tune_clip False: the
        clipping factors stay at their start, only the rounding offsets move."""
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
            self.min_scale[name] = f_lo.clone().requires_grad_(tune_clip)
            self.max_scale[name] = f_hi.clone().requires_grad_(tune_clip)
            self.clip_max[name] = (f_lo.clamp(min=1.0), f_hi.clamp(min=1.0))
        self.tune_clip = tune_clip
        # recompute the rounding in the backward pass only where keeping it would cost much memory (weights())
        self.recompute = memory.recomputes(sum(params[n + ".weight"].numel() for n in schemes))
        # Adam's moments live here, so that step() stays the one place that updates and bounds
        self.adam = torch.optim.Adam(self.variables()) if optimizer == "adam" else None

    def tensors(self) -> list[torch.Tensor]:
        return [*self.v.values(), *self.min_scale.values(), *self.max_scale.values()]

    def variables(self) -> list[torch.Tensor]:
        """The tensors the steps move: the offsets, and the clipping factors unless they are held."""
        return self.tensors() if self.tune_clip else list(self.v.values())

    def weights(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The block's tensors with every tuned linear fake-quantized under the current parameters, in
        dtype (the matmuls' dtype: the cast autocast would make, made here).

        With self.recompute, each fake-quantized weight is recomputed in the backward pass instead of
        kept: autograd would otherwise hold RECOMPUTE bytes per weight of the rounding's intermediates for
        the whole step, the largest part of a large block's tuning memory. The recomputation repeats the
        same operations, so the gradients are bit for bit those of the kept graph; a small block keeps
        the graph and saves that second rounding (memory.recomputes)."""
        p = dict(self.params)
        for name in self.schemes:
            p[name + ".weight"] = (checkpoint(self.fake_quant, name, dtype, use_reentrant=False) if self.recompute
                                   else self.fake_quant(name, dtype))
        return p

    def fake_quant(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        w = quantize(self.params[name + ".weight"], self.schemes[name], self.v[name], self.min_scale[name],
                     self.max_scale[name], self.ranges[name]).weight
        return w.to(dtype)

    @torch.no_grad()
    def step(self, lr: float) -> None:
        """One update at rate lr (signed gradient descent, or Adam's), then the bounds: [-0.5, 0.5] for the
        offsets, the published [0, 1] for the clipping factors, widened above 1 to the start where
        clip_search began above it."""
        if self.adam is None:
            for t in self.variables():
                t.sub_(lr * t.grad.sign())
        else:
            for group in self.adam.param_groups:
                group["lr"] = lr
            self.adam.step()
        for t in self.v.values():
            t.clamp_(-0.5, 0.5)
        if self.tune_clip:
            for name, tops in self.clip_max.items():
                for t, top in zip((self.min_scale[name], self.max_scale[name]), tops):
                    t.clamp_(min=0.0).copy_(torch.minimum(t, top))
        for t in self.variables():
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


def lr_at(schedule: str, lr0: float, it: int, total: int) -> float:
    """The learning rate of step it (from 0) of total: "linear" decays from lr0 to 0 (SignRound's),
    "constant" stays lr0, "cosine" follows half a cosine period from lr0 to 0. An early stop (patience)
    truncates the schedule: total stays iters."""
    if schedule == "constant":
        return lr0
    if schedule == "cosine":
        return lr0 * (1 + math.cos(math.pi * it / total)) / 2
    return lr0 * (1 - it / total)


def batch_order(g: torch.Generator, n: int, batch: int, order: str = "random") -> Iterator[torch.Tensor]:
    """Training batches of sample indices drawn from g, every sample once before any repeats.
    "random": a permutation of n cut in order, and a new one once every sample has been seen.
    "strata": the samples cut into `batch` contiguous strata of n / batch; each batch takes the next
    sample of every stratum's own permutation, so any contiguous share of whole strata (a data-parallel
    rank's, parallel.py) holds the same number of each batch's samples."""
    if order == "strata":
        k = n // batch
        base = torch.arange(batch) * k
        while True:
            perms = torch.stack([torch.randperm(k, generator=g) for _ in range(batch)], dim=1)  # [k, batch]
            yield from (base + p for p in perms)
    perm, pos = torch.randperm(n, generator=g), 0
    while True:
        if pos + batch > len(perm):
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos : pos + batch]
        pos += batch


HELD_STREAM = 50021  # the fixed batch's seed is the block's plus this: its own stream leaves the training order
Trace = Callable[[str, int, torch.Tensor, float], None]


class Keeper:
    """Which parameters a block keeps (TuneConfig.best) and when patience runs out. A loss offered is
    measured on the tuner's parameters after `it` updates."""

    def __init__(self, rule: str, patience: int):
        self.rule, self.patience = rule, patience
        self.loss, self.iter, self.snapshot = float("inf"), None, None  # the lowest loss offered and its step
        self.measured: int | None = None  # the step of the last loss offered

    def offer(self, loss: float, it: int, tuner: BlockTuner) -> None:
        self.measured = it
        if loss < self.loss:
            self.loss, self.iter = loss, it
            if self.rule != "last":  # "last" follows the loss only for patience
                self.snapshot = tuner.snapshot()

    def keep(self, loss: float, it: int, tuner: BlockTuner) -> None:
        self.loss, self.iter, self.snapshot = loss, it, tuner.snapshot()

    def stale(self, it: int) -> bool:
        """patience steps have passed since the lowest loss offered."""
        return self.patience > 0 and self.iter is not None and it - self.iter >= self.patience


class BlockRun:
    """One block's tuning: its tuner, the activations its losses are measured on, and what it keeps.
    trace, when given, is called as trace(kind, it, idx, loss) with every loss measured: kind "train" for
    a step's batch (sample indices idx), "held" for the fixed batch; the parameters are those after
    `it` updates."""

    def __init__(self, model: Model, i: int, tuner: BlockTuner, x_q: torch.Tensor, y: torch.Tensor, rope,
                 config: TuneConfig, dtype, trace: Trace | None = None, world: World = SOLO):
        """x_q, y: this rank's share of the samples (world.share); the batches are drawn from all of them."""
        self.cfg, self.i, self.tuner, self.x_q, self.y, self.rope = model.cfg, i, tuner, x_q, y, rope
        self.config, self.dtype, self.trace, self.world = config, dtype, trace, world
        self.window, self.device = model.cfg.window(i), next(iter(tuner.params.values())).device
        n = len(x_q) * world.size
        self.batch = min(config.batch_size, n)
        seed = config.seed * 100003 + i  # the batch order of block i depends only on the seed and i
        self.batches = batch_order(torch.Generator().manual_seed(seed), n, self.batch, config.batch_order)
        held = torch.Generator().manual_seed(seed + HELD_STREAM)
        self.held = torch.randperm(n, generator=held)[: self.batch]
        self.keeper = Keeper(config.best, config.patience)

    def loss(self, idx: torch.Tensor) -> torch.Tensor | None:
        """This rank's share of the batch idx's loss: the MSE over the samples it holds, weighted by their
        part of the batch (exactly 1.0 in a single process); None when it holds none."""
        mine = self.world.local(idx, len(self.x_q))
        if len(mine) == 0:
            return None
        return block_loss(self.cfg, self.tuner, to_compute(self.x_q[mine], self.device),
                          to_compute(self.y[mine], self.device), self.rope, self.window, self.dtype
                          ) * (len(mine) / len(idx))

    def held_loss(self, it: int) -> float:
        with torch.no_grad():
            value = self.world.total(self.loss(self.held))
        if self.trace:
            self.trace("held", it, self.held, value)
        return value

    def train(self, progress: bool) -> tuple[float | None, int]:
        """Up to config.iters steps, each loss offered to the keeper as config.best says; the first step's
        loss and the number of updates made."""
        config, keeper, lr0 = self.config, self.keeper, self.config.effective_lr()
        first, steps = None, 0
        bar = tqdm(range(config.iters), desc=f"block {self.i}", leave=False, unit="it", disable=not progress)
        for it in bar:
            idx = next(self.batches)
            loss = self.loss(idx)
            value = self.world.total(loss)
            first = value if first is None else first
            if self.trace:
                self.trace("train", it, idx, value)
            if config.best != "fixed":  # the loss of the parameters before this step's update
                keeper.offer(value, it, self.tuner)
            elif it % config.eval_every == 0:
                keeper.offer(self.held_loss(it), it, self.tuner)
            if keeper.stale(it):
                break
            if loss is not None:
                loss.backward()
            self.world.reduce_grads(self.tuner.variables())
            self.tuner.step(lr_at(config.lr_schedule, lr0, it, config.iters))
            steps += 1
            if it % 10 == 0:
                bar.set_postfix(loss=f"{value:.3g}", best=f"{keeper.loss:.3g}")
        bar.close()
        return first, steps

    def finish(self, steps: int) -> None:
        """The final parameters measured on the fixed batch, where the rule asks: "last" keeps them,
        "fixed" compares them (unless they were just measured)."""
        if self.config.iters == 0:
            return
        if self.config.best == "last":
            self.keeper.keep(self.held_loss(steps), steps, self.tuner)
        elif self.config.best == "fixed" and self.keeper.measured != steps:
            self.keeper.offer(self.held_loss(steps), steps, self.tuner)


def tune_block(model: Model, i: int, params: dict[str, torch.Tensor], x_q: torch.Tensor, y: torch.Tensor, rope,
               config: TuneConfig, dtype, progress: bool, trace: Trace | None = None, world: World = SOLO
               ) -> tuple[dict[str, QuantWeight], BlockLog]:
    """SignRound on block i (params: its float tensors on the tuning device): x_q the quantized model's
    inputs of the block, y the float block's outputs (stored in any dtype, on any device: each step's
    batch moves to the tuning device), this rank's share of them. trace: see BlockRun."""
    t0 = time.perf_counter()
    device = next(iter(params.values())).device
    schemes = {n: config.scheme(f"model.layers.{i}.{n}") for n in model.cfg.family.linears}
    window = model.cfg.window(i)
    power = input_power(model.cfg, params, x_q, rope, config.batch_size, dtype, window,
                        world) if config.searches() else None
    tuner = BlockTuner(params, schemes, device, power, config.optimizer, config.tune_clip)
    run = BlockRun(model, i, tuner, x_q, y, rope, config, dtype, trace, world)
    first_loss, steps = run.train(progress)
    run.finish(steps)
    kept = run.keeper.snapshot
    qweights = {f"model.layers.{i}.{n}": qw for n, qw in tuner.qweights(kept or tuner.snapshot()).items()}
    log = BlockLog(i, first_loss, run.keeper.loss if kept is not None else None,
                   run.keeper.iter if kept is not None else None, round(time.perf_counter() - t0, 2), steps)
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
    """The checkpoint's packing format: ours marking codes that index levels when some layer is on a
    non-uniform grid (checkpoint/format.py), else GPTQ's "zero - 1" when every layer is symmetric (it
    cannot hold an asymmetric layer's zero point of 0), zero points as they are otherwise."""
    names = [f"model.layers.{i}.{n}" for i in range(model.cfg.n_layers) for n in model.cfg.family.linears]
    names += ["lm_head"] if config.quant_lm_head else []
    if any(config.scheme(n).grid != UNIFORM for n in names):
        return GPTQ_LEVELS
    return GPTQ_V1 if all(config.scheme(n).sym for n in names) else GPTQ


def settings_digest(config: TuneConfig, calib: torch.Tensor | None) -> dict[str, str]:
    """What every rank must share: each setting, and the calibration ids (by digest)."""
    ids = "none" if calib is None else digest_of(calib.contiguous().numpy().tobytes())
    return {k: str(v) if k != "layer_schemes" else digest_of(repr(sorted(v.items())).encode())
            for k, v in asdict(config).items()} | {"calibration ids": ids}


def tune(model: Model, calib: torch.Tensor | None, config: TuneConfig, resume: ResumeStore | None = None,
         device: str = "auto", progress: bool = True, act_device: str = "auto", world: World = SOLO) -> TuneResult:
    """Quantize every block's linears (and the lm_head with quant_lm_head). calib: [nsamples, seqlen]
    token ids, unused by plain round-to-nearest (iters 0 without clip_search). resume: where finished
    blocks are kept, and read back instead of tuned again; given, each finished block goes there and is
    not held (result.qweights reads them back from it). Each block's float tensors are read from
    model.tensors once, when the block is reached, and dropped when the next one is read.
    act_device: where the calibration activations are kept, in config.act_dtype ("auto": the tuning
    device, or the CPU where a GPU's free memory would not hold them; memory.py).
    world: the ranks tuning together (parallel.py); each embeds its share of calib, rank 0 alone uses
    the resume store and holds the result (the others' qweights stay empty)."""
    start = time.perf_counter()
    dev = pick_device(device)
    dtype = pick_dtype(dev) if config.iters > 0 else torch.float32
    result = TuneResult(qweights={}, device=str(dev), dtype=str(dtype).replace("torch.", ""))
    world.agree(settings_digest(config, calib) | {"compute dtype": result.dtype})  # one CPU may lack bfloat16
    world.check(config)
    resume = resume if world.root else None
    fingerprint = asdict(config) | {"device": dev.type, "compute_dtype": result.dtype} | world.fingerprint()
    # rank 0 checks the store against this run; its refusal stops every rank
    world.from_root(lambda: resume.begin(fingerprint, packing_format(model, config)) if resume is not None else None)
    cfg = model.cfg

    x = x_q = ropes = y = None
    if config.uses_data():
        store = activation_device(act_device, dev, model, config, progress)
        with torch.no_grad():
            x = model.embed(world.share(calib)).to(store, activation_dtype(config))
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
        saved = world.from_root(lambda: resume.load_block(i) if resume is not None else None)
        if saved is not None:
            qws, log = saved
            result.resumed_blocks += 1
        else:
            if not config.uses_data():
                qws, log = rtn_block(block, model.cfg.family.linears, i, config), BlockLog(i, None, None, None, 0.0)
            else:
                qws, log = tune_block(model, i, params, x_q, y, rope, config, dtype, progress, world=world)
            if resume is not None:
                resume.save_block(i, qws, log)
            world.note_block(i)
        if resume is None and world.root:
            result.qweights.update(qws)
        result.blocks.append(log)
        if config.uses_data():  # the quantized model's inputs of the next block
            qp = quantized_params(params, i, qws, dev)
            x_q = batched(lambda b: block_forward(cfg, qp, b, *rope, window=cfg.window(i)), x_q,
                          config.batch_size, dtype, dev)
            del qp  # not held while the next block is tuned
        if log.loss_before is not None:
            bar.set_postfix_str(f"loss {log.loss_before:.3g} -> {log.loss_after:.3g}")

    if world.root and config.quant_lm_head and not (resume is not None and resume.has("lm_head")):
        # round-to-nearest: tuning it would need the full-vocabulary logits of every sample
        head = {"lm_head": to_qweight(model.lm_head_weight(), config.scheme("lm_head"),
                                      bias=model.tensors.get("lm_head.bias"))}
        if resume is not None:
            resume.save_layers("lm_head", head)
        else:
            result.qweights.update(head)
    if resume is not None:
        result.qweights = resume.qweights()
    result.parallel = world.log()
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = peak_rss_mb()
    return result
