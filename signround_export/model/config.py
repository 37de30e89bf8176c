"""The hyperparameters of a decoder-only model, read from its Hugging Face config.json."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ModelError, UnsupportedModelError
from .families import FAMILIES, Family
from .fields import (FRACTION, POSITIVE, Consistency, Field, Rule, check_consistency, found, is_number,
                     read_fields)

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


# rope_type -> the parameters config.json must give for it (transformers' names)
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor"),
    "yarn": ("factor",),
}
ROPE_ALIASES = {"su": "longrope"}  # Phi-3's first configs
# rope_type -> why it is refused by name
ROPE_REFUSED = {
    "dynamic": "its frequencies change with the sequence length, which a fixed ONNX cos/sin cache and "
               "llama.cpp cannot express",
}


ROPE_NUMBERS = ("factor", "low_freq_factor", "high_freq_factor", "attention_factor", "original_max_position_embeddings")


def check_rope_numbers(rope: dict, required: tuple[str, ...]) -> None:
    """The scaling's parameters (its required ones, and ROPE_NUMBERS where given) are numbers above 0, or
    non-empty lists of them (longrope's per-pair factors)."""
    for key in required + tuple(k for k in ROPE_NUMBERS if rope.get(k) is not None and k not in required):
        value = rope[key]
        values = value if isinstance(value, list) and value else [value]
        if not all(is_number(v) and v > 0 for v in values):
            raise ModelError(f"{key} in config.json's rope_parameters is {found(value)}; it must be a number above 0"
                             + (" or a list of them" if isinstance(value, list) else "") + " (correct it)")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude for a scaling factor: 1 + 0.1 * mscale * ln(factor) (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class RopeScaling:
    """How a config stretches RoPE past its training context: "linear" divides every inverse frequency by
    factor; "llama3" divides the low frequencies by factor, keeps the high ones and blends in between;
    "longrope" divides each by its short_factor up to original_max_positions (long_factor past it, which
    is refused here) and scales cos and sin by attention_factor; "yarn" blends each pair's frequency
    between kept and divided by factor over the band beta_fast .. beta_slow (rotations within
    original_max_positions; band ends rounded outwards when truncate) and scales cos and sin by
    attention_factor."""

    type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True

    @classmethod
    def from_hf(cls, rope: dict, max_positions: int, original: int | None = None,
                aliases: dict[str, str] = ROPE_ALIASES) -> "RopeScaling | None":
        """The scaling a rope_parameters (or rope_scaling) dict asks for; None for plain RoPE. original:
        a top-level original_max_position_embeddings, which wins over the dict's (as in transformers);
        aliases: rope_type names read as another (the family's, see rope_aliases)."""
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if not isinstance(rope_type, str):
            raise ModelError(f"rope_type {found(rope_type)} in config.json's rope_parameters: give a name such as "
                             f"\"default\" or one of {', '.join(ROPE_SCALINGS)}")
        rope_type = aliases.get(rope_type, rope_type)
        if rope_type == "default":
            return None
        if rope_type not in ROPE_SCALINGS:
            why = ROPE_REFUSED.get(rope_type, "the ONNX and GGUF targets cannot express it exactly")
            raise UnsupportedModelError(
                f"rope scaling {rope_type!r} is not supported: {why}; supported: plain RoPE, "
                f"{', '.join(ROPE_SCALINGS)}")
        missing = [k for k in ROPE_SCALINGS[rope_type] if k not in rope]
        if missing:
            given = rope.get("rope_type", rope.get("type"))
            named = f"{rope_type!r}" + (f" (config.json's {given!r})" if given != rope_type else "")
            raise ModelError(f"rope scaling {named} needs {', '.join(missing)} in config.json's rope_parameters")
        if rope_type != "yarn":  # yarn() checks its own: a null factor means one there
            check_rope_numbers(rope, ROPE_SCALINGS[rope_type])
        original = int(original or rope.get("original_max_position_embeddings") or max_positions)
        if rope_type == "longrope":
            return cls.longrope(rope, max_positions, original)
        if rope_type == "yarn":
            return cls.yarn(rope, max_positions, original)
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

    @classmethod
    def yarn(cls, rope: dict, max_positions: int, original: int) -> "RopeScaling":
        """transformers' _compute_yarn_parameters: factor null means max / original positions; the attention
        factor defaults to yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) when both are
        set, else yarn_mscale(factor); beta_fast and beta_slow default (also when 0) to 32 and 1."""
        factor = rope["factor"]
        factor = max_positions / original if factor is None else factor
        numbers = {"factor": factor, **{k: rope.get(k) for k in ("attention_factor", "beta_fast", "beta_slow",
                                                                  "mscale", "mscale_all_dim")}}
        bad = [f"{k} {v!r}" for k, v in numbers.items()
               if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0)]
        if bad or factor <= 0:
            raise ModelError(f"yarn rope scaling in config.json has {', '.join(bad) or f'factor {factor!r}'}: "
                             "give non-negative numbers (factor above 0), or leave the optional ones out")
        if not isinstance(rope.get("truncate", True), bool):
            raise ModelError(f"yarn's truncate in config.json is {rope['truncate']!r}: give true or false")
        attention = rope.get("attention_factor")
        if attention is None:
            mscale, all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
            attention = (yarn_mscale(factor, mscale) / yarn_mscale(factor, all_dim) if mscale and all_dim
                         else yarn_mscale(factor))
        return cls("yarn", float(factor), original_max_positions=original, attention_factor=float(attention),
                   beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
                   truncate=rope.get("truncate", True))


def rope_aliases(family: Family) -> dict[str, str]:
    """The rope_type names the family's transformers config class reads as another."""
    return ROPE_ALIASES | ({"yarn": "longrope"} if family.yarn_is_longrope else {})


LAYER_TYPES = {"full_attention": False, "sliding_attention": True}  # layer_types' values: sliding or not


def layer_windows(hf: dict, family: Family, n_layers: int) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: the layer attends to the whole past), placed as transformers
    places them for the family (families.py). A layer with window W lets position t attend to s with
    t - W < s <= t, transformers' sliding_window_overlay."""
    window = hf.get("sliding_window", family.default_window)
    if family.windows is None or window is None:
        return (None,) * n_layers
    if family.windows == "every_layer":
        sliding = [True] * n_layers
    elif family.windows == "use_sliding_window":
        if not hf.get("use_sliding_window", False):
            return (None,) * n_layers
        sliding = sliding_layers(hf, n_layers)
    elif family.windows == "alternating":
        sliding = alternating_layers(hf, family, n_layers)
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


