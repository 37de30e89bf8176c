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

Each finished block is persisted, so a killed run resumes from the last finished block and ends
with the same integers (the batch order of block i depends only on the seed and i).
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from ..checkpoint.qweight import QuantWeight, Scheme
from ..fileio import atomic_file
from ..model.config import BLOCK_LINEARS
from ..model.forward import Model, block_forward
from .quantizer import dequantize, group_range, grouped, quantize, to_qweight


@dataclass
class TuneArgs:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    iters: int = 200
    nsamples: int = 128
    seqlen: int = 512
    batch_size: int = 8
    lr: float | None = None  # None: 1 / iters
    seed: int = 42
    quant_lm_head: bool = False
    # start the clipping at the input-weighted best factor (clip_search); None: when iters > 0. With
    # iters 0 and clip_search True, the search's start is the result (no SignRound steps).
    clip_search: bool | None = None
    layer_schemes: dict[str, Scheme] = field(default_factory=dict)  # layer name -> scheme, where not the above

    def scheme(self, layer: str | None = None) -> Scheme:
        return self.layer_schemes.get(layer) or Scheme(self.bits, self.group_size, self.sym)

    def searches(self) -> bool:
        return self.clip_search if self.clip_search is not None else self.iters > 0

    def uses_data(self) -> bool:
        return self.iters > 0 or self.searches()

    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.iters, 1)


@dataclass
class BlockLog:
    block: int
    loss_before: float | None  # MSE at RTN (step 0)
    loss_after: float | None  # best MSE kept
    best_iter: int | None
    seconds: float


