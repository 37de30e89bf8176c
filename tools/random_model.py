"""A random-weight model folder in bfloat16, written shard by shard: for measuring memory and speed at
sizes this machine cannot hold in float32 (weights of std 0.02, norms near their neutral value; the
text it gives is noise).

    .venv/bin/python tools/random_model.py CONFIG_JSON OUT [--layers N] [--tokenizer FOLDER] [--shard-layers 4]

Every tensor's name and shape comes from transformers' model of the config built on the meta device
(no memory), so any family transformers knows is written with its own tensors. Never more than one
shard is in memory: the embedding alone, then `--shard-layers` blocks at a time, then the rest (final
norm, an untied lm_head). The tokenizer files are copied from --tokenizer (default the SmolLM2 folder),
whose ids must lie below the config's vocab_size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from signround_export.model.folder import INDEX, copy_tokenizer_files  # noqa: E402
from tools.common import MODEL  # noqa: E402


def shapes_of(config: dict) -> tuple[dict[str, tuple[int, ...]], dict]:
    """Every stored tensor's name and shape, and the full config.json transformers writes for config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    hf = cfg.to_dict() | {"architectures": [type(model).__name__], "torch_dtype": "bfloat16"}
    return shapes, hf


def random_tensor(name: str, shape: tuple[int, ...], model_type: str, g: torch.Generator) -> torch.Tensor:
    if len(shape) == 2:
        return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    # norms (and biases) near their neutral value: Gemma's norms multiply by 1 + w, so theirs near 0
    neutral = 0.0 if model_type.startswith("gemma") or name.endswith(".bias") else 1.0
    return (neutral + 0.05 * torch.randn(shape, generator=g)).to(torch.bfloat16)


def shard_names(shapes: dict, n_layers: int, per: int) -> list[list[str]]:
    """The tensor names of each shard: the embedding, `per` blocks at a time, the rest."""
    def block(name: str) -> int | None:
        return int(name.split(".")[2]) if name.startswith("model.layers.") else None

    groups = [[n for n in shapes if n == "model.embed_tokens.weight"]]
    for start in range(0, n_layers, per):
        groups.append([n for n in shapes if block(n) is not None and start <= block(n) < start + per])
    groups.append([n for n in shapes if block(n) is None and n != "model.embed_tokens.weight"])
    return [g for g in groups if g]


def write_random_model(config: dict, out: Path, *, tokenizer: Path = MODEL, shard_layers: int = 4,
                       quiet: bool = False) -> Path:
    shapes, hf = shapes_of(config)
    groups = shard_names(shapes, hf["num_hidden_layers"], shard_layers)
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    weight_map = {}
    for k, names in enumerate(groups, 1):
        fname = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: random_tensor(n, shapes[n], hf["model_type"], g) for n in names}, str(out / fname),
                  metadata={"format": "pt"})
        weight_map |= dict.fromkeys(names, fname)
        if not quiet:
            print(f"{fname}: {len(names)} tensors", file=sys.stderr)
    (out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    copy_tokenizer_files(tokenizer, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, help="keep only the first N blocks (default: the config's)")
    ap.add_argument("--tokenizer", type=Path, default=MODEL)
    ap.add_argument("--shard-layers", type=int, default=4)
    args = ap.parse_args()
    config = json.loads(args.config.read_text())
    config.pop("architectures", None)
    config.pop("torch_dtype", None)
    if args.layers:
        config["num_hidden_layers"] = args.layers
    write_random_model(config, args.out, tokenizer=args.tokenizer, shard_layers=args.shard_layers)


if __name__ == "__main__":
    main()