def check_text_decoder(hf: dict, model_type) -> None:
    """Refuse by name the configs of models that are more than a causal text decoder."""
    if "text_config" in hf:
        raise UnsupportedModelError(
            f"this {model_type} config nests a text_config: it is a multimodal model; give the folder of its "
            "text model alone (for Gemma 3: model_type gemma3_text, e.g. google/gemma-3-1b-it)")
    if hf.get("use_bidirectional_attention"):
        raise UnsupportedModelError(
            f"use_bidirectional_attention is true in this {model_type} config: it is an encoder (embedding "
            "model), not a causal decoder; only causal decoders can be quantized and exported")


def read_activation(hf: dict, family: Family) -> str:
    """The MLP's activation: the family's, which config.json may name but not change."""
    key = next((k for k in ("hidden_activation", "hidden_act") if hf.get(k)), None)
    if key is not None and hf[key] != family.activation:
        raise UnsupportedModelError(
            f"{key} {hf[key]!r} in this {family.model_type} config: the {family.model_type} MLP is computed "
            f"with {family.activation!r} here (and in the ONNX and GGUF targets)")
    return family.activation


def alternating_layers(hf: dict, family: Family, n_layers: int) -> list[bool]:
    """Which layers of a family that alternates them are local (sliding_attention): layer_types' entries,
    else every layer but each Nth (N: sliding_window_pattern, else the family's; transformers' rule)."""
    if hf.get("layer_types") is not None:
        return sliding_layers(hf, n_layers)
    every = hf.get("sliding_window_pattern") or family.global_every
    return [(i + 1) % every != 0 for i in range(n_layers)]


def local_layers(hf: dict, family: Family, n_layers: int) -> tuple[int, ...]:
    """The local layers of a family that alternates them (they take its local RoPE base); () for others."""
    if family.windows != "alternating":
        return ()
    return tuple(i for i, local in enumerate(alternating_layers(hf, family, n_layers)) if local)


