"""The benchmark protocol: arms x seeds on two evaluation domains, resumable, summed up in one table.

One seed moves SmolLM2's perplexity by up to 1.8%, so a comparison is a matrix of cells, a cell = (arm,
seed): every arm tuned with every seed, every checkpoint scored on two domains by `signround eval`:
  wikitext  ../shared/data/wikitext-2/valid.txt, the first 40 windows of 512 tokens, no BOS
  pydoc     the held-out slice of pydoc_data.topics (eval's default text), all of its windows of 512
            tokens (it holds 5 with SmolLM2's tokenizer; --windows caps both domains), no BOS
The full protocol (W4G128 asymmetric, 200 iters, 32 samples of 512 tokens, batch 8, bfloat16 compute on
both sides, seeds 42 43 44), with auto-round 0.16.1 in its throwaway venv:
    .venv/bin/python tools/bench_protocol.py --out out/protocol --ar-python /tmp/ar-venv/bin/python
Resume: run the same command again, in this session or another. Each finished cell is in
OUT/cells/<arm>-s<seed>.json (float.json: it has no seed) and is skipped; a cell cut short starts again
from its beginning (its tuning time stays honest). A cell file made with other settings stops the run.
    .venv/bin/python tools/bench_protocol.py --out out/protocol --table     # the table of what is done

Arms are the table ARMS below. `--arm NAME=BASE[:ARGS]` adds one from an arm of the table, ARGS in shell
quoting: for a signround arm, more `signround tune` flags (after the protocol's, so they win); for the
autoround arm, AutoRound keywords as key=value with JSON values (a value that is not JSON is a string),
then, from the first --flag on, tune's --calib/--calib-windows flags choosing the windows as for our tune:
    --arm 'ours-docs=ours:--calib-windows documents' --arm 'ar-lr=ar:lr=0.002 iters=400'
A signround arm's `--ranks N` is this script's: the arm's tune runs data-parallel under torchrun, N
processes sharing the cores (`--arm 'dp2-sign=ours:--ranks 2 --dp-reduce sign'`).
Both tools get the same token windows for a seed and calibration option: this script computes them with
signround_export.data.calibration_ids and saves them for auto-round's worker (bench_vs_autoround.py);
our tune computes them itself, and after each tune they are computed again from the settings its
tuning_log.json records and compared with the saved ones. auto-round's checkpoint is scored through our
checkpoint reader, from its integers (see autoround_packing for SmolLM2 at G128).

Cells run seed-major, the arms' order rotating from seed to seed (s42: a b c, s43: b c a, ...), so that
the machine's drift falls on every arm alike; cells whose result cannot depend on the seed (float, and
RTN, which reads no calibration data) run once, first. Checkpoints are deleted once scored, unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench_vs_autoround import find_checkpoint, tune_autoround as run_autoround
from common import MODEL, REPO, SIGNROUND, TEXT, evaluate, machine, run
from signround_export.atomic import atomic_file


@dataclass(frozen=True)
class Arm:
    """A named recipe. tool: "float" (the model untuned), "signround" or "autoround". tune_args: `signround
    tune` flags after the protocol's (for autoround, only those choosing the windows); ar_kwargs: AutoRound
    keywords over the protocol's; ranks: processes of a signround arm (torchrun, data-parallel), each with
    an equal part of the machine's cores as threads."""
    tool: str
    tune_args: tuple[str, ...] = ()
    ar_kwargs: dict = field(default_factory=dict)
    ranks: int = 1


ARMS = {
    "float": Arm("float"),
    "rtn": Arm("signround", ("--iters", "0", "--no-clip-search")),
    "ours": Arm("signround"),
    "ar": Arm("autoround"),
    "ours-noclip": Arm("signround", ("--no-clip-search",)),
}

# the tune flags an autoround arm may carry: they choose the token windows given to auto-round
WINDOW_FLAGS = ("--calib", "--calib-windows", "--nsamples", "--seqlen")

