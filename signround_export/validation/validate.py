"""`signround validate`: how far each deployed file is from the PyTorch reference of its checkpoint.

Every model (the float source when present, the reference, each artifact) is run over the same token
windows (non-overlapping, no BOS). From the logits at every position:

| figure   | definition                                                              |
| -------- | ----------------------------------------------------------------------- |
| ppl      | exp(mean next-token negative log-likelihood) of the model itself        |
| top1     | fraction of positions where argmax equals the reference's argmax        |
| kl_mean  | mean over positions of KL(reference || model) of the next-token softmax |
| kl_max   | the largest of those                                                    |

Artifacts fail when kl_mean > max_kl, top1 < min_top1, ppl above the reference's by more than
max_ppl_increase (relative), or when a layer the format holds exactly differs from the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # token ids [T] -> float32 logits [T, V]


@dataclass
class Thresholds:
    max_kl: float = 0.02
    min_top1: float = 0.90
    max_ppl_increase: float = 0.03  # relative to the reference's perplexity


@dataclass
class Scores:
    ppl: float
    top1: float | None = None  # None for the reference itself
    kl_mean: float | None = None
    kl_max: float | None = None
    tokens: int = 0


@dataclass
class ArtifactReport:
    name: str  # "reference", "float", "onnx", "gguf"
    path: str
    runner: str  # what produced the logits, with versions
    scores: Scores  # top-1 and KL against the reference
    vs_float: Scores | None = None  # top-1 and KL against the float source model, when present
    layer_errors: dict[str, float] = field(default_factory=dict)  # layer -> max over weights of |W - W_ckpt| / its group scale
    exact_layers: list[str] = field(default_factory=list)  # layers whose format holds the integers exactly
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class Accumulator:
    """Running sums of the figures above over windows, against a reference's logits."""

    def __init__(self):
        self.nll = 0.0
        self.agree = 0
        self.kl_sum = 0.0
        self.kl_max = 0.0
        self.count = 0

    def add(self, ids: torch.Tensor, logits: torch.Tensor, ref_logits: torch.Tensor | None) -> None:
        logp = F.log_softmax(logits[:-1].float(), dim=-1)
        self.nll += float(-logp.gather(1, ids[1:, None]).sum())
        self.count += len(ids) - 1
        if ref_logits is not None:
            ref = F.log_softmax(ref_logits[:-1].float(), dim=-1)
            kl = (ref.exp() * (ref - logp)).sum(-1).clamp(min=0)
            self.kl_sum += float(kl.sum())
            self.kl_max = max(self.kl_max, float(kl.max()))
            self.agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())

    def scores(self, against_reference: bool) -> Scores:
        n = max(self.count, 1)
        if not against_reference:
            return Scores(ppl=math.exp(self.nll / n), tokens=self.count)
        return Scores(ppl=math.exp(self.nll / n), top1=self.agree / n, kl_mean=self.kl_sum / n, kl_max=self.kl_max,
                      tokens=self.count)


def compare(windows: torch.Tensor, models: dict[str, LogitsFn], pairs: list[tuple[str, str]],
            progress: Iterable | None = None) -> dict[tuple[str, str | None], Scores]:
    """Scores over the windows [n, T]: (name, None) for each model alone (perplexity), (name, other) for
    each pair compared (top-1 and KL against `other`)."""
    accs = {(name, None): Accumulator() for name in models} | {pair: Accumulator() for pair in pairs}
    for w in (progress if progress is not None else windows):
        logits = {name: fn(w) for name, fn in models.items()}
        for (name, other), acc in accs.items():
            acc.add(w, logits[name], None if other is None else logits[other])
    return {key: acc.scores(key[1] is not None) for key, acc in accs.items()}


def judge(report: ArtifactReport, reference: Scores, t: Thresholds) -> None:
    """Fill report.failures with every threshold the artifact misses, each naming the figure."""
    s = report.scores
    if s.kl_mean is not None and s.kl_mean > t.max_kl:
        report.failures.append(f"mean KL {s.kl_mean:.3g} > --max-kl {t.max_kl:g}")
    if s.top1 is not None and s.top1 < t.min_top1:
        report.failures.append(f"top-1 agreement {s.top1:.4f} < --min-top1 {t.min_top1:g}")
    increase = s.ppl / reference.ppl - 1
    if increase > t.max_ppl_increase:
        report.failures.append(f"perplexity {s.ppl:.4f} is {100 * increase:.2f}% above the reference's "
                               f"{reference.ppl:.4f} (> --max-ppl-increase {t.max_ppl_increase:g})")
    broken = [n for n in report.exact_layers if report.layer_errors.get(n, 0.0) != 0.0]
    if broken:
        report.failures.append(f"{len(broken)} layers the format holds exactly differ from the checkpoint's integers, "
                               f"e.g. {broken[0]} (error {report.layer_errors[broken[0]]:.3g} steps)")


