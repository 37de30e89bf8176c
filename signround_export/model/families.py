"""The model families this project handles: one record each, read by every stage.

A family is what differs between decoder-only models that share the LLaMA block (pre-norm attention
and a gated MLP): how its config.json maps to ModelConfig, what its blocks carry, and its names in
each target. Stages look features up here instead of testing model_type.

| family  | llama.cpp arch | q/k rows for llama.cpp | q/k/v bias            |
| ------- | -------------- | ---------------------- | --------------------- |
| llama   | llama          | interleaved (permuted) | config attention_bias |
| mistral | llama          | interleaved (permuted) | config attention_bias |
| qwen2   | qwen2          | as stored (halves)     | always                |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    gguf_arch: str  # llama.cpp's general.architecture
    gguf_rope_permute: bool  # llama.cpp's arch rotates interleaved pairs: q/k rows are permuted for it
    qkv_bias: bool | None = None  # True: q/k/v always have biases; None: as config.json's attention_bias

    @property
    def genai_type(self) -> str:
        """onnxruntime-genai's model type in genai_config.json."""
        return self.model_type


FAMILIES = {f.model_type: f for f in (
    Family("llama", gguf_arch="llama", gguf_rope_permute=True),
    Family("mistral", gguf_arch="llama", gguf_rope_permute=True),
    Family("qwen2", gguf_arch="qwen2", gguf_rope_permute=False, qkv_bias=True),
)}