@dataclass
class TuneResult:
    qweights: dict[str, QuantWeight]
    blocks: list[BlockLog] = field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    dtype: str = "float32"
    device: str = "cpu"
    resumed_blocks: int = 0

    def log(self, args: TuneArgs) -> dict:
        return {
            "args": asdict(args) | {"lr": args.effective_lr()},
            "device": self.device,
            "compute_dtype": self.dtype,
            "seconds": round(self.seconds, 2),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "resumed_blocks": self.resumed_blocks,
            "blocks": [asdict(b) for b in self.blocks],
        }


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available (use --device cpu or auto)")
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


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress:
    """Finished blocks on disk: `block_NNN.safetensors` plus the arguments they were tuned with."""

    def __init__(self, folder: Path, fingerprint: dict):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        args_file = self.folder / "args.json"
        if args_file.is_file():
            saved = json.loads(args_file.read_text())
            if saved != fingerprint:
                diff = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
                raise ValueError(
                    f"{self.folder} holds a run with different settings ({', '.join(diff)}); "
                    "rerun with the same arguments to resume, or delete that folder to start over"
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_file(args_file) as tmp:
                tmp.write_text(json.dumps(fingerprint, indent=2, sort_keys=True))

    def path(self, i: int) -> Path:
        return self.folder / f"block_{i:03d}.safetensors"

    def load(self, i: int) -> tuple[dict[str, QuantWeight], BlockLog] | None:
        path = self.path(i)
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata()
        arrays = load_file(str(path))
        qweights = {}
        for name, info in json.loads(meta["layers"]).items():
            qweights[name] = QuantWeight(
                q=arrays[name + ".q"], scale=arrays[name + ".scale"], zero=arrays[name + ".zero"],
                bias=arrays.get(name + ".bias"), offset=arrays.get(name + ".offset"), **info,
            )
        return qweights, BlockLog(**json.loads(meta["log"]))

    def save(self, i: int, qweights: dict[str, QuantWeight], log: BlockLog) -> None:
        arrays, layers = {}, {}
        for name, qw in qweights.items():
            arrays |= {name + ".q": qw.q, name + ".scale": qw.scale, name + ".zero": qw.zero}
            for key, value in (("bias", qw.bias), ("offset", qw.offset)):
                if value is not None:
                    arrays[f"{name}.{key}"] = value
            layers[name] = {"bits": qw.bits, "group_size": qw.group_size, "sym": qw.sym}
        meta = {"layers": json.dumps(layers), "log": json.dumps(asdict(log))}
        with atomic_file(self.path(i)) as tmp:
            # safetensors writes a non-contiguous numpy view scrambled: hand it contiguous arrays
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp), metadata=meta)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def clip_candidates(scheme: Scheme, w_range) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (factor of lo, factor of hi) pairs per group that clip_search tries: the step becomes
    range / (n + 0.1 i), the range end moving by at most about one code, as importance-matrix
    quantizers search it. Deeper clipping lowers the input-weighted error further but measured worse
    perplexity (docs/benchmarks.md).
    Symmetric (n = 2^(bits-1), i in -9..9): both ends scale together.
    Asymmetric (n = 2^bits - 1, i in -10..10): lo stays, hi moves (hi stays where it is 0); this
    includes, at i = -1, the grid of half the step, where a model shipped on a coarser grid lies."""
    lo, hi = w_range
    if scheme.sym:
        m = 2 ** (scheme.bits - 1)
        return [(torch.full_like(lo, m / (m + 0.1 * i)),) * 2 for i in range(-9, 10)]
    maxq = 2**scheme.bits - 1
    out = []
    for i in range(-10, 11):
        r = maxq / (maxq + 0.1 * i)  # new range / old range
        f_hi = ((lo + (hi - lo) * r) / torch.where(hi > 0, hi, 1)).clamp(min=0)
        out.append((torch.where(hi > 0, 1.0, r), torch.where(hi > 0, f_hi, 1.0)))
    return out


def group_power(power: torch.Tensor, n: int, group: int) -> torch.Tensor:
    """Per-column input power [K] as per-weight weights [N, G, group] (padding weighs 0)."""
    return grouped(power.expand(n, -1), group)


def ls_factor(w: torch.Tensor, scheme: Scheme, f: torch.Tensor, power_g: torch.Tensor, w_range) -> torch.Tensor:
    """The factor whose scale is the input-weighted least-squares scale for the codes that f gives:
    s = sum p * w * c / sum p * c^2 over a group, c the signed codes (symmetric grids only)."""
    _, q, scale, zero = quantize(w, scheme, None, f, f, w_range)
    c = q - zero[..., None]
    wg = grouped(w, scheme.resolved_group(w.shape[1]))
    den = (power_g * c * c).sum(-1)
    s = torch.where(den > 0, (power_g * wg * c).sum(-1) / den.clamp(min=1e-30), scale)
    return (f * s / scale).clamp(0.3, 1.5)


def ls_range(w: torch.Tensor, scheme: Scheme, f_lo: torch.Tensor, f_hi: torch.Tensor, power_g: torch.Tensor,
             w_range):
    """Asymmetric grids: the factors (of lo, of hi) of the input-weighted least-squares line through the
    codes q that (f_lo, f_hi) give, w ~ s * q - o: the range it spans is lo = -o, hi = s * (2^b - 1) - o."""
    _, q, _, _ = quantize(w, scheme, None, f_lo, f_hi, w_range)
    wg = grouped(w, scheme.resolved_group(w.shape[1]))
    sp, sq, sqq = power_g.sum(-1), (power_g * q).sum(-1), (power_g * q * q).sum(-1)
    sw, sqw = (power_g * wg).sum(-1), (power_g * q * wg).sum(-1)
    det = sp * sqq - sq * sq
    ok = det > 1e-12 * sp * sqq  # codes that are all alike fit no line: keep f there
    s = (sp * sqw - sq * sw) / torch.where(ok, det, 1)
    o = (s * sq - sw) / sp.clamp(min=1e-30)
    lo, hi = w_range
    f_lo = torch.where(ok & (lo < 0), -o / torch.where(lo < 0, lo, -1), f_lo)
    f_hi = torch.where(ok & (hi > 0), (s * (2**scheme.bits - 1) - o) / torch.where(hi > 0, hi, 1), f_hi)
    return f_lo.clamp(0.3, 1.5), f_hi.clamp(0.3, 1.5)


@torch.no_grad()
def clip_search(w: torch.Tensor, scheme: Scheme, power: torch.Tensor, w_range) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the clipping factors (of the range's low end, of its high end) whose rounded weight has
    the least output error, sum over k of power[k] * (W - Q(W))^2: the weighted scale search that
    importance-matrix quantizers do, used here as SignRound's starting point. Candidates:
    clip_candidates, and each one's least-squares refinement (ls_factor, ls_range)."""
    group = scheme.resolved_group(w.shape[1])
    power_g = group_power(power, w.shape[0], group)
    best_err = best = None
    for f_lo, f_hi in clip_candidates(scheme, w_range):
        if scheme.sym:
            refined = ls_factor(w, scheme, f_lo, power_g, w_range)
            cands = ((f_lo, f_hi), (refined, refined))
        else:
            cands = ((f_lo, f_hi), ls_range(w, scheme, f_lo, f_hi, power_g, w_range))
        for cand in cands:
            err = ((grouped(w - quantize(w, scheme, None, *cand, w_range)[0], group)) ** 2 * power_g).sum(-1)
            if best is None:
                best_err, best = err, cand
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = tuple(torch.where(better, c, b) for c, b in zip(cand, best))
    return best


