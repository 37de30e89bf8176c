"""What validation found: thresholds, each artifact's figures and verdict, and the report files.

An artifact fails when kl_mean > max_kl, top1 < min_top1, its perplexity is above the reference's by
more than max_ppl_increase (relative), or a layer the format holds exactly differs from the checkpoint.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..atomic import atomic_file
from .figures import plot_layer_errors, plot_perplexity, plot_tuning_loss
from .metrics import Scores


@dataclass
class Thresholds:
    max_kl: float = 0.02
    min_top1: float = 0.90
    max_ppl_increase: float = 0.03  # relative to the reference's perplexity


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

    @property
    def judged(self) -> bool:
        """Whether thresholds apply: the reference and the float model are what artifacts are judged by."""
        return self.name not in ("reference", "float")

    def to_json(self) -> dict:
        return asdict(self)


def judge(artifact: ArtifactReport, reference: Scores, t: Thresholds) -> list[str]:
    """Every threshold the artifact misses, each naming the figure."""
    s, failures = artifact.scores, []
    if s.kl_mean is not None and s.kl_mean > t.max_kl:
        failures.append(f"mean KL {s.kl_mean:.3g} > max_kl {t.max_kl:g}")
    if s.top1 is not None and s.top1 < t.min_top1:
        failures.append(f"top-1 agreement {s.top1:.4f} < min_top1 {t.min_top1:g}")
    increase = s.ppl / reference.ppl - 1
    if increase > t.max_ppl_increase:
        failures.append(f"perplexity {s.ppl:.4f} is {100 * increase:.2f}% above the reference's "
                        f"{reference.ppl:.4f} (> max_ppl_increase {t.max_ppl_increase:g})")
    broken = [n for n in artifact.exact_layers if artifact.layer_errors.get(n, 0.0) != 0.0]
    if broken:
        failures.append(f"{len(broken)} layers the format holds exactly differ from the checkpoint's integers, "
                        f"e.g. {broken[0]} (error {artifact.layer_errors[broken[0]]:.3g} steps)")
    return failures


def versions() -> dict[str, str]:
    """The platform and the versions of every package that produced a figure."""
    out = {"python": platform.python_version(), "machine": platform.machine()}
    for pkg in ("signround-export", "torch", "onnxruntime", "onnx", "gguf", "llama-cpp-python", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


@dataclass
class ValidationResult:
    checkpoint: str
    protocol: str  # the windows and text every model ran over
    thresholds: Thresholds
    artifacts: list[ArtifactReport]  # reference first, then the float model when present, then each artifact
    tuning_blocks: list[dict]  # the tuning log's per-block losses
    versions: dict[str, str]
    seconds: float
    date: str

    @property
    def passed(self) -> bool:
        return not any(a.failures for a in self.artifacts)

    def artifact(self, name: str) -> ArtifactReport:
        return next(a for a in self.artifacts if a.name == name)

    def failures(self) -> list[str]:
        """"name: what failed" for every threshold any artifact misses."""
        return [f"{a.name}: {f}" for a in self.artifacts for f in a.failures]

    def to_json(self) -> dict:
        return {"checkpoint": self.checkpoint, "protocol": self.protocol, "thresholds": asdict(self.thresholds),
                "artifacts": [a.to_json() for a in self.artifacts], "passed": self.passed,
                "tuning_log": {"blocks": self.tuning_blocks}, "versions": self.versions, "seconds": self.seconds,
                "date": self.date}

    def markdown(self) -> str:
        lines = [f"# Validation of {self.checkpoint}", "", self.protocol, "",
                 "| model | runner | perplexity | top-1 vs reference | mean KL | max KL | top-1 vs float "
                 "| mean KL vs float | layers exact | result |", "| --- " * 10 + "|"]
        lines += [_row(a) for a in self.artifacts]
        lines.append("")
        for a in self.artifacts:
            lines += [f"- **{a.name} failed**: {x}" for x in a.failures] + [f"- {a.name}: {x}" for x in a.notes]
        return "\n".join(lines) + "\n"


def _fmt(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _row(a: ArtifactReport) -> str:
    """One artifact's line of the markdown table."""
    s, f = a.scores, a.vs_float or Scores(0.0)
    exact = ""
    if a.exact_layers:
        exact = f"{sum(1 for n in a.exact_layers if a.layer_errors.get(n) == 0.0)}/{len(a.exact_layers)}"
    verdict = ("FAIL" if a.failures else "pass") if a.judged else ""
    return (f"| {a.name} | {a.runner} | {s.ppl:.4f} | {_fmt(s.top1, '.4f')} | {_fmt(s.kl_mean, '.3g')} | "
            f"{_fmt(s.kl_max, '.3g')} | {_fmt(f.top1, '.4f')} | {_fmt(f.kl_mean, '.3g')} | {exact} | {verdict} |")


def write_report(result: ValidationResult, out_dir) -> list[Path]:
    """validation.json, validation.md and the PNG figures, each written atomically into out_dir."""
    out_dir = Path(out_dir)
    with atomic_file(out_dir / "validation.json") as tmp:
        tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
    with atomic_file(out_dir / "validation.md") as tmp:
        tmp.write_text(result.markdown())
    written = [out_dir / "validation.json", out_dir / "validation.md",
               plot_perplexity(result.artifacts, out_dir / "perplexity.png")]
    if result.tuning_blocks:
        written.append(plot_tuning_loss(result.tuning_blocks, out_dir / "tuning_loss.png"))
    if any(a.layer_errors for a in result.artifacts):
        written.append(plot_layer_errors(result.artifacts, out_dir / "layer_error.png"))
    return written