LOAD_EVERY = 30.0  # seconds between samples of the load average while a cell tunes
SHARED_MARGIN = 0.5  # a mean load this far above the cores: the cell shared the machine

# evaluation domain -> its text (None: eval's default, the held-out pydoc slice)
DOMAINS = {"wikitext": TEXT, "pydoc": None}


@dataclass(frozen=True)
class Protocol:
    """The settings every tuned cell shares."""
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    iters: int = 200
    nsamples: int = 32
    seqlen: int = 512
    batch_size: int = 8

    def scheme(self) -> list[str]:
        """The flags `signround tune` and auto-round's worker share."""
        return ["--bits", str(self.bits), "--group-size", str(self.group_size), "--sym" if self.sym else "--asym",
                "--iters", str(self.iters), "--batch-size", str(self.batch_size)]

    def tune_args(self) -> list[str]:
        return self.scheme() + ["--nsamples", str(self.nsamples), "--seqlen", str(self.seqlen)]

    def worker_args(self, seed: int) -> list[str]:
        """auto-round's worker flags (its nsamples and seqlen are the saved windows')."""
        return self.scheme() + ["--seed", str(seed)]


@dataclass(frozen=True)
class Cell:
    arm_name: str
    arm: Arm
    seed: int | None  # None: the result cannot depend on the seed

    @property
    def name(self) -> str:
        return self.arm_name if self.seed is None else f"{self.arm_name}-s{self.seed}"


def parse_arm(spec: str, arms: dict[str, Arm]) -> tuple[str, Arm]:
    """NAME=BASE[:ARGS] -> (NAME, the arm BASE with ARGS added); see the module's docstring."""
    name, eq, rest = spec.partition("=")
    base, _, args = rest.partition(":")
    if not eq or not name or base not in arms:
        raise SystemExit(f"--arm {spec!r}: expected NAME=BASE[:ARGS] with BASE one of {', '.join(arms)}")
    arm, tokens = arms[base], shlex.split(args)
    if arm.tool == "float" and tokens:
        raise SystemExit(f"--arm {spec!r}: the float arm takes no arguments")
    if arm.tool == "signround":
        ranks = arm.ranks
        if "--ranks" in tokens:  # this script's flag, not tune's: run the arm under torchrun
            i = tokens.index("--ranks")
            if i + 1 == len(tokens) or not tokens[i + 1].isdigit() or int(tokens[i + 1]) < 1:
                raise SystemExit(f"--arm {spec!r}: --ranks takes a number of processes (e.g. --ranks 2)")
            ranks, tokens = int(tokens[i + 1]), tokens[:i] + tokens[i + 2:]
        return name, Arm("signround", arm.tune_args + tuple(tokens), ranks=ranks)
    first_flag = next((i for i, t in enumerate(tokens) if t.startswith("--")), len(tokens))
    flags, kwargs = tuple(tokens[first_flag:]), dict(arm.ar_kwargs)
    other = [t for t in flags if t.startswith("--") and t.partition("=")[0] not in WINDOW_FLAGS]
    if other:
        raise SystemExit(f"--arm {spec!r}: {', '.join(other)} would not reach auto-round; only "
                         f"{', '.join(WINDOW_FLAGS)} (the windows) do: give AutoRound keywords (e.g. iters=400)")
    for token in tokens[:first_flag]:
        key, eq, value = token.partition("=")
        if not eq or not key.isidentifier():
            raise SystemExit(f"--arm {spec!r}: {token!r} is not an AutoRound keyword as key=value (e.g. lr=0.002)")
        kwargs[key] = json_or_text(value)
    return name, Arm(arm.tool, arm.tune_args + flags, kwargs)


