"""The model families this project handles: one record each, read by every stage.

A family is what differs between decoder-only models that share the LLaMA block (pre-norm attention
and a gated MLP): how its config.json maps to ModelConfig, what its blocks carry, and its names in
each target. Stages look features up here instead of testing model_type.

| family  | llama.cpp arch | q/k rows for llama.cpp | q/k/v bias            | q/k norm per head | sliding windows  |
| ------- | -------------- | ---------------------- | --------------------- | ----------------- | ---------------- |
| llama   | llama          | interleaved (permuted) | config attention_bias | no                | none             |
| mistral | llama          | interleaved (permuted) | config attention_bias | no                | every layer      |
| qwen2   | qwen2          | as stored (halves)     | always                | no                | use_sliding_window |
| qwen3   | qwen3          | as stored (halves)     | config attention_bias | yes               | use_sliding_window |

Sliding-window attention is one mechanism for every family: ModelConfig.windows holds each layer's
window (None for a layer that attends to the whole past), and `Family.windows` says how config.json
places them, read by model/config.py's layer_windows as transformers reads it:
- None: no layer has a window (llama's config has no sliding_window).
- "every_layer": `sliding_window` on every layer, null for none (mistral).
- "use_sliding_window": only when `use_sliding_window` is true; then on the layers `layer_types` marks
  "sliding_attention", or without layer_types on layers max_window_layers and up (qwen2, qwen3).
A family whose layers alternate (Gemma) adds its own placement here; the stages only read the windows.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    gguf_arch: str  # llama.cpp's general.architecture
    gguf_rope_permute: bool  # llama.cpp's arch rotates interleaved pairs: q/k rows are permuted for it
    qkv_bias: bool | None = None  # True: q/k/v always have biases; None: as config.json's attention_bias
    qk_norm: bool = False  # RMSNorm over each head of q and k (self_attn.q_norm, k_norm) before RoPE
    windows: str | None = None  # how config.json places sliding windows on layers (see the module docstring)
    gguf_windows: bool = False  # llama.cpp's arch reads a sliding window from the file (export/gguf/write.py)

    @property
    def genai_type(self) -> str:
        """onnxruntime-genai's model type in genai_config.json."""
        return self.model_type


FAMILIES = {f.model_type: f for f in (
    Family("llama", gguf_arch="llama", gguf_rope_permute=True),
    Family("mistral", gguf_arch="llama", gguf_rope_permute=True, windows="every_layer"),
    Family("qwen2", gguf_arch="qwen2", gguf_rope_permute=False, qkv_bias=True, windows="use_sliding_window"),
    Family("qwen3", gguf_arch="qwen3", gguf_rope_permute=False, qk_norm=True, windows="use_sliding_window"),
)}


def block_norms(family: Family) -> tuple[str, ...]:
    """The float norm weights of one decoder block, by HF name relative to the block."""
    norms = ("input_layernorm", "post_attention_layernorm")
    if family.qk_norm:
        norms += ("self_attn.q_norm", "self_attn.k_norm")
    return tuple(n + ".weight" for n in norms)
