"""A random-weight model folder in bfloat16, written shard by shard: for measuring memory and speed at
sizes this machine cannot hold in float32 (weights of std 0.02, norms near 1; the text it gives is noise).

    .venv/bin/python tools/random_model.py CONFIG_JSON OUT [--tokenizer FOLDER] [--shard-layers 4]

Never more than one shard is in memory: the embedding alone, then `--shard-layers` blocks at a time,
then the final norm (and an untied lm_head). The tokenizer files are copied from --tokenizer (default
the SmolLM2 folder), whose ids must lie below the config's vocab_size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from signround_export.model.folder import INDEX, copy_tokenizer_files  # noqa: E402
from tools.common import MODEL  # noqa: E402


def block_tensors(cfg: dict, i: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    shapes = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h), "mlp.down_proj": (h, f)}
    out = {f"model.layers.{i}.{n}.weight": weight(s, g) for n, s in shapes.items()}
    for n in ("input_layernorm", "post_attention_layernorm"):
        out[f"model.layers.{i}.{n}.weight"] = norm(h, g)
    return out


def weight(shape, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def norm(h: int, g: torch.Generator) -> torch.Tensor:
    return (1 + 0.05 * torch.randn(h, generator=g)).to(torch.bfloat16)


def shards(cfg: dict, per: int, g: torch.Generator):
    """The weights, one shard at a time: the embedding, `per` blocks at a time, the final norm (and an
    untied lm_head)."""
    h, vocab = cfg["hidden_size"], cfg["vocab_size"]
    yield {"model.embed_tokens.weight": weight((vocab, h), g)}
    for start in range(0, cfg["num_hidden_layers"], per):
        yield {n: t for i in range(start, min(start + per, cfg["num_hidden_layers"]))
               for n, t in block_tensors(cfg, i, g).items()}
    last = {"model.norm.weight": norm(h, g)}
    if not cfg.get("tie_word_embeddings", False):
        last["lm_head.weight"] = weight((vocab, h), g)
    yield last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path, default=MODEL)
    ap.add_argument("--shard-layers", type=int, default=4)
    args = ap.parse_args()
    cfg = json.loads(args.config.read_text())
    count = 2 + -(-cfg["num_hidden_layers"] // args.shard_layers)
    args.out.mkdir(parents=True)
    weight_map = {}
    for k, tensors in enumerate(shards(cfg, args.shard_layers, torch.Generator().manual_seed(0)), 1):
        name = f"model-{k:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(args.out / name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        print(f"{name}: {len(tensors)} tensors", file=sys.stderr)
    (args.out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    shutil.copyfile(args.config, args.out / "config.json")
    copy_tokenizer_files(args.tokenizer, args.out)


if __name__ == "__main__":
    main()