def json_or_text(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def tune_settings(model: Path, protocol: Protocol, arm: Arm, seed: int | None) -> argparse.Namespace:
    """The settings `signround tune` reads from the protocol's and the arm's flags, parsed by tune's own
    parser, so the windows chosen here are the ones tune chooses."""
    from signround_export.cli import build_parser

    argv = ["tune", str(model), "--out", "unused", *tune_flags(protocol, arm, seed)]
    try:
        return build_parser().parse_args(argv)
    except SystemExit:
        raise SystemExit(f"the arm's tune flags {' '.join(arm.tune_args)!r} are not `signround tune`'s (above)")


def uses_seed(model: Path, protocol: Protocol, arm: Arm) -> bool:
    """Whether the arm's result can depend on the seed: whether it reads calibration data."""
    from signround_export.tune.config import TuneConfig

    if arm.tool != "signround":
        return arm.tool == "autoround"
    ns = tune_settings(model, protocol, arm, None)
    return TuneConfig(iters=ns.iters, clip_search=ns.clip_search).uses_data() or ns.avg_bits is not None


def matrix(arms: dict[str, Arm], seeds: list[int], model: Path, protocol: Protocol) -> list[Cell]:
    """Seedless cells first, then seed by seed with the arms' order rotated by one per seed."""
    seeded = [name for name, arm in arms.items() if uses_seed(model, protocol, arm)]
    cells = [Cell(name, arm, None) for name, arm in arms.items() if name not in seeded]
    for i, seed in enumerate(seeds):
        k = i % len(seeded) if seeded else 0
        cells += [Cell(name, arms[name], seed) for name in seeded[k:] + seeded[:k]]
    return cells


def calibration(model: Path, ns: argparse.Namespace, cache_dir: Path | None = None):
    """The token windows tune picks for these settings; the windows option is passed only when set.
    cache_dir: where `self` windows already generated are kept (a checkpoint tuned on them)."""
    from signround_export.data import calibration_ids

    chosen = getattr(ns, "calib_windows", None)
    extra = {"windows": chosen} if chosen is not None else {}
    return calibration_ids(model, ns.nsamples, ns.seqlen, ns.seed, ns.calib, cache_dir=cache_dir, progress=False,
                           **extra)


def check_windows(checkpoint: Path, model: Path, ns: argparse.Namespace, saved) -> None:
    """Recompute the windows from the settings our tune logged; stop if they differ from the saved ones."""
    from signround_export.data import DEFAULT_CALIBRATION

    log = json.loads((checkpoint / "tuning_log.json").read_text())
    logged = argparse.Namespace(**vars(ns))
    logged.nsamples, logged.seqlen, logged.seed = (log["args"][k] for k in ("nsamples", "seqlen", "seed"))
    logged.calib = None if log["calibration"] == DEFAULT_CALIBRATION else log["calibration"]
    if "calib_windows" in log["args"]:  # logged by a tune that has the option
        logged.calib_windows = log["args"]["calib_windows"]
    if not calibration(model, logged, cache_dir=checkpoint).equal(saved):
        raise SystemExit(f"{checkpoint}: our tune's calibration windows differ from the ones given to auto-round")


def tune_flags(protocol: Protocol, arm: Arm, seed: int | None) -> list[str]:
    """`signround tune`'s flags for a cell: the protocol's, the arm's (which win), the cell's seed."""
    return [*protocol.tune_args(), *arm.tune_args, *(["--seed", str(seed)] if seed is not None else [])]


@dataclass(frozen=True)
class Run:
    """What the cells of one invocation share."""
    model: Path
    out: Path
    protocol: Protocol
    windows: int  # evaluation windows per domain, at most
    ar_python: str
    compile: str  # auto-round's torch.compile: on / off
    amp: str  # auto-round's amp (bfloat16 autocast on this CPU): on / off
    ar_packing: str  # auto-round's packing: auto (its choice) or gptq (its GPTQ layout where it would pick AWQ)
    keep: bool

    def settings(self, cell: Cell) -> dict:
        """What a cell's result depends on; a finished cell is reused only by a run with the same."""
        tool = cell.arm.tool
        # the model's real path: a worktree's symlink to the same folder makes the same cells
        return {"model": str(self.model.resolve()), "eval_windows": self.windows,
                "protocol": asdict(self.protocol) if tool != "float" else None,
                "tune_args": list(cell.arm.tune_args), "ar_kwargs": cell.arm.ar_kwargs,
                "autoround": {"compile": self.compile, "amp": self.amp, "packing": self.ar_packing}
                if tool == "autoround" else None} | ({"ranks": cell.arm.ranks} if cell.arm.ranks > 1 else {})


def tune_ours(r: Run, cell: Cell, folder: Path) -> dict:
    """`signround tune` into folder, timed around the command alone; the windows checked after."""
    flags = tune_flags(r.protocol, cell.arm, cell.seed)
    ns = tune_settings(r.model, r.protocol, cell.arm, cell.seed)
    cmd, env = [SIGNROUND, "tune", str(r.model), "--out", str(folder), "--quiet", *flags], None
    if cell.arm.ranks > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(cell.arm.ranks)]
        cmd = [*launch, "-m", "signround_export", *cmd[1:]]
        env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // cell.arm.ranks))}
    t0 = time.perf_counter()
    run(cmd, env)
    seconds = time.perf_counter() - t0
    log = json.loads((folder / "tuning_log.json").read_text())
    # after the tune, so that `self` windows are read from the checkpoint rather than generated again
    saved = calibration(r.model, ns, cache_dir=folder) if cell.seed is not None else None
    if saved is not None:
        check_windows(folder, r.model, ns, saved)
    return {"command": shlex.join(cmd), "tune_seconds": round(seconds, 1), "inner_seconds": log["seconds"],
            "compute_dtype": log["compute_dtype"], "peak_rss_mb": log["peak_rss_mb"],
            "windows_check": "recomputed from tuning_log.json: equal" if saved is not None else "no calibration data"}


