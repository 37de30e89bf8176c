"""A copy of a model folder that keeps only its first N decoder blocks: real weights, a shorter run.

    .venv/bin/python tools/first_layers.py MODEL OUT --layers N

For timing per-block work (a tuning step, a block's fixed costs) on the real model without tuning all
of it: both tools tune the N blocks exactly as they tune those blocks of the whole model (same weights,
same calibration windows), so their time ratio is the whole run's, loading aside. The text such a model
writes is not meaningful; its perplexity is not an accuracy figure. config.json gets
num_hidden_layers = N (and per-layer lists such as layer_types cut to N); every tensor of a block at or
beyond N is left out; the tokenizer files are copied.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from signround_export.atomic import atomic_dir  # noqa: E402
from signround_export.model.folder import copy_tokenizer_files  # noqa: E402

BLOCK = re.compile(r"^model\.layers\.(\d+)\.")


def kept(name: str, layers: int) -> bool:
    m = BLOCK.match(name)
    return m is None or int(m.group(1)) < layers


def first_layers(model: Path, out: Path, layers: int) -> None:
    config = json.loads((model / "config.json").read_text())
    total = config["num_hidden_layers"]
    if not 0 < layers <= total:
        raise SystemExit(f"--layers {layers}: {model} has {total} decoder blocks; give 1 to {total}")
    config["num_hidden_layers"] = layers
    for key, value in list(config.items()):
        if isinstance(value, list) and len(value) == total:  # per-layer settings (layer_types, ...)
            config[key] = value[:layers]
    tensors = {}
    for path in sorted(model.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            tensors.update({n: f.get_tensor(n) for n in f.keys() if kept(n, layers)})
    with atomic_dir(out) as tmp:  # a run cut short leaves no half-written folder
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer_files(model, tmp)
    print(f"{out}: the first {layers} of {total} blocks, {len(tensors)} tensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, required=True)
    a = ap.parse_args()
    first_layers(a.model, a.out, a.layers)


if __name__ == "__main__":
    main()
