"""The model families this project handles: one record each, read by every stage.

A family is what differs between decoder-only models that share the LLaMA block (pre-norm attention
and a gated MLP): how its config.json maps to ModelConfig, what its blocks carry, and its names in
each target. Stages look features up here instead of testing model_type.

| family  | llama.cpp arch | q/k rows for llama.cpp | q/k/v bias            | q/k norm per head | linears            |
| ------- | -------------- | ---------------------- | --------------------- | ----------------- | ------------------ |
| llama   | llama          | interleaved (permuted) | config attention_bias | no                | separate           |
| mistral | llama          | interleaved (permuted) | config attention_bias | no                | separate           |
| qwen2   | qwen2          | as stored (halves)     | always                | no                | separate           |
| qwen3   | qwen3          | as stored (halves)     | config attention_bias | yes               | separate           |
| phi3    | phi3           | as stored (halves)     | never                 | no                | fused qkv, gate_up |

(separate: q, k, v, o, gate, up, down; fused: qkv, o, gate_up, down.)

Phi-3 (and Phi-3.5, Phi-4-mini) also brings partial rotary (`partial_rotary_factor`) and `longrope`
scaling; those are read from config.json by model/config.py, whatever the family.
"""

from __future__ import annotations

from dataclasses import dataclass

# The quantizable linears of one decoder block, in the order they run (HF names relative to the block).
SEPARATE_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# q, k and v as one linear (rows: q, then k, then v), gate and up as one (rows: gate, then up), as Phi-3 stores them
FUSED_QKV, FUSED_GATE_UP = "self_attn.qkv_proj", "mlp.gate_up_proj"
FUSED_LINEARS = (FUSED_QKV, "self_attn.o_proj", FUSED_GATE_UP, "mlp.down_proj")


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    gguf_arch: str  # llama.cpp's general.architecture
    gguf_rope_permute: bool  # llama.cpp's arch rotates interleaved pairs: q/k rows are permuted for it
    qkv_bias: bool | None = None  # True: q/k/v always have biases; False: never; None: as config.json's attention_bias
    qk_norm: bool = False  # RMSNorm over each head of q and k (self_attn.q_norm, k_norm) before RoPE
    linears: tuple[str, ...] = SEPARATE_LINEARS  # the block's quantizable linears, in run order

    @property
    def fused_qkv(self) -> bool:
        return FUSED_QKV in self.linears

    @property
    def fused_gate_up(self) -> bool:
        return FUSED_GATE_UP in self.linears

    @property
    def genai_type(self) -> str:
        """onnxruntime-genai's model type in genai_config.json."""
        return self.model_type


FAMILIES = {f.model_type: f for f in (
    Family("llama", gguf_arch="llama", gguf_rope_permute=True),
    Family("mistral", gguf_arch="llama", gguf_rope_permute=True),
    Family("qwen2", gguf_arch="qwen2", gguf_rope_permute=False, qkv_bias=True),
    Family("qwen3", gguf_arch="qwen3", gguf_rope_permute=False, qk_norm=True),
    Family("phi3", gguf_arch="phi3", gguf_rope_permute=False, qkv_bias=False, linears=FUSED_LINEARS),
)}


def block_norms(family: Family) -> tuple[str, ...]:
    """The float norm weights of one decoder block, by HF name relative to the block."""
    norms = ("input_layernorm", "post_attention_layernorm")
    if family.qk_norm:
        norms += ("self_attn.q_norm", "self_attn.k_norm")
    return tuple(n + ".weight" for n in norms)


def foreign_linears(family: Family, names) -> list[str]:
    """The block linears among names (modules or their tensors, "model.layers.0.self_attn.q_proj[.weight]")
    that are another layout's than family's: q_proj in a phi3 model, qkv_proj in a llama one."""
    known = set(SEPARATE_LINEARS + FUSED_LINEARS)
    foreign = set()
    for name in names:
        parts = name.split(".")
        module = ".".join(parts[3:5])
        if parts[:2] == ["model", "layers"] and module in known and module not in family.linears:
            foreign.add(module)
    return sorted(foreign)


def check_linears(family: Family, names, error: type[Exception]) -> None:
    """error naming the mismatch when the weights' block linears are not family's (config.json's model_type
    says one family, the tensors are another's)."""
    foreign = foreign_linears(family, names)
    if foreign:
        raise error(f"the weights have {', '.join(foreign)}, which a {family.model_type} block does not: its "
                    f"linears are {', '.join(family.linears)}; config.json's model_type does not match the weights")