def input_power(cfg, params: dict[str, torch.Tensor], x: torch.Tensor, rope, batch: int,
                dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Mean over calibration tokens of each linear's squared input, per input column (matmuls in dtype)."""
    sums: dict[str, torch.Tensor] = {}

    def tap(name: str, t: torch.Tensor) -> None:
        s = t.detach().float().pow(2).reshape(-1, t.shape[-1]).sum(0)
        sums[name] = sums[name] + s if name in sums else s

    batched(lambda b: block_forward(cfg, params, b, *rope, tap=tap), x, batch, dtype)
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

    def weights(self) -> dict[str, torch.Tensor]:
        """The block's tensors with every tuned linear fake-quantized under the current parameters."""
        p = dict(self.params)
        for name, scheme in self.schemes.items():
            p[name + ".weight"] = quantize(p[name + ".weight"], scheme, self.v[name], self.min_scale[name],
                                           self.max_scale[name], self.ranges[name])[0]
        return p

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


def batched(fn, x: torch.Tensor, batch: int, dtype) -> torch.Tensor:
    """fn over x in batches, without gradients, its matmuls in dtype; float32 results."""
    with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return torch.cat([fn(x[i : i + batch]).float() for i in range(0, len(x), batch)])


def tune_block(model: Model, i: int, x_q: torch.Tensor, y: torch.Tensor, rope, args: TuneArgs, dtype,
               progress: bool) -> tuple[dict[str, QuantWeight], BlockLog]:
    t0 = time.perf_counter()
    device = x_q.device
    params = {n: t.to(device) for n, t in model.block_params(i).items()}
    schemes = {n: args.scheme(f"model.layers.{i}.{n}") for n in BLOCK_LINEARS}
    power = input_power(model.cfg, params, x_q, rope, args.batch_size, dtype) if args.searches() else None
    tuner = BlockTuner(params, schemes, device, power)
    g = torch.Generator().manual_seed(args.seed * 100003 + i)
    lr0, batch = args.effective_lr(), min(args.batch_size, len(x_q))
    order, pos = torch.randperm(len(x_q), generator=g), 0
    best, best_loss, best_iter, first_loss = None, float("inf"), None, None
    bar = tqdm(range(args.iters), desc=f"block {i}", leave=False, unit="it", disable=not progress)
    for it in bar:
        if pos + batch > len(order):  # reshuffle once every sample has been seen
            order, pos = torch.randperm(len(x_q), generator=g), 0
        idx = order[pos : pos + batch]
        pos += batch
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = block_forward(model.cfg, tuner.weights(), x_q[idx], *rope)
        loss = F.mse_loss(out.float(), y[idx])
        value = loss.item()
        if first_loss is None:
            first_loss = value
        if value < best_loss:  # the loss of the parameters before this step's update
            best_loss, best_iter, best = value, it, tuner.snapshot()
        loss.backward()
        tuner.step(lr0 * (1 - it / args.iters))
        if it % 10 == 0:
            bar.set_postfix(loss=f"{value:.3g}", best=f"{best_loss:.3g}")
    bar.close()
    kept = best if best is not None else tuner.snapshot()  # iters 0: clip_search's start as is
    qweights = {f"model.layers.{i}.{n}": qw for n, qw in tuner.qweights(kept).items()}
    log = BlockLog(i, first_loss, best_loss if best is not None else None, best_iter,
                   round(time.perf_counter() - t0, 2))
    return qweights, log


def rtn_block(model: Model, i: int, args: TuneArgs) -> dict[str, QuantWeight]:
    """Round-to-nearest integers of one block's linears."""
    p = model.block_params(i)
    names = {n: f"model.layers.{i}.{n}" for n in BLOCK_LINEARS}
    return {name: to_qweight(p[n + ".weight"], args.scheme(name), bias=p.get(n + ".bias")) for n, name in names.items()}


def quantized_params(model: Model, i: int, qweights: dict[str, QuantWeight], device) -> dict[str, torch.Tensor]:
    p = {n: t.to(device) for n, t in model.block_params(i).items()}
    for name, qw in qweights.items():
        p[name.split(f"model.layers.{i}.", 1)[-1] + ".weight"] = dequantize(qw, device)
    return p


def tune(model: Model, calib: torch.Tensor | None, args: TuneArgs, progress_dir: Path | None = None,
         device: str = "auto", progress: bool = True) -> TuneResult:
    """Quantize every block's linears (and the lm_head with quant_lm_head). calib: [nsamples, seqlen]
    token ids, unused by plain round-to-nearest (iters 0 without clip_search)."""
    start = time.perf_counter()
    dev = pick_device(device)
    dtype = pick_dtype(dev) if args.iters > 0 else torch.float32
    result = TuneResult(qweights={}, device=str(dev), dtype=str(dtype).replace("torch.", ""))
    fingerprint = asdict(args) | {"device": dev.type, "compute_dtype": result.dtype}
    store = Progress(progress_dir, fingerprint) if progress_dir is not None else None
    cfg = model.cfg

    x = x_q = rope = y = None
    if args.uses_data():
        with torch.no_grad():
            x = model.embed(calib).to(dev)
        x_q = x.clone()
        rope = tuple(t.to(dev) for t in model.rope(calib.shape[1]))

    bar = tqdm(range(cfg.n_layers), desc="tuning", unit="block", disable=not progress)
    for i in bar:
        if args.iters > 0:  # the float block's outputs: targets of this block, inputs of the next
            fp = {n: t.to(dev) for n, t in model.block_params(i).items()}
            y = batched(lambda b: block_forward(cfg, fp, b, *rope), x, args.batch_size, dtype)
        saved = store.load(i) if store else None
        if saved is not None:
            qws, log = saved
            result.resumed_blocks += 1
        else:
            if not args.uses_data():
                qws, log = rtn_block(model, i, args), BlockLog(i, None, None, None, 0.0)
            else:
                qws, log = tune_block(model, i, x_q, y, rope, args, dtype, progress)
            if store:
                store.save(i, qws, log)
        result.qweights.update(qws)
        result.blocks.append(log)
        if args.uses_data():  # the quantized model's inputs of the next block
            qp = quantized_params(model, i, qws, dev)
            x_q = batched(lambda b: block_forward(cfg, qp, b, *rope), x_q, args.batch_size, dtype)
            x = y
        if log.loss_before is not None:
            bar.set_postfix_str(f"loss {log.loss_before:.3g} -> {log.loss_after:.3g}")

    if args.quant_lm_head:
        # round-to-nearest: tuning it would need the full-vocabulary logits of every sample
        result.qweights["lm_head"] = to_qweight(model.lm_head_weight(), args.scheme("lm_head"),
                                                bias=model.tensors.get("lm_head.bias"))
    result.seconds = time.perf_counter() - start
    result.peak_rss_mb = peak_rss_mb()
    return result


def summary(result: TuneResult) -> str:
    lines = [f"tuned {len(result.blocks)} blocks in {result.seconds:.1f} s on {result.device} ({result.dtype}), "
             f"peak RSS {result.peak_rss_mb:.0f} MB" + (f", {result.resumed_blocks} resumed" if result.resumed_blocks else "")]
    tuned = [b for b in result.blocks if b.loss_before is not None]
    if tuned:
        lines.append("block  loss before  loss after  best iter  seconds")
        for b in tuned:
            lines.append(f"{b.block:5d}  {b.loss_before:11.4g}  {b.loss_after:10.4g}  {b.best_iter:9d}  {b.seconds:7.1f}")
    return "\n".join(lines)