def split_rope(hf: dict, source: str = "config.json") -> tuple[dict, dict | None]:
    """(the global layers' rope parameters, the local layers' or None when they share the global ones).
    transformers 5 writes them per layer type (Gemma 3); older configs give rope_local_base_freq."""
    key = next((k for k in ("rope_parameters", "rope_scaling") if hf.get(k)), None)
    rope = hf[key] if key else {}
    if not isinstance(rope, dict) or not isinstance(rope.get("full_attention", {}), dict):
        raise ModelError(f"{source}: {key} is {found(rope)}; it must be a JSON object of rope parameters (correct it)")
    if "full_attention" in rope:
        return rope["full_attention"], rope.get("sliding_attention")
    local = {"rope_theta": hf["rope_local_base_freq"]} if "rope_local_base_freq" in hf else None
    return rope, local


def local_rope_theta(local: dict | None, family: Family, max_positions: int) -> float | None:
    """The local layers' RoPE base: plain RoPE only (llama.cpp's local layers take no scaling)."""
    if local is None:
        return family.local_rope_base
    if RopeScaling.from_hf(local, max_positions) is not None:
        raise UnsupportedModelError(f"rope scaling on the sliding-window layers of this {family.model_type} "
                                    "config is not supported; only the global layers may scale RoPE")
    return float(local.get("rope_theta", family.local_rope_base or 10000.0))


# config.json's fields that ModelConfig reads (transformers' names), checked by read_fields. An absent of
# None is derived from the others: num_key_value_heads from num_attention_heads (no grouped-query
# attention), head_dim as hidden_size / num_attention_heads.
# more blocks than any model has: a larger count is an edit, refused before per-layer tables are built
LAYER_COUNT = Rule("above 0 and at most 65536", lambda v: 0 < v <= 65536)
MAX_POSITIONS = Field("max_position_embeddings", "int", absent=4096, rule=POSITIVE)
# read first, for the rope scaling (from_hf); a top-level original context wins over rope_parameters'
POSITION_FIELDS = (MAX_POSITIONS, Field("original_max_position_embeddings", "int", absent=None, nullable=True,
                                        rule=POSITIVE))
MODEL_FIELDS = (
    #     field                      type      when absent                null: as absent  rule
    Field("vocab_size",              "int",                                               rule=POSITIVE),
    Field("hidden_size",             "int",                                               rule=POSITIVE),
    Field("intermediate_size",       "int",                                               rule=POSITIVE),
    Field("num_hidden_layers",       "int",                                               rule=LAYER_COUNT),
    Field("num_attention_heads",     "int",                                               rule=POSITIVE),
    Field("num_key_value_heads",     "int",    absent=None,               nullable=True,   rule=POSITIVE),
    Field("head_dim",                "int",    absent=None,               nullable=True,   rule=POSITIVE),
    Field("rms_norm_eps",            "number", absent=1e-6,                                rule=POSITIVE),
    Field("rope_theta",              "number", absent=10000.0,                             rule=POSITIVE),
    Field("partial_rotary_factor",   "number", absent=1.0,                                 rule=FRACTION),
    MAX_POSITIONS,
    Field("tie_word_embeddings",     "bool",   absent=False),
    Field("attention_bias",          "bool",   absent=False),
    Field("query_pre_attn_scalar",   "number", absent=None,               nullable=True,   rule=POSITIVE),
    Field("attn_logit_softcapping",  "number", absent=None,               nullable=True,   rule=POSITIVE),
    Field("final_logit_softcapping", "number", absent=None,               nullable=True,   rule=POSITIVE),
)
# the special tokens' ids, which the exports write (none when absent); each must be in the vocabulary
# (several eos ids may end a reply)
TOKEN_FIELDS = (Field("bos_token_id", "id", absent=None, nullable=True),
                Field("eos_token_id", "ids", absent=None, nullable=True),
                Field("pad_token_id", "id", absent=None, nullable=True))
# the same keys inside rope_parameters (transformers 5), where they win over the top-level ones
ROPE_FIELDS = (
    Field("rope_theta",              "number", absent=None,                                rule=POSITIVE),
    Field("partial_rotary_factor",   "number", absent=None,                                rule=FRACTION),
)
# rules between the fields (num_key_value_heads already derived when absent; head_dim still null when absent)
MODEL_RULES = (
    Consistency(("num_attention_heads", "num_key_value_heads"), "num_key_value_heads must divide num_attention_heads",
                lambda v: v["num_attention_heads"] % v["num_key_value_heads"] == 0),
    Consistency(("hidden_size", "num_attention_heads", "head_dim"),
                "without a head_dim, hidden_size must be a multiple of num_attention_heads",
                lambda v: v["head_dim"] is not None or v["hidden_size"] % v["num_attention_heads"] == 0),
)


