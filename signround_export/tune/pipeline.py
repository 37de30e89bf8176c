"""From a float Hugging Face model folder and settings to a checkpoint folder; and the checkpoint an
exporter reads, rounding a float model to nearest first.

quantize_model() runs, in order:
  1. each layer's scheme: the TuneConfig's for all, or as LayerBits asks: a GGUF type's per-layer grids
     (export/gguf/mixes.py), choices under a byte budget of the target file by measured loss (costs.py,
     allocate.py, kl_probe.py), or bits read from a file;
  2. the calibration windows (data.py), when the tuning, the clip search or the allocation needs them;
  3. SignRound block by block (signround.py), keeping finished work in the resume store (resume.py);
  4. the checkpoint (checkpoint/write.py) with its tuning log and the allocation figure; the resume
     store is removed once the checkpoint is whole.
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from ..checkpoint.format import Checkpoint, QuantConfig
from ..checkpoint.qweight import Scheme
from ..checkpoint.read import read_checkpoint
from ..checkpoint.shards import DEFAULT_SHARD_SIZE, parse_size
from ..checkpoint.write import PackedLayer, float_spec, float_unit, settled_config, write_staged_checkpoint
from ..data import SELF, calibration_ids, calibration_name, calibration_sources, shares
from ..errors import TuneError
from ..export.gguf import mixes
from ..export.gguf.write import check_llama_cpp
from ..model.folder import SELF_CALIBRATION_FILE, resolve_model_dir, safetensors_files
from ..model.forward import Model
from ..model.load import check_checkpoint, float_checkpoint, is_checkpoint, load_float_model, open_checkpoint
from ..plots import plot_allocation
from . import memory, parallel
from .allocate import Allocation, Problem, allocate, read_allocation
from .config import TuneConfig
from .costs import TARGETS, cost_table
from .kl_probe import KLProbe, block_linear_names
from .resume import ResumeStore
from .signround import TuneResult, activation_device, pick_dtype, tune

DEVICES = ("auto", "cpu", "cuda")


def note(progress: bool, message: str) -> None:
    """A line on stderr about what the run does, unless progress output is off."""
    if progress:
        print(message, file=sys.stderr)


def resume_folder(out: str | Path) -> Path:
    """Where a run writing the checkpoint `out` keeps its finished work until the checkpoint is whole."""
    out = Path(out)
    return out.with_name(out.name + ".progress")


@dataclass
class LayerBits:
    """How each decoder-block linear's grid is chosen when not one scheme for all: at most one of a GGUF
    type (its per-layer grids), a byte budget of a target file (choices by measured loss, allocate.py),
    an allocation file (bits per layer)."""

    gguf: str | None = None  # a type of mixes.TYPES, any case
    target: str | None = None  # "onnx" or "gguf": the file whose bytes the budget counts (costs.py)
    size_mb: float | None = None  # megabytes (10^6 bytes) of the decoder-block linears in that file
    avg_bits: float | None = None  # or their bits per weight in that file
    allocation: str | Path | None = None  # JSON {"bits": {layer: bits}}
    probe_windows: int = 4  # calibration windows the allocation's KL is measured on

    def budget_given(self) -> bool:
        return self.size_mb is not None or self.avg_bits is not None

    def check(self, scheme_given: list[str] = ()) -> None:
        """Refuse choices that clash; scheme_given: the parameters among bits, group_size, sym set by hand."""
        if self.gguf is not None:
            if self.gguf.upper() not in mixes.TYPES:
                raise TuneError(f"`gguf` {self.gguf!r}: choose one of {', '.join(t.lower() for t in mixes.TYPES)}",
                                param="gguf")
            clash = [f"`{p}`" for p in scheme_given] or [
                f"`{p}`" for p in ("target", "size_mb", "avg_bits", "allocation") if getattr(self, p) is not None]
            if clash:
                raise TuneError(f"`gguf` sets every layer's bits and grid; it cannot be combined with "
                                f"{', '.join(clash)}", param="gguf")
        if self.size_mb is not None and self.avg_bits is not None:
            raise TuneError("give `size_mb` or `avg_bits` (the same budget in other units), not both", param="size_mb")
        if self.budget_given() and self.allocation is not None:
            raise TuneError("give a budget (`size_mb` or `avg_bits`: choices by measured loss) or `allocation` "
                            "(bits from a file), not both", param="allocation")
        for name in ("size_mb", "avg_bits"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise TuneError(f"`{name}` {getattr(self, name)}: give a positive budget", param=name)
        if self.budget_given() and self.target not in TARGETS:
            raise TuneError(f"`target` {self.target!r}: a budget counts the bytes of one file; choose one of "
                            f"{', '.join(TARGETS)}", param="target")
        if self.target is not None and not self.budget_given():
            raise TuneError(f"`target` {self.target}: give the budget, `size_mb` or `avg_bits`", param="target")
        if self.probe_windows <= 0:
            raise TuneError(f"`probe_windows` {self.probe_windows}: give a positive number", param="probe_windows")

    def allocation_settings(self, config: TuneConfig, calib: str | Path | None) -> dict:
        """What an allocation depends on: a saved one is reused only when all of it is the same."""
        return {"target": self.target, "size_mb": self.size_mb, "avg_bits": self.avg_bits,
                "probe_windows": self.probe_windows, "sym": config.sym, "nsamples": config.nsamples,
                "seqlen": config.seqlen, "seed": config.seed, "calib": str(calib),
                "calib_windows": config.calib_windows}


@dataclass
class QuantizeResult:
    """What quantize_model wrote and how the tuning went."""

    checkpoint: Path
    config: TuneConfig  # the settings every layer was tuned with (config.scheme(layer))
    tuning: TuneResult
    allocation: Allocation | None = None  # the choices made under LayerBits' budget
    written: bool = True  # False on the ranks other than 0 of a parallel run: they write nothing

    def summary(self) -> str:
        return self.tuning.summary()


def quantize_model(model: str | Path, out: str | Path, config: TuneConfig, layer_bits: LayerBits | None = None,
                   *, recipe: str = "best", calib: str | Path | None = None, device: str = "auto",
                   progress: bool = True, act_device: str = "auto",
                   shard_size: int | str = DEFAULT_SHARD_SIZE, dp_reduce: str = "sum") -> QuantizeResult:
    """Tune the float model folder (or hub id) `model` and write its checkpoint folder `out` atomically.

    config: the tuning settings (config.layer_schemes is filled in here from layer_bits); recipe: the
    recipe's name, for the log; calib: the calibration spec of data.calibration_ids (default: Python's
    pydoc_data.topics); `self`'s generated ids are kept in `out`.progress during the run and in the
    checkpoint folder (SELF_CALIBRATION_FILE) after it. A killed run resumes from `out`.progress when
    started again with the same settings. act_device: where the calibration activations are kept
    (signround.activation_device). The checkpoint's weights are written in shards of at most shard_size
    ("5GB": one model.safetensors when everything fits), made in `out`.progress from the finished blocks.

    Under torchrun (parallel.py) every rank tunes its share of the samples; rank 0 alone computes the
    calibration ids and the allocation (the others receive them), writes the resume store and the
    checkpoint, and returns the whole result; the others return written=False. dp_reduce: how the
    ranks' gradients are combined, "sum" or "sign" (parallel.DP_REDUCES)."""
    layer_bits = layer_bits or LayerBits()
    layer_bits.check()
    config.check()
    check_devices(device, act_device)
    parse_size(shard_size)  # a bad size is refused before the tuning, not after
    name = calibration_name(calib)  # as the log and the resume store record it; a bad spec is refused here
    calib = calib if isinstance(calib, Path) else name if calib else None  # a Path is one file, commas and all
    with parallel.joined(device, dp_reduce) as world:
        world.agree(asdict(config) | asdict(layer_bits) | dict(recipe=recipe, calib=calib, device=device,
                                                               act_device=act_device, shard_size=shard_size))
        world.check(config)
        progress = progress and world.root
        note(progress, f"recipe {recipe}: " + ", ".join(f"{f.name}={getattr(config, f.name)}" for f in fields(config)))
        float_model, hf, folder = load_float_model(model)
        if layer_bits.gguf is not None or layer_bits.target == "gguf":  # for the GGUF file: refuse before tuning
            # the config as the checkpoint will say it: a quantized head unties a tied model (untied())
            tied = float_model.cfg.tie_word_embeddings and not config.quant_lm_head
            check_llama_cpp(replace(float_model.cfg, tie_word_embeddings=tied), param="gguf" if layer_bits.gguf else "target")
        resume = ResumeStore(resume_folder(out), shard_size, name)

        def calibrate() -> tuple:  # rank 0's: it reads and writes the resume folder
            ids = None
            if config.uses_data() or layer_bits.budget_given():
                ids = calibration_ids(folder, config.nsamples, config.seqlen, config.seed, calib,
                                      config.calib_windows, cache_dir=resume.folder, progress=progress)
            allocation = set_layer_schemes(float_model, ids, config, layer_bits, calib, resume, progress)
            return ids, allocation, config

        ids, allocation, config = world.from_root(calibrate)
        result = tune(float_model, ids, config, resume, device=device, progress=progress, act_device=act_device,
                      world=world)
    if not world.root:
        return QuantizeResult(Path(out), config, result, allocation, written=False)
    log = result.log(config) | {"source_model": str(Path(model)), "recipe": recipe,
                                "calibration": name}
    if allocation is not None:
        log["allocation"] = allocation.to_json()
    layers = resume.layers()
    quant, floats = checkpoint_parts(float_model, config, layers, resume.packing_format)
    units = resume.units() + [float_unit(n, float_spec(float_model.tensors, n), float_model.tensors) for n in floats]
    write_staged_checkpoint(out, untied(hf, layers), quant, units, resume.folder, lambda _: resume.prune(),
                            tokenizer_src_dir=folder, tuning_log=log, shard_size=shard_size,
                            extra_files=generated_calibration(resume, calib, ids))
    if allocation is not None:
        plot_allocation(allocation, Path(out) / "allocation.png")
    resume.remove()
    result.qweights = read_checkpoint(out).qweights  # the store is gone: read the layers from the checkpoint
    return QuantizeResult(Path(out), config, result, allocation)