def tune_autoround(r: Run, cell: Cell, folder: Path) -> dict:
    """auto-round's worker on the windows our tune would pick, saved as .npy; timed around the worker."""
    import numpy as np

    ids = calibration(r.model, tune_settings(r.model, r.protocol, cell.arm, cell.seed))
    calib_file = r.out / "calib" / f"{cell.name}.npy"
    calib_file.parent.mkdir(parents=True, exist_ok=True)
    np.save(calib_file, ids.numpy())
    worker = r.protocol.worker_args(cell.seed)
    t0 = time.perf_counter()
    inner = run_autoround(r.ar_python, r.model, calib_file, folder, worker, r.compile, r.amp, cell.arm.ar_kwargs,
                          r.ar_packing)
    seconds = time.perf_counter() - t0
    config = json.loads((find_checkpoint(folder) / "config.json").read_text())
    return {"command": "auto-round worker " + shlex.join(worker), "tune_seconds": round(seconds, 1),
            "inner_seconds": round(inner, 1), "calib_ids": str(calib_file),
            "packing_format": config["quantization_config"].get("packing_format")}


def score(r: Run, model: Path, cell: Cell) -> dict:
    """`signround eval` of the model on every domain: {domain: {ppl, text, protocol}}."""
    scores = {}
    for domain, text in DOMAINS.items():
        out = r.out / "evals" / f"{cell.name}-{domain}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        evaluate(model, out, r.windows, text)
        result = json.loads(out.read_text())
        scores[domain] = {"ppl": result["ppl"], "text": result["text"], "protocol": result["protocol"]}
    return scores


@contextmanager
def load_sampled(every: float = LOAD_EVERY) -> Iterator[list[float]]:
    """The machine's 1-minute load average, sampled every `every` seconds while the block runs."""
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every):
            samples.append(os.getloadavg()[0])

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def shared(record: dict) -> bool:
    """Whether a cell's tuning shared the machine: its mean load was above the cores of the machine it ran
    on (a tune alone keeps the load at about the core count)."""
    load = record.get("load_average")
    return bool(load) and load["mean"] > (load.get("cores") or os.cpu_count() or 1) + SHARED_MARGIN