def check_token_ids(ids: dict, vocab_size: int, source: str) -> None:
    """ModelError naming the first special token id (read by TOKEN_FIELDS) outside the vocabulary."""
    for name, value in ids.items():
        for i in value if isinstance(value, list) else [] if value is None else [value]:
            if i >= vocab_size:
                raise ModelError(f"{source}: {name} is {found(value)}; it must be below vocab_size {vocab_size} "
                                 "(correct it)")


def read_family(hf: dict) -> Family:
    """The family config.json's model_type names; refused by name when not supported."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        check_text_decoder(hf, model_type)
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    check_text_decoder(hf, model_type)
    return FAMILIES[model_type]


def first_given(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


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
    activation: str = "silu"  # transformers' name of the gated MLP's activation
    query_pre_attn_scalar: float | None = None  # attention scores scaled by its -1/2 power (else head_dim's)
    attn_softcap: float | None = None  # scores -> tanh(scores / cap) * cap before the mask
    final_softcap: float | None = None  # logits -> tanh(logits / cap) * cap
    local_layers: tuple[int, ...] = ()  # the sliding_attention layers of a family that alternates them
    local_rope_theta: float | None = None  # the local layers' RoPE base (plain RoPE); None: the global RoPE
    # each layer's sliding window (layer_windows), None for a layer that attends to the whole past; empty:
    # every layer attends to the whole past
    windows: tuple[int | None, ...] = ()

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """The config of a config.json dict, every field checked by MODEL_FIELDS and MODEL_RULES; source:
        the file's path, for messages."""
        family = read_family(hf)
        rope, local_rope = split_rope(hf, source)
        # what cannot be computed at all is refused before what could be corrected
        positions = read_fields(hf, POSITION_FIELDS, source, ModelError)
        max_positions = positions["max_position_embeddings"]
        rope_scaling = RopeScaling.from_hf(rope, max_positions, positions["original_max_position_embeddings"],
                                           rope_aliases(family))
        v = read_fields(hf, MODEL_FIELDS, source, ModelError)
        check_token_ids(read_fields(hf, TOKEN_FIELDS, source, ModelError), v["vocab_size"], source)
        rope_values = read_fields(rope, ROPE_FIELDS, f"{source}'s rope_parameters", ModelError)
        n_heads, n_layers = v["num_attention_heads"], v["num_hidden_layers"]
        v["num_key_value_heads"] = v["num_key_value_heads"] or n_heads
        check_consistency(v, MODEL_RULES, source, ModelError)
        cfg = cls(
            model_type=family.model_type,
            vocab_size=v["vocab_size"],
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=v["num_key_value_heads"],
            head_dim=v["head_dim"] or v["hidden_size"] // n_heads,
            rms_eps=v["rms_norm_eps"],
            rope_theta=first_given(rope_values["rope_theta"], v["rope_theta"]),
            max_positions=max_positions,
            tie_word_embeddings=v["tie_word_embeddings"],
            attention_bias=family.qkv_bias if family.qkv_bias is not None else v["attention_bias"],
            rope_scaling=rope_scaling,
            partial_rotary_factor=float(first_given(rope_values["partial_rotary_factor"], v["partial_rotary_factor"])),
            activation=read_activation(hf, family),
            query_pre_attn_scalar=v["query_pre_attn_scalar"],
            attn_softcap=v["attn_logit_softcapping"] if family.attn_softcap else None,
            final_softcap=v["final_logit_softcapping"],
            windows=layer_windows(hf, family, n_layers),
            local_layers=local_layers(hf, family, n_layers),
            local_rope_theta=(local_rope_theta(local_rope, family, max_positions) if family.windows == "alternating"
                              else None),
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

    @property
    def attention_scale(self) -> float | None:
        """The attention scores' scale when the config sets one (query_pre_attn_scalar); None: 1/sqrt(head_dim)."""
        return None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar ** -0.5

    def local_rope(self, layer: int) -> bool:
        """Whether layer rotates q and k with the local layers' RoPE (local_rope_theta) instead of the global."""
        return self.local_rope_theta is not None and layer in self.local_layers

    def window(self, layer: int) -> int | None:
        """Layer's sliding window where it is shorter than the context, so that it limits what a position
        sees; None where the layer sees every position the model can hold."""
        w = self.windows[layer] if self.windows else None
        return w if w is not None and w < self.context_length else None