def generated_calibration(resume: ResumeStore, calib: str | None, ids) -> list[Path]:
    """The ids `calib self` generated into the resume folder, which the checkpoint keeps; else none."""
    path = resume.folder / SELF_CALIBRATION_FILE
    return [path] if ids is not None and SELF in calibration_sources(calib) and path.is_file() else []


def check_devices(device: str, act_device: str) -> None:
    """Refuse a device (of the blocks, of the activations) not among DEVICES."""
    for name, value in (("device", device), ("act_device", act_device)):
        if value not in DEVICES:
            raise TuneError(f"`{name}` {value!r}: choose one of {', '.join(DEVICES)}", param=name)


def plan_memory(model: str | Path, config: TuneConfig, *, device: str = "auto", act_device: str = "auto",
                calib: str | Path | None = None, ranks: int | None = None) -> memory.MemoryPlan:
    """What tuning the float model folder `model` with config would hold, part by part, from its
    config.json and safetensors headers alone (no weight is read). device "cuda" plans for a GPU even on
    a machine without one; there, "auto" activations are counted on the GPU. ranks: one process's part
    of a data-parallel run of that many (None: torchrun's WORLD_SIZE, 1 outside torchrun)."""
    config.check()
    check_devices(device, act_device)
    ranks = parallel.world_size() if ranks is None else ranks
    if ranks < 1:
        raise TuneError(f"`ranks` {ranks}: give the number of data-parallel processes, 1 or more", param="ranks")
    parallel.World(size=ranks).check(config)  # the share must divide as the run would require
    float_model, _, folder = load_float_model(model)
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    dtype = pick_dtype(dev) if config.iters > 0 else torch.float32
    if dev.type == "cpu" or torch.cuda.is_available():  # where tune() would put them
        acts = activation_device(act_device, dev, float_model, config, progress=False).type
    else:  # planning for a GPU this machine lacks: "auto" counts them on it
        acts = "cpu" if act_device == "cpu" else "cuda"
    shapes = memory.tensor_shapes(float_model.tensors)
    plan = memory.plan(float_model.cfg, shapes, config, dev.type, dtype, "gpu" if acts == "cuda" else "cpu",
                       memory.process_bytes(), ranks)
    sources = calibration_sources(calib)
    if config.uses_data() and SELF in sources:
        sequences = shares(config.nsamples, len(sources))[sources.index(SELF)]
        files = sum(f.stat().st_size for f in safetensors_files(folder))
        plan.parts.insert(1, memory.self_calibration_part(float_model.cfg, shapes, sequences, config.seqlen,
                                                          pick_dtype(torch.device("cpu")), files))
    return plan