def markdown(reports: list[ArtifactReport], source: str, protocol: str) -> str:
    def fmt(v, f):
        return "" if v is None else format(v, f)

    lines = [f"# Validation of {source}", "", protocol, "",
             "| model | runner | perplexity | top-1 vs reference | mean KL | max KL | top-1 vs float | mean KL vs float "
             "| layers exact | result |", "| --- " * 10 + "|"]
    for r in reports:
        s, f = r.scores, r.vs_float or Scores(0.0)
        exact = ""
        if r.exact_layers:
            exact = f"{sum(1 for n in r.exact_layers if r.layer_errors.get(n) == 0.0)}/{len(r.exact_layers)}"
        verdict = "" if r.name in ("reference", "float") else ("FAIL" if r.failures else "pass")
        lines.append(f"| {r.name} | {r.runner} | {s.ppl:.4f} | {fmt(s.top1, '.4f')} | {fmt(s.kl_mean, '.3g')} | "
                     f"{fmt(s.kl_max, '.3g')} | {fmt(f.top1, '.4f')} | {fmt(f.kl_mean, '.3g')} | {exact} | {verdict} |")
    lines.append("")
    for r in reports:
        lines += [f"- **{r.name} failed**: {x}" for x in r.failures] + [f"- {r.name}: {x}" for x in r.notes]
    return "\n".join(lines) + "\n"


def versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("signround-export", "torch", "onnxruntime", "onnx", "gguf", "llama-cpp-python", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


# ---------------------------------------------------------------------------------------------
# logits of each kind of model over one window of token ids

def torch_logits(model) -> LogitsFn:
    return lambda ids: model.logits(ids[None])[0]


def onnx_logits(folder) -> tuple[LogitsFn, str]:
    """Logits of an exported ONNX folder through onnxruntime, one window per call with an empty cache."""
    import json
    from pathlib import Path

    import onnxruntime as ort

    folder = Path(folder)
    path = folder / "model.onnx"
    if not path.is_file():
        raise ValueError(f"--onnx {folder}: no model.onnx there; give the folder `signround export onnx` wrote")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for broken files
        raise ValueError(f"--onnx {folder}: onnxruntime cannot load model.onnx ({str(e).splitlines()[0][-200:]})") from None
    names = {i.name: i for i in session.get_inputs()}
    past = [n for n in names if n.startswith("past_key_values.")]
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"] \
        if (folder / "genai_config.json").is_file() else {}

    def kv_shape(name):
        shape = names[name].shape
        kv = shape[1] if isinstance(shape[1], int) else decoder["num_key_value_heads"]
        hd = shape[3] if isinstance(shape[3], int) else decoder["head_size"]
        return (1, kv, 0, hd)

    def run(ids: torch.Tensor) -> torch.Tensor:
        feeds = {"input_ids": ids[None].numpy().astype(np.int64),
                 "attention_mask": np.ones((1, len(ids)), dtype=np.int64)}
        feeds |= {n: np.zeros(kv_shape(n), dtype=np.float32) for n in past}
        logits = session.run(["logits"], feeds)[0]
        return torch.from_numpy(np.asarray(logits[0], dtype=np.float32))

    return run, f"onnxruntime {ort.__version__}"


def llama_cpp_logits(path, n_ctx: int) -> tuple[LogitsFn, str]:
    """Logits of a GGUF file through llama.cpp (llama-cpp-python), one window per call from an empty cache."""
    import llama_cpp

    try:
        llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, n_batch=n_ctx, verbose=False)
    except Exception as e:  # llama-cpp-python raises ValueError/RuntimeError with little detail
        raise ValueError(f"--gguf {path}: llama.cpp cannot load the file ({e})") from None

    def run(ids: torch.Tensor) -> torch.Tensor:
        llm.reset()
        llm.eval(ids.tolist())
        return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))

    return run, f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"


# ---------------------------------------------------------------------------------------------
# the whole command