def run_cell(r: Run, cell: Cell) -> dict:
    """Tune (unless float), score on both domains, delete the checkpoint unless --keep: the cell's record,
    with the load average over its tuning (the times of cells that shared the machine do not compare)."""
    t0 = time.perf_counter()
    folder = r.out / "checkpoints" / cell.name
    for stale in (folder, folder.with_name(folder.name + ".progress")):  # a cell cut short starts afresh
        shutil.rmtree(stale, ignore_errors=True)
    facts, model = {"tune_seconds": None}, r.model
    with load_sampled() as load:
        if cell.arm.tool == "signround":
            facts, model = tune_ours(r, cell, folder), folder
        elif cell.arm.tool == "autoround":
            facts = tune_autoround(r, cell, folder)
            model = find_checkpoint(folder)
    if load:
        facts["load_average"] = {"mean": round(statistics.fmean(load), 2), "max": round(max(load), 2),
                                 "samples": len(load), "cores": os.cpu_count()}
    scores = score(r, model, cell)
    if not r.keep and folder.exists():
        shutil.rmtree(folder)
    return {"cell": cell.name, "arm": cell.arm_name, "tool": cell.arm.tool, "seed": cell.seed,
            "settings": r.settings(cell), **facts, "seconds": round(time.perf_counter() - t0, 1),
            "ppl": {d: s["ppl"] for d, s in scores.items()}, "eval": scores,
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine(),
            "commit": git_commit(), "protocol_command": shlex.join([sys.executable, *sys.argv])}