def set_layer_schemes(model: Model, ids, config: TuneConfig, layer_bits: LayerBits, calib: str | None,
                      resume: ResumeStore, progress: bool) -> Allocation | None:
    """Fill config.layer_schemes as layer_bits asks; the Allocation when a budget chooses them."""
    allocation = None
    if layer_bits.budget_given():
        shapes = linear_shapes(model)
        table = cost_table(layer_bits.target, shapes, config.sym)
        allocation = allocate_choices(model, ids, table, shapes, layer_bits,
                                      layer_bits.allocation_settings(config, calib), resume, progress)
        config.layer_schemes = {n: table[n][c][0].scheme for n, c in allocation.choices.items()}
    elif layer_bits.gguf is not None:
        config.layer_schemes = gguf_schemes(model, layer_bits.gguf.upper(), progress)
    else:
        if layer_bits.allocation is not None:
            bits = read_allocation(layer_bits.allocation, block_linear_names(model))
            config.layer_schemes = {n: Scheme(b, config.group_size, config.sym) for n, b in bits.items()}
        return None
    # a budget's or a GGUF type's grids: the config states the commonest scheme
    common = Counter(config.layer_schemes.values()).most_common(1)[0][0]
    config.bits, config.group_size, config.sym, config.grid = common.bits, common.group_size, common.sym, common.grid
    return allocation


