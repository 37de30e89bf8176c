"""The tensors a config implies, by name and shape, and the check of a folder's tensors against them.

Every command reads its model through one door (model/load.py: load_float_model, open_checkpoint), and
the door checks the tensors' names and shapes from the safetensors headers alone, before any weight is
read or any file written: a config.json that no longer describes its weights is refused by name there,
instead of breaking a forward or writing a file no runtime can load.

| tensor (blocks: model.layers.{i}.)        | shape                   | there when                       |
| ----------------------------------------- | ----------------------- | -------------------------------- |
| model.embed_tokens.weight                 | [vocab, hidden]         | always                           |
| model.norm.weight                         | [hidden]                | always                           |
| lm_head.weight                            | [vocab, hidden]         | tie_word_embeddings is false     |
| self_attn.q_proj.weight                   | [q, hidden]             | the family's linears             |
| self_attn.k_proj.weight, v_proj.weight    | [kv, hidden]            | the family's linears             |
| self_attn.qkv_proj.weight                 | [q + 2 kv, hidden]      | the family's linears (fused)     |
| self_attn.o_proj.weight                   | [hidden, q]             | the family's linears             |
| mlp.gate_proj.weight, up_proj.weight      | [intermediate, hidden]  | the family's linears             |
| mlp.gate_up_proj.weight                   | [2 intermediate, hidden]| the family's linears (fused)     |
| mlp.down_proj.weight                      | [hidden, intermediate]  | the family's linears             |
| a linear's .bias                          | [its rows]              | q/k/v (qkv): attention_bias true |
| the block's norms (families.block_norms)  | [hidden]; q/k norm [head_dim] | the family's norms         |

q is num_attention_heads x head_dim, kv num_key_value_heads x head_dim. A quantized checkpoint's layer
counts as its weight [N, K]. Tensors the table does not name are left alone (other tools store extra
ones), except blocks past num_hidden_layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import SignroundError
from .config import ModelConfig
from .families import FUSED_QKV, block_norms
from .folder import FLOAT_DTYPES, TensorHeader

# a dimension -> its value and the config.json fields it comes from
DIMENSIONS = {
    "vocab": (lambda c: c.vocab_size, "vocab_size"),
    "hidden": (lambda c: c.hidden_size, "hidden_size"),
    "intermediate": (lambda c: c.intermediate_size, "intermediate_size"),
    "head": (lambda c: c.head_dim, "head_dim"),
    "q": (lambda c: c.n_heads * c.head_dim, "num_attention_heads x head_dim"),
    "kv": (lambda c: c.n_kv_heads * c.head_dim, "num_key_value_heads x head_dim"),
    "qkv": (lambda c: (c.n_heads + 2 * c.n_kv_heads) * c.head_dim,
            "(num_attention_heads + 2 x num_key_value_heads) x head_dim"),
    "2 intermediate": (lambda c: 2 * c.intermediate_size, "2 x intermediate_size"),
}
# HF name -> its shape by dimension; block tensors relative to model.layers.{i}.
MODEL_SHAPES = {"model.embed_tokens.weight": ("vocab", "hidden"), "model.norm.weight": ("hidden",),
                "lm_head.weight": ("vocab", "hidden")}
LINEAR_SHAPES = {
    "self_attn.q_proj": ("q", "hidden"), "self_attn.k_proj": ("kv", "hidden"), "self_attn.v_proj": ("kv", "hidden"),
    FUSED_QKV: ("qkv", "hidden"), "self_attn.o_proj": ("hidden", "q"),
    "mlp.gate_proj": ("intermediate", "hidden"), "mlp.up_proj": ("intermediate", "hidden"),
    "mlp.gate_up_proj": ("2 intermediate", "hidden"), "mlp.down_proj": ("hidden", "intermediate"),
}
HEAD_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # per head: [head_dim]
ATTENTION_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", FUSED_QKV)
BLOCK = re.compile(r"model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Expected:
    name: str
    dims: tuple[str, ...]  # keys of DIMENSIONS
    needed_by: str | None  # why the tensor must be there (the config's words); None: it may be absent


def expected_tensors(cfg: ModelConfig) -> list[Expected]:
    """Every tensor of the table above for this config, in file order (embedding, blocks, head)."""
    fam = cfg.family
    out = [Expected("model.embed_tokens.weight", MODEL_SHAPES["model.embed_tokens.weight"], "every model")]
    for i in range(cfg.n_layers):
        p, why = f"model.layers.{i}.", f"num_hidden_layers {cfg.n_layers} (a {fam.model_type} block)"
        for module in fam.linears:
            out.append(Expected(p + module + ".weight", LINEAR_SHAPES[module], why))
            biased = cfg.attention_bias and module in ATTENTION_INPUTS
            needed = "attention_bias true" if biased else None
            out.append(Expected(p + module + ".bias", LINEAR_SHAPES[module][:1], needed))
        out += [Expected(p + n, ("head",) if n in HEAD_NORMS else ("hidden",), why) for n in block_norms(fam)]
    out.append(Expected("model.norm.weight", MODEL_SHAPES["model.norm.weight"], "every model"))
    untied = None if cfg.tie_word_embeddings else "tie_word_embeddings false"
    out.append(Expected("lm_head.weight", MODEL_SHAPES["lm_head.weight"], untied))
    return out


def check_tensors(cfg: ModelConfig, shapes: Mapping[str, tuple[int, ...]], where: str,
                  error: type[SignroundError]) -> None:
    """error naming the first tensor that config.json (at `where`) implies and shapes (name -> shape, a
    quantized layer's [N, K] under its weight's name) lacks or holds in another shape, or the first block
    past num_hidden_layers; the message names the fields the expected shape comes from."""
    check_blocks(cfg, shapes, where, error)
    for e in expected_tensors(cfg):
        if e.name not in shapes:
            if e.needed_by is not None:
                raise error(f"{where}: config.json's {e.needed_by} implies tensor {e.name}, which the weights "
                            "lack; config.json does not describe these weights (correct it, or give the model's own)")
            continue
        want = tuple(DIMENSIONS[d][0](cfg) for d in e.dims)
        if tuple(shapes[e.name]) != want:
            because = ", ".join(f"{DIMENSIONS[d][1]} = {DIMENSIONS[d][0](cfg)}" for d in e.dims)
            raise error(f"{where}: tensor {e.name} has shape {list(shapes[e.name])}, but config.json implies "
                        f"{list(want)} ({because}); config.json does not describe these weights (correct it, or "
                        "give the model's own)")


def check_blocks(cfg: ModelConfig, names, where: str, error: type[SignroundError]) -> None:
    """The weights hold blocks 0 .. num_hidden_layers - 1 and no others (checked first, so that a huge
    num_hidden_layers is refused before its tensors are listed)."""
    blocks = {int(m[1]) for m in map(BLOCK.match, names) if m}
    past = sorted(b for b in blocks if b >= cfg.n_layers)
    if past:
        raise error(f"{where}: the weights hold block {past[0]} (model.layers.{past[0]}.*), but config.json's "
                    f"num_hidden_layers is {cfg.n_layers}; config.json does not describe these weights (correct it)")
    lacking = min(set(range(len(blocks) + 1)) - blocks)
    if lacking < cfg.n_layers:
        raise error(f"{where}: config.json's num_hidden_layers {cfg.n_layers} implies block {lacking} "
                    f"(model.layers.{lacking}.*), which the weights lack; config.json does not describe these weights "
                    "(correct it, or give the model's own)")


def check_float_dtypes(cfg: ModelConfig, headers: Mapping[str, TensorHeader], error: type[SignroundError]) -> None:
    """error naming the first tensor of the table above that a float model stores in a dtype that is not float."""
    for e in expected_tensors(cfg):
        h = headers.get(e.name)
        if h is not None and h.dtype not in FLOAT_DTYPES:
            raise error(f"{h.file}: tensor {e.name} is stored as {h.dtype}; a float model's weights are one of "
                        f"{', '.join(FLOAT_DTYPES)} (rebuild or re-download it)")
