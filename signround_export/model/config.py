"""The hyperparameters of a decoder-only model, read from its Hugging Face config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ModelError, UnsupportedModelError
from .families import FAMILIES, Family

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


# rope_type -> the parameters config.json must give for it (transformers' names)
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor"),
}
ROPE_ALIASES = {"su": "longrope"}  # Phi-3's first configs


@dataclass(frozen=True)
class RopeScaling:
    """How a config stretches RoPE past its training context: "linear" divides every inverse frequency by
    factor; "llama3" divides the low frequencies by factor, keeps the high ones and blends in between;
    "longrope" divides each by its short_factor up to original_max_positions (long_factor past it, which
    is refused here) and scales cos and sin by attention_factor."""

    type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0

    @classmethod
    def from_hf(cls, rope: dict, max_positions: int, original: int | None = None) -> "RopeScaling | None":
        """The scaling a rope_parameters (or rope_scaling) dict asks for; None for plain RoPE. original:
        a top-level original_max_position_embeddings, which wins over the dict's (as in transformers)."""
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_type = ROPE_ALIASES.get(rope_type, rope_type)
        if rope_type == "default":
            return None
        if rope_type not in ROPE_SCALINGS:
            raise UnsupportedModelError(
                f"rope scaling {rope_type!r} is not supported; supported: plain RoPE, {', '.join(ROPE_SCALINGS)} "
                "(the ONNX and GGUF targets cannot express the others exactly)")
        missing = [k for k in ROPE_SCALINGS[rope_type] if k not in rope]
        if missing:
            raise ModelError(f"rope scaling {rope_type!r} needs {', '.join(missing)} in config.json's rope_parameters")
        original = int(original or rope.get("original_max_position_embeddings") or max_positions)
        if rope_type == "longrope":
            return cls.longrope(rope, max_positions, original)
        return cls(rope_type, float(rope["factor"]), float(rope.get("low_freq_factor", 1.0)),
                   float(rope.get("high_freq_factor", 4.0)), original)

    @classmethod
    def longrope(cls, rope: dict, max_positions: int, original: int) -> "RopeScaling":
        """transformers' _compute_longrope_parameters: factor defaults to max / original positions, and
        the attention factor to sqrt(1 + log(factor) / log(original)) (1 when factor <= 1)."""
        factor = float(rope.get("factor") or max_positions / original)
        attention = rope.get("attention_factor")
        if attention is None:
            attention = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
        return cls("longrope", factor, original_max_positions=original,
                   short_factor=tuple(float(f) for f in rope["short_factor"]),
                   long_factor=tuple(float(f) for f in rope["long_factor"]), attention_factor=float(attention))


def check_full_attention(hf: dict, model_type: str, max_positions: int) -> None:
    """Refuse sliding-window attention by name: the forward and both exports attend to the whole
    context. A window is on when use_sliding_window says so (Qwen) or, without that key, when
    sliding_window is set (Mistral); a window as long as the context changes nothing."""
    window = hf.get("sliding_window")
    on = hf["use_sliding_window"] if "use_sliding_window" in hf else window is not None
    if on and (window is None or window < max_positions):
        key = "use_sliding_window is true" if hf.get("use_sliding_window") else f"sliding_window is {window}"
        raise UnsupportedModelError(
            f"{key} in this {model_type} config: sliding-window attention is not supported; only models whose "
            "every layer attends to the whole context can be quantized"
        )


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    tie_word_embeddings: bool
    attention_bias: bool
    rope_scaling: RopeScaling | None = None
    partial_rotary_factor: float = 1.0  # the share of each head's dimensions that rotate (the first ones)

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        max_positions = hf.get("max_position_embeddings", 4096)
        check_full_attention(hf, model_type, max_positions)
        rope_scaling = RopeScaling.from_hf(rope, max_positions, hf.get("original_max_position_embeddings"))
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        family = FAMILIES[model_type]
        cfg = cls(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=head_dim,
            rms_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
            max_positions=max_positions,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=family.qkv_bias if family.qkv_bias is not None else hf.get("attention_bias", False),
            rope_scaling=rope_scaling,
            partial_rotary_factor=float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
        )
        cfg.check_rotary()
        return cfg

    def check_rotary(self) -> None:
        """A rotary width the forward can split, and longrope factors for each of its pairs."""
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ModelError(f"partial_rotary_factor {self.partial_rotary_factor} of head_dim {self.head_dim} gives "
                             f"{self.rotary_dim} rotary dimensions; they must be a positive even number")
        s = self.rope_scaling
        for name in ("short_factor", "long_factor"):
            if s is not None and s.type == "longrope" and len(getattr(s, name)) != self.rotary_dim // 2:
                raise ModelError(f"longrope's {name} has {len(getattr(s, name))} values; this config rotates "
                                 f"{self.rotary_dim} dimensions per head, so it needs {self.rotary_dim // 2}")

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def rotary_dim(self) -> int:
        """How many of each head's dimensions rotate (all of them unless partial_rotary_factor < 1)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def context_length(self) -> int:
        """The longest sequence the forward and the exports handle: longrope's original context (its long
        factors past it are refused), else max_position_embeddings."""
        s = self.rope_scaling
        if s is not None and s.type == "longrope":
            return min(s.original_max_positions, self.max_positions)
        return self.max_positions