def linear_shapes(model: Model) -> dict[str, tuple[int, int]]:
    """[N, K] of every decoder-block linear, from the headers."""
    return {n: tuple(model.tensors.shape(n + ".weight")) for n in block_linear_names(model)}


def gguf_schemes(model: Model, gguf_type: str, progress: bool) -> dict[str, Scheme]:
    """Every decoder-block linear's grid: the Scheme of the GGUF type llama.cpp writes it as."""
    shapes = linear_shapes(model)
    cfg = model.cfg
    gqa = cfg.n_heads // cfg.n_kv_heads
    types = mixes.layer_types(gguf_type, shapes, cfg.n_layers, gqa)
    note(progress, f"gguf {gguf_type.lower()}: "
                   + ", ".join(f"{c} layers {t}" for t, c in Counter(types.values()).most_common()))
    return mixes.layer_schemes(types)


def allocate_choices(model: Model, ids, table, shapes: dict[str, tuple[int, int]], layer_bits: LayerBits,
                     settings: dict, resume: ResumeStore, progress: bool) -> Allocation:
    """A choice per decoder-block linear under layer_bits' budget (allocate.py), kept in the resume store so
    that a resumed run tunes the same allocation."""
    saved = resume.load_allocation(settings)
    if saved is not None:
        note(progress, f"allocation read from {resume.folder / 'allocation.json'}")
        return saved
    weights = sum(n * k for n, k in shapes.values())
    param = "size_mb" if layer_bits.size_mb is not None else "avg_bits"
    budget = layer_bits.size_mb * 1e6 if param == "size_mb" else layer_bits.avg_bits * weights / 8
    Problem.of(table).check_budget(budget, f"`{param}` {getattr(layer_bits, param)}", param)  # before the probe
    probe = KLProbe(model, ids[: layer_bits.probe_windows])
    allocation = allocate(probe, table, shapes, budget, layer_bits.target, note=lambda m: note(progress, m))
    note(progress, allocation.table())
    resume.save_allocation(settings, allocation)
    return allocation


def checkpoint_parts(model: Model, config: TuneConfig, layers: dict[str, PackedLayer], packing_format: str
                     ) -> tuple[QuantConfig, list[str]]:
    """The settled QuantConfig, and the names of the float tensors that go beside the tuned integers
    into a checkpoint. packing_format: the one the resume store packed the layers in (tune())."""
    quantized = {n + suffix for n in layers for suffix in (".weight", ".bias")}
    floats = [n for n in model.tensors if n not in quantized]
    if model.cfg.tie_word_embeddings and "lm_head.weight" in floats:
        floats.remove("lm_head.weight")
    quant = QuantConfig(bits=config.bits, group_size=config.group_size, sym=config.sym,
                        packing_format=packing_format, extra_config={}, iters=config.iters, tuning=asdict(config),
                        grid=config.grid)
    return settled_config(quant, layers, {n: float_spec(model.tensors, n) for n in floats}), floats


def untied(hf: dict, qweights: Mapping) -> dict:
    """config.json for a checkpoint: a quantized lm_head is no longer the embedding's matrix, so a tied
    model's config says untied (auto-round's loader refuses a quantized head under tied embeddings)."""
    if "lm_head" in qweights and hf.get("tie_word_embeddings"):
        return hf | {"tie_word_embeddings": False}
    return hf


@contextmanager
def export_source(source: str | Path | Checkpoint, *, bits: int = 4, group_size: int = 32, sym: bool = True,
                  progress: bool = True, verify: bool = True) -> Iterator[Checkpoint]:
    """The Checkpoint an exporter reads: a Checkpoint as is; a checkpoint folder, read (its tensors checked
    against their digests unless verify is False); a float model folder rounded to nearest at bits /
    group_size / sym (a checkpoint in a temporary folder, removed when the block ends), or at bits 16 its
    float weights."""
    if isinstance(source, Checkpoint):
        check_checkpoint(source)
        yield source
        return
    folder = resolve_model_dir(source)
    if is_checkpoint(folder):
        yield open_checkpoint(folder, verify)
    elif bits == 16:
        yield float_checkpoint(folder)
    else:
        note(progress, f"{folder} is a float model: rounding to nearest at W{bits} group {group_size} "
                       f"{'symmetric' if sym else 'asymmetric'} first")
        config = TuneConfig.from_recipe("best", bits=bits, group_size=group_size, sym=sym, iters=0)
        with tempfile.TemporaryDirectory(prefix="signround-rtn-") as tmp:
            # the folder's name is the model's name in a GGUF file when config.json gives none
            quantize_model(folder, Path(tmp) / "rtn", config, progress=False)
            yield read_checkpoint(Path(tmp) / "rtn")
