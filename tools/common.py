"""What the benchmark scripts share: paths, running a command, scoring a model with `signround eval`."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "smollm2-135m-instruct"
TEXT = REPO.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
SIGNROUND = str(REPO / ".venv" / "bin" / "signround")


def machine() -> str:
    """The CPU a benchmark ran on, for its header: the name, the cores, and the vector extensions that
    change the speeds measured here (int8 and bf16 kernels differ between AVX2 and AVX-512)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    extensions = [label for flag, label in (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "VNNI"),
                                            ("avx512_bf16", "BF16"), ("amx_tile", "AMX")) if flag in flags]
    return f"{name}, {os.cpu_count()} cores" + (f", {' '.join(extensions)}" if extensions else "")


def run(cmd: list[str], env: dict | None = None) -> str:
    """Run a command (env: variables over this process's), echoing it; stop the benchmark when it fails.
    Returns its stdout."""
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=None if env is None else os.environ | env)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}")
    return r.stdout


def evaluate(model: Path, out: Path, windows: int = 40, text: Path | None = TEXT) -> float:
    """Perplexity of a float model or checkpoint (windows of 512, no BOS), saved to out: on text, by
    default wikitext-2; None is eval's own default, the held-out pydoc slice."""
    chosen = ["--text", str(text)] if text is not None else []
    run([SIGNROUND, "eval", str(model), *chosen, "--windows", str(windows), "--json", str(out), "--quiet"])
    return json.loads(out.read_text())["ppl"]
