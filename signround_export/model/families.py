"""The model families this project handles: one record each, read by every stage.

A family is what differs between decoder-only models that share the LLaMA block (pre-norm attention
and a gated MLP): how its config.json maps to ModelConfig, what its blocks carry, and its names in
each target. Stages look features up here instead of testing model_type.

| family      | llama.cpp arch | q/k rows for llama.cpp | q/k/v bias            | q/k norm per head | sliding windows    | Gemma block |
| ----------- | -------------- | ---------------------- | --------------------- | ----------------- | ------------------ | ----------- |
| llama       | llama          | interleaved (permuted) | config attention_bias | no                | none               | no          |
| mistral     | llama          | interleaved (permuted) | config attention_bias | no                | every layer        | no          |
| qwen2       | qwen2          | as stored (halves)     | always                | no                | use_sliding_window | no          |
| qwen3       | qwen3          | as stored (halves)     | config attention_bias | yes               | use_sliding_window | no          |
| phi3        | phi3           | as stored (halves)     | never                 | no                | every layer        | no          |
| gemma2      | gemma2         | as stored (halves)     | config attention_bias | no                | alternating (2)    | yes         |
| gemma3_text | gemma3         | as stored (halves)     | config attention_bias | yes               | alternating (6)    | yes         |

Family.linears: phi3's are fused (qkv_proj, o_proj, gate_up_proj, down_proj), split in the forward; the
others' separate (q, k, v, o, gate, up, down).

Phi-3 (and Phi-3.5, Phi-4-mini) also brings partial rotary (`partial_rotary_factor`) and `longrope`
scaling; those are read from config.json by model/config.py, whatever the family.

Sliding-window attention is one mechanism for every family: ModelConfig.windows holds each layer's
window (None for a layer that attends to the whole past), and `Family.windows` says how config.json
places them, read by model/config.py's layer_windows as transformers reads it:
- None: no layer has a window (llama's config has no sliding_window).
- "every_layer": `sliding_window` on every layer, null for none (mistral, phi3).
- "use_sliding_window": only when `use_sliding_window` is true; then on the layers `layer_types` marks
  "sliding_attention", or without layer_types on layers max_window_layers and up (qwen2, qwen3).
- "alternating": on the layers `layer_types` marks "sliding_attention", or without layer_types on every
  layer but each Nth (N: config's sliding_window_pattern, else Family.global_every: the number in
  brackets above); gemma2 and gemma3_text. These local layers also take gemma3_text's local RoPE base
  (rope_local_base_freq), whatever their window's length.
A config without the sliding_window key takes transformers' default for the family (Family.default_window:
4096, none for phi3).

The Gemma block: RMSNorm scales by (1 + weight), computed in float32; embeddings are multiplied by
sqrt(hidden_size); the MLP is GeGLU (tanh-approximate GELU); the attention and MLP outputs are normed
before they join the residual (post_attention_layernorm, post_feedforward_layernorm) and the MLP reads
pre_feedforward_layernorm; attention scores are scaled by query_pre_attn_scalar^-1/2 and may be
soft-capped, as may the logits.
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
    windows: str | None = None  # how config.json places sliding windows on layers (see the module docstring)
    default_window: int | None = 4096  # transformers' sliding_window when config.json leaves the key out
    gguf_windows: bool = False  # llama.cpp's arch reads a sliding window from the file (export/gguf/write.py)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight), in float32 when not 0 (Gemma: 1)
    sandwich_norms: bool = False  # attention and MLP outputs normed before the residual; MLP input norm is
    # pre_feedforward_layernorm (post_attention_layernorm then norms the attention output)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden_size)
    activation: str = "silu"  # the gated MLP's activation, by transformers' name (config.json must agree)
    attn_softcap: bool = False  # attention scores soft-capped by config's attn_logit_softcapping (gemma2;
    # transformers' Gemma 3 keeps the key but never applies it, nor does llama.cpp's gemma3)
    global_every: int | None = None  # windows "alternating" without layer_types: every Nth layer is global
    local_rope_base: float | None = None  # local layers' RoPE base when config.json names none; None: global RoPE
    # llama.cpp's graph for gguf_arch, where it hard-codes what a config could contradict:
    gguf_attn_softcap: bool = False  # soft-caps attention logits whatever the file says (50 without the key)
    gguf_final_softcap: str = "never"  # "never", "optional" (from its key) or "always" (30 without the key)
    gguf_tied_head: bool = False  # reads the head from token_embd: no separate output tensor
    gguf_wide_scale_layers: int | None = None  # block count at which it scales attention by
    # 1/sqrt(hidden/heads) (Gemma's 27B); any other block count: 1/sqrt(head_dim)
    yarn_is_longrope: bool = False  # transformers' config class reads rope_type "yarn" as longrope (old Phi-3 configs)

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
    Family("mistral", gguf_arch="llama", gguf_rope_permute=True, windows="every_layer"),
    Family("qwen2", gguf_arch="qwen2", gguf_rope_permute=False, qkv_bias=True, windows="use_sliding_window"),
    Family("qwen3", gguf_arch="qwen3", gguf_rope_permute=False, qk_norm=True, windows="use_sliding_window"),
    Family("phi3", gguf_arch="phi3", gguf_rope_permute=False, qkv_bias=False, linears=FUSED_LINEARS,
           windows="every_layer", default_window=None, yarn_is_longrope=True),
    Family("gemma2", gguf_arch="gemma2", gguf_rope_permute=False, windows="alternating", gguf_windows=True,
           norm_offset=1.0, sandwich_norms=True, embed_scale=True, activation="gelu_pytorch_tanh", global_every=2,
           attn_softcap=True, gguf_attn_softcap=True, gguf_final_softcap="always", gguf_tied_head=True, gguf_wide_scale_layers=46),
    Family("gemma3_text", gguf_arch="gemma3", gguf_rope_permute=False, qk_norm=True, windows="alternating",
           gguf_windows=True, norm_offset=1.0, sandwich_norms=True, embed_scale=True,
           activation="gelu_pytorch_tanh", global_every=6, local_rope_base=10000.0, gguf_final_softcap="optional",
           gguf_wide_scale_layers=62),
)}


def block_norms(family: Family) -> tuple[str, ...]:
    """The float norm weights of one decoder block, by HF name relative to the block."""
    norms = ("input_layernorm", "post_attention_layernorm")
    if family.sandwich_norms:
        norms += ("pre_feedforward_layernorm", "post_feedforward_layernorm")
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
