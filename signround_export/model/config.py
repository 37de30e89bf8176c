"""The hyperparameters of a decoder-only model, read from its Hugging Face config.json."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError, UnsupportedModelError
from .families import FAMILIES, Family

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# The quantizable linears of one decoder block, in the order they run.
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


# rope_type -> the parameters config.json must give for it (transformers' names)
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
}


@dataclass(frozen=True)
class RopeScaling:
    """How a config stretches RoPE past its training context: "linear" divides every inverse frequency by
    factor; "llama3" divides the low frequencies by factor, keeps the high ones and blends in between."""

    type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    @classmethod
    def from_hf(cls, rope: dict, max_positions: int) -> "RopeScaling | None":
        """The scaling a rope_parameters (or rope_scaling) dict asks for; None for plain RoPE."""
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            return None
        if rope_type not in ROPE_SCALINGS:
            raise UnsupportedModelError(
                f"rope scaling {rope_type!r} is not supported; supported: plain RoPE, {', '.join(ROPE_SCALINGS)} "
                "(the ONNX and GGUF targets cannot express the others exactly)")
        missing = [k for k in ROPE_SCALINGS[rope_type] if k not in rope]
        if missing:
            raise ModelError(f"rope scaling {rope_type!r} needs {', '.join(missing)} in config.json's rope_parameters")
        return cls(rope_type, float(rope["factor"]), float(rope.get("low_freq_factor", 1.0)),
                   float(rope.get("high_freq_factor", 4.0)),
                   int(rope.get("original_max_position_embeddings") or max_positions))


DEFAULT_WINDOW = 4096  # transformers' sliding_window when config.json leaves the key out (Mistral, Qwen2/3)
LAYER_TYPES = {"full_attention": False, "sliding_attention": True}  # layer_types' values: sliding or not


def layer_windows(hf: dict, family: Family, n_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: the layer attends to the whole past), placed as transformers
    places them for the family (families.py). A layer with window W lets position t attend to s with
    t - W < s <= t, transformers' sliding_window_overlay."""
    window = hf.get("sliding_window", DEFAULT_WINDOW)
    if family.windows is None or window is None:
        return (None,) * n_layers
    if family.windows == "every_layer":
        sliding = [True] * n_layers
    elif family.windows == "use_sliding_window":
        if not hf.get("use_sliding_window", False):
            return (None,) * n_layers
        sliding = sliding_layers(hf, n_layers)
    else:
        raise AssertionError(f"family {family.model_type}: unknown window placement {family.windows!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ModelError(f"sliding_window {window!r} in config.json: give a positive number of tokens, or null")
    return tuple(window if s else None for s in sliding)


def sliding_layers(hf: dict, n_layers: int) -> list[bool]:
    """Which layers slide: layer_types' "sliding_attention" entries, else layers from max_window_layers on
    (Qwen2/3's rule, transformers' default max_window_layers 28)."""
    types = hf.get("layer_types")
    if types is None:
        first = hf.get("max_window_layers", 28)
        return [i >= first for i in range(n_layers)]
    if len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
        raise ModelError(f"layer_types in config.json must give one of {', '.join(LAYER_TYPES)} for each of "
                         f"the {n_layers} layers; it is {types!r}")
    return [LAYER_TYPES[t] for t in types]


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
    # each layer's sliding window (layer_windows), None for a layer that attends to the whole past; empty:
    # every layer attends to the whole past
    windows: tuple[int | None, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        max_positions = hf.get("max_position_embeddings", 4096)
        rope_scaling = RopeScaling.from_hf(rope, max_positions)
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
        return cls(
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
            attention_bias=FAMILIES[model_type].qkv_bias or hf.get("attention_bias", False),
            rope_scaling=rope_scaling,
            windows=layer_windows(hf, FAMILIES[model_type], hf["num_hidden_layers"]),
        )

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def window(self, layer: int) -> int | None:
        """Layer's sliding window where it is shorter than the context, so that it limits what a position
        sees; None where the layer sees every position the model can hold."""
        w = self.windows[layer] if self.windows else None
        return w if w is not None and w < self.max_positions else None