def validate(checkpoint, *, onnx=None, gguf=None, float_model=None, text=None, tokens: int = 2048,
             window: int = 512, thresholds: Thresholds = Thresholds(), gguf_runner: str = "auto",
             progress: bool = True) -> dict:
    """Every figure of the validation as one JSON-ready dict ("artifacts": ArtifactReport dicts, ...)."""
    import time
    from pathlib import Path

    from tqdm import tqdm

    from ..checkpoint.read import read_checkpoint
    from ..data import encode, heldout_text, load_tokenizer, read_text
    from ..model.load import load_float_model, reference_from_checkpoint
    from .metrics import windows as cut_windows

    t0 = time.perf_counter()
    ckpt = read_checkpoint(checkpoint)
    reference = reference_from_checkpoint(ckpt)
    ids = encode(load_tokenizer(checkpoint), read_text(text) if text else heldout_text())
    if tokens < window:
        raise ValueError(f"--tokens {tokens} is less than one window of {window}")
    w = cut_windows(ids, window, tokens // window)

    models: dict[str, LogitsFn] = {"reference": torch_logits(reference)}
    paths, runners = {"reference": str(checkpoint)}, {"reference": "PyTorch (float32, dequantized integers)"}
    source = float_model or (ckpt.tuning_log or {}).get("source_model")
    if source and Path(source).is_dir():
        models["float"] = torch_logits(load_float_model(source)[0])
        paths["float"], runners["float"] = str(source), "PyTorch (float32)"
    if onnx is not None:
        models["onnx"], runners["onnx"] = onnx_logits(onnx)
        paths["onnx"] = str(onnx)
    if gguf is not None:
        import functools

        read_gguf = functools.cache(lambda: gguf_weights(gguf, ckpt))  # the file is dequantized once for both uses
        models["gguf"], runners["gguf"] = gguf_logits(gguf, ckpt, window, gguf_runner, read_gguf)
        paths["gguf"] = str(gguf)
    pairs = [(name, "reference") for name in models if name != "reference"]
    if "float" in models:
        pairs += [(name, "float") for name in models if name not in ("reference", "float")]

    bar = tqdm(w, desc="validate", unit="window", disable=not progress)
    scores = compare(w, models, pairs, bar)
    reports = []
    for name in models:
        alone = scores[(name, None)]
        vs_ref = scores.get((name, "reference"))
        s = Scores(alone.ppl, tokens=alone.tokens) if vs_ref is None else vs_ref
        reports.append(ArtifactReport(name, paths[name], runners[name], s, vs_float=scores.get((name, "float"))))
    for r in reports:
        if r.name == "gguf":
            r.layer_errors, r.exact_layers, r.notes = gguf_layer_errors(gguf, ckpt, *read_gguf())
        if r.name == "onnx":
            r.layer_errors, r.exact_layers, r.notes = onnx_layer_errors(onnx, ckpt)
        if r.name not in ("reference", "float"):
            judge(r, scores[("reference", None)], thresholds)
    protocol = (f"{len(w)} non-overlapping windows of {window} tokens, no BOS, from "
                f"{text or 'the held-out slice of pydoc_data.topics'}; {sum(len(x) - 1 for x in w)} predicted tokens")
    return {"checkpoint": str(checkpoint), "protocol": protocol, "thresholds": asdict(thresholds),
            "artifacts": [r.to_json() for r in reports], "passed": not any(r.failures for r in reports),
            "tuning_log": {"blocks": (ckpt.tuning_log or {}).get("blocks", [])},
            "versions": versions(), "seconds": round(time.perf_counter() - t0, 1),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def gguf_weights(path, ckpt) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The GGUF file's weights under HF names and its tensor types (export.gguf.read_gguf_weights), with
    a broken or foreign file as a ValueError naming --gguf."""
    from ..errors import GGUFExportError
    from ..export.gguf import read_gguf_weights
    from ..model.config import ModelConfig

    try:
        return read_gguf_weights(path, ModelConfig.from_hf(ckpt.hf_config))
    except GGUFExportError as e:
        raise ValueError(f"--gguf {e}") from None


def gguf_logits(path, ckpt, window: int, runner: str, read: Callable) -> tuple[LogitsFn, str]:
    """llama.cpp when installed (or asked for), else the file's weights dequantized by gguf-py run in PyTorch."""
    from pathlib import Path

    if not Path(path).is_file():
        raise ValueError(f"--gguf {path}: no such file")
    try:
        import llama_cpp  # noqa: F401

        have_llama = True
    except ImportError:
        have_llama = False
    if runner == "llama.cpp" and not have_llama:
        raise ValueError("--gguf-runner llama.cpp: llama-cpp-python is not installed (make setup installs it)")
    if runner in ("auto", "llama.cpp") and have_llama:
        return llama_cpp_logits(path, window)
    return numpy_gguf_logits(ckpt, read()[0])


def numpy_gguf_logits(ckpt, weights: dict[str, np.ndarray]) -> tuple[LogitsFn, str]:
    """The GGUF file's own weights (gguf-py dequantization) in the PyTorch forward: checks the file's
    contents without llama.cpp's 8-bit activations."""
    from importlib.metadata import version

    from ..model.config import ModelConfig
    from ..model.forward import Model

    cfg = ModelConfig.from_hf(ckpt.hf_config)
    model = Model(cfg, {n: torch.from_numpy(np.array(w, dtype=np.float32)) for n, w in weights.items()})
    return torch_logits(model), f"gguf-py {version('gguf')} dequantization + PyTorch (float32)"


def gguf_layer_errors(path, ckpt, weights: dict[str, np.ndarray], types: dict[str, str]
                      ) -> tuple[dict[str, float], list[str], list[str]]:
    """(error in steps of every quantized layer, the layers whose GGUF type holds integers exactly,
    notes) for a GGUF file (weights and types as gguf_weights reads them) against its checkpoint."""
    from ..export.gguf import holds_exactly

    errors, exact, missing = {}, [], []
    for name, qw in ckpt.qweights.items():
        w = weights.get(name + ".weight")
        if w is None:
            if name == "lm_head" and ckpt.hf_config.get("tie_word_embeddings"):
                continue
            missing.append(name)
            continue
        if w.shape != qw.shape:
            raise ValueError(f"--gguf {path}: {name} has shape {list(w.shape)}, the checkpoint's is {list(qw.shape)}; "
                             "the file belongs to another model")
        errors[name] = qw.step_error(w)
        if holds_exactly(types[name + ".weight"], qw):
            exact.append(name)
    notes = [f"{len(missing)} quantized layers are not in the file, e.g. {missing[0]}"] if missing else []
    inexact = [n for n in errors if n not in exact]
    if inexact:
        worst = max(inexact, key=errors.get)
        notes.append(f"{len(inexact)} layers in types that cannot hold the integers exactly; worst {worst}: "
                     f"{errors[worst]:.3g} steps ({types[worst + '.weight']})")
    return errors, exact, notes


def onnx_layer_errors(folder, ckpt) -> tuple[dict[str, float], list[str], list[str]]:
    """(error in steps of every quantized layer, the layers MatMulNBits holds exactly, notes) for an
    exported ONNX folder, read back from its MatMulNBits initializers."""
    from pathlib import Path

    import onnx
    from onnx import numpy_helper

    from ..export.onnx.matmulnbits import NBitsWeight, dequantize_nbits
    from ..export.onnx.stacking import stacked_modules

    model = onnx.load(str(Path(folder) / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    errors, notes = {}, []
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        stacked = node.input[1].removesuffix(".B")
        qws = {m: ckpt.qweights.get(m) for m in stacked_modules(stacked)}
        if any(qw is None for qw in qws.values()):
            notes.append(f"{stacked}: MatMulNBits with no integers in the checkpoint (rounded at export)")
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        b, scales = (numpy_helper.to_array(inits[name]) for name in node.input[1:3])
        zp = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else None
        w = NBitsWeight(b, scales, zp, attrs["bits"], attrs["block_size"], attrs["K"], attrs["N"])
        want = (sum(qw.shape[0] for qw in qws.values()), next(iter(qws.values())).shape[1])
        if (w.n, w.k) != want:
            raise ValueError(f"--onnx {folder}: {stacked} is {w.n}x{w.k}, the checkpoint's is "
                             f"{want[0]}x{want[1]}; the folder belongs to another model")
        rows, start = dequantize_nbits(w), 0
        for module, qw in qws.items():
            errors[module] = qw.step_error(rows[start : start + qw.shape[0]])
            start += qw.shape[0]
    missing = [m for m in ckpt.qweights if m not in errors]
    if missing:
        notes.append(f"{len(missing)} quantized layers are not MatMulNBits in the graph, e.g. {missing[0]}")
    offsets = [m for m in errors if ckpt.qweights[m].offset is not None]  # float zero points: float32 rounding
    if offsets:
        worst = max(offsets, key=errors.get)
        notes.append(f"{len(offsets)} layers with float minima take float zero points (offset / scale), exact to "
                     f"float32 rounding; worst {worst}: {errors[worst]:.3g} steps")
    return errors, [m for m in errors if m not in offsets], notes


def write_report(result: dict, out_dir) -> list:
    """validation.json, validation.md and the PNG figures, written atomically into out_dir."""
    import json
    from pathlib import Path

    from ..fileio import atomic_file
    from ..plots import plot_layer_errors, plot_perplexity, plot_tuning_loss

    out_dir = Path(out_dir)
    reports = [ArtifactReport(**(a | {"scores": Scores(**a["scores"]),
                                      "vs_float": Scores(**a["vs_float"]) if a["vs_float"] else None}))
               for a in result["artifacts"]]
    written = []
    with atomic_file(out_dir / "validation.json") as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    written.append(out_dir / "validation.json")
    with atomic_file(out_dir / "validation.md") as tmp:
        tmp.write_text(markdown(reports, result["checkpoint"], result["protocol"]))
    written.append(out_dir / "validation.md")
    written.append(plot_perplexity(reports, out_dir / "perplexity.png"))
    if result["tuning_log"]["blocks"]:
        written.append(plot_tuning_loss(result["tuning_log"]["blocks"], out_dir / "tuning_loss.png"))
    if any(r.layer_errors for r in reports):
        written.append(plot_layer_errors(reports, out_dir / "layer_error.png"))
    return written