def autoround_packing(model: Path, protocol: Protocol) -> str:
    """auto (auto-round's own choice) where it can pack the scheme, else gptq. auto-round 0.16.1 packs
    4-bit asymmetric weights as AWQ, which needs every linear's input size to be a multiple of the group
    size (SmolLM2's 576 is not one of 128); its GPTQ layout with the zero points as they are holds a
    short last group. (Its fake format is no way out: with amp it saves bfloat16 weights, then restores
    the source model's float32 ones over them, so the checkpoint scores as the float model.)"""
    cfg = json.loads((model / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    inputs = {cfg["hidden_size"], cfg["intermediate_size"], heads * cfg.get("head_dim", cfg["hidden_size"] // heads)}
    awq = protocol.bits == 4 and not protocol.sym
    return "gptq" if awq and protocol.group_size != -1 and any(k % protocol.group_size for k in inputs) else "auto"


def git_commit() -> str:
    """The commit the tools ran from, -dirty when tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else "")


def write_json(path: Path, data: dict) -> None:
    """Atomically: a cell file that exists is whole."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def distinct(values) -> list:
    seen = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


def mean(values: list) -> float | None:
    return statistics.fmean(values) if values else None


def spread(values: list[float]) -> str:
    """mean ± sample std (min..max) of a domain's perplexities."""
    std = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.3f}{std} ({min(values):.3f}..{max(values):.3f})"


def arm_row(arm: str, records: list[dict], refs: dict, ar_seconds: float | None) -> str:
    """One row: seeds, each domain's perplexity and share of RTN's gap to float closed, tune seconds."""
    cells = [arm, records[0]["tool"], str(len(records))]
    for domain in DOMAINS:
        cells.append(spread([r["ppl"][domain] for r in records]))
    for domain in DOMAINS:
        fp, rtn = refs["float"].get(domain), refs["rtn"].get(domain)
        closed = (rtn - mean([r["ppl"][domain] for r in records])) / (rtn - fp) if fp and rtn and rtn != fp else None
        cells.append(f"{100 * closed:.1f}%" if closed is not None else "—")
    seconds, own = (mean([r[k] for r in records if r.get(k) is not None]) for k in ("tune_seconds", "inner_seconds"))
    cells += [f"{v:.1f}" if v is not None else "—" for v in (seconds, own)]
    cells.append(f"{seconds / ar_seconds:.2f}x" if seconds is not None and ar_seconds else "—")
    return "| " + " | ".join(cells) + " |"


def arm_note(records: list[dict]) -> str:
    """What an arm added to the protocol, and the compute dtype our tune reported."""
    settings, flags = records[0]["settings"], shlex.join(records[0]["settings"]["tune_args"])
    if records[0]["tool"] == "autoround":
        return (f"AutoRound {json.dumps(settings['ar_kwargs']) if settings['ar_kwargs'] else '(protocol)'}"
                + (f", windows of tune {flags}" if flags else ""))
    dtypes = ", ".join(distinct(r["compute_dtype"] for r in records if r.get("compute_dtype")))
    return f"signround tune {flags or '(protocol)'}" + (f", computed in {dtypes}" if dtypes else "")


def table(records: list[dict]) -> str:
    """The markdown table of the finished cells, one row per arm, with how they were made."""
    by_arm: dict[str, list[dict]] = {}
    for name in distinct([a for a in ARMS] + [r["arm"] for r in records]):
        if any(r["arm"] == name for r in records):
            by_arm[name] = [r for r in records if r["arm"] == name]
    refs = {ref: {d: mean([r["ppl"][d] for r in by_arm.get(ref, [])]) for d in DOMAINS} for ref in ("float", "rtn")}
    ar_seconds = mean([r["tune_seconds"] for r in by_arm.get("ar", [])])
    head = (["arm", "tool", "seeds"] + [f"{d} ppl: mean ± std (min..max)" for d in DOMAINS]
            + [f"{d}: RTN gap to float closed" for d in DOMAINS] + ["tune s (mean)", "own s (mean)", "tune s vs ar"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += [arm_row(arm, recs, refs, ar_seconds) for arm, recs in by_arm.items()]
    tuned = [r for r in records if r["settings"]["protocol"]]
    notes = [f"- protocol: {s}" for s in distinct(json.dumps(r["settings"]["protocol"]) for r in tuned)]
    notes += [f"- {d}: {p}" for d in DOMAINS for p in distinct(f"{r['eval'][d]['text']}, {r['eval'][d]['protocol']}"
                                                              for r in records)]
    notes += [f"- arm {arm}: {arm_note(recs)}" for arm, recs in by_arm.items() if recs[0]["tool"] != "float"]
    notes += ["- tune s: wall time around the tuning command (ours: `signround tune`; auto-round: its worker "
              "process), loading and saving included; own s: the tool's own measure (ours: tuning_log.json's "
              "seconds; auto-round: its worker's, around AutoRound() and quantize_and_save)"]
    notes += [f"- auto-round: {json.dumps(s)}" for s in distinct(r["settings"]["autoround"] for r in records
                                                             if r["settings"].get("autoround"))]
    loaded = [f"{r['cell']} ({r['load_average']['mean']:.1f})" for r in records if shared(r)]
    if loaded:
        notes += [f"- shared the machine while tuning (mean 1-minute load above the cores + {SHARED_MARGIN}), "
                  f"so their times do not compare: {', '.join(loaded)}"]
    notes += [f"- machine: {m}" for m in distinct(r["machine"] for r in records)]
    notes += [f"- commit: {', '.join(distinct(r['commit'] for r in records))}; cells run "
              f"{min(r['date'] for r in records)} .. {max(r['date'] for r in records)}"]
    notes += [f"- command: `{c}`" for c in distinct(r["protocol_command"] for r in records)]
    return "\n".join(lines + [""] + notes) + "\n"


def write_table(out: Path) -> str:
    records = [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]
    if not records:
        raise SystemExit(f"no finished cell in {out / 'cells'}: run the matrix first (without --table)")
    text = table(records)
    (out / "table.md").write_text(text)
    return text


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", type=Path, default=REPO / "out" / "protocol")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--ar-python", default="/tmp/ar-venv/bin/python", help="the python of auto-round's venv")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=BASE[:ARGS]", help="add an arm (see above)")
    ap.add_argument("--only", help="comma-separated arms to run (default: every arm, those of --arm too)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    p = Protocol()
    ap.add_argument("--bits", type=int, default=p.bits)
    ap.add_argument("--group-size", type=int, default=p.group_size)
    ap.add_argument("--sym", action="store_true", default=p.sym)
    ap.add_argument("--asym", dest="sym", action="store_false")
    ap.add_argument("--iters", type=int, default=p.iters)
    ap.add_argument("--nsamples", type=int, default=p.nsamples)
    ap.add_argument("--seqlen", type=int, default=p.seqlen)
    ap.add_argument("--batch-size", type=int, default=p.batch_size)
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows of 512 per domain, at most")
    ap.add_argument("--ar-compile", choices=["on", "off"], default="off", help="auto-round's torch.compile")
    ap.add_argument("--ar-amp", choices=["on", "off"], default="on", help="auto-round's amp (bfloat16 on CPU)")
    ap.add_argument("--ar-packing", choices=["auto", "gptq"],
                    help="auto-round's packing of its auto_round format: auto = its choice; gptq = its GPTQ layout "
                         "where it would choose AWQ (default: gptq where AWQ cannot hold the scheme: 4-bit asymmetric "
                         "on input sizes not a multiple of the group size, auto elsewhere)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints of finished cells")
    ap.add_argument("--table", action="store_true", help="print and write OUT/table.md of the finished cells, and exit")
    return ap.parse_args()


def chosen_arms(a: argparse.Namespace) -> dict[str, Arm]:
    arms = dict(ARMS)
    for spec in a.arm:
        name, arm = parse_arm(spec, arms)
        arms[name] = arm
    if not a.only:
        return arms
    names = a.only.split(",")
    unknown = [n for n in names if n not in arms]
    if unknown:
        raise SystemExit(f"--only {a.only}: no arm {', '.join(unknown)}; the arms are {', '.join(arms)} "
                         "(add one with --arm NAME=BASE[:ARGS])")
    return {n: arms[n] for n in names}


def pending(r: Run, cells: list[Cell]) -> list[Cell]:
    """The cells not finished yet; a finished cell made with other settings stops the run."""
    todo = []
    for cell in cells:
        path = r.out / "cells" / f"{cell.name}.json"
        if not path.exists():
            todo.append(cell)
        elif json.loads(path.read_text())["settings"] != r.settings(cell):
            raise SystemExit(f"{path} was made with other settings than this run's {json.dumps(r.settings(cell))}; "
                             "give another --out, or delete the file to run the cell again")
    return todo


def main() -> None:
    a = parse_args()
    if a.table:
        print(write_table(a.out))
        return
    protocol = Protocol(a.bits, a.group_size, a.sym, a.iters, a.nsamples, a.seqlen, a.batch_size)
    packing = a.ar_packing or autoround_packing(a.model, protocol)
    r = Run(a.model, a.out, protocol, a.windows, a.ar_python, a.ar_compile, a.ar_amp, packing, a.keep)
    cells = matrix(chosen_arms(a), a.seeds, a.model, protocol)
    todo = pending(r, cells)
    if any(c.arm.tool == "autoround" for c in todo) and not Path(a.ar_python).is_file():
        raise SystemExit(f"--ar-python {a.ar_python} does not exist: install auto-round in a venv there (see "
                         "tools/bench_vs_autoround.py), or leave its arms out with --only")
    (a.out / "cells").mkdir(parents=True, exist_ok=True)
    print(f"{len(cells)} cells, {len(cells) - len(todo)} done: " + " ".join(c.name for c in todo), flush=True)
    for cell in todo:
        record = run_cell(r, cell)
        write_json(a.out / "cells" / f"{cell.name}.json", record)
        print(f"{cell.name}: " + ", ".join(f"{d} {p:.3f}" for d, p in record["ppl"].items())
              + (f", tune {record['tune_seconds']} s" if record["tune_seconds"] is not None else ""), flush=True)
    print(write_table(a.out))


if __name__ == "__main__":
    main()
