"""Rotary position embedding: the one table of angles every consumer uses.

The first rotary_dim dimensions of each head rotate (all of them unless partial_rotary_factor < 1, as in
Phi-4-mini); the rest pass through. For rotary width r and base theta, pair j (j < r / 2) turns by
position * theta^(-2j / r), divided by the pair's scaling divisor when the config stretches RoPE
(`rope_divisors`). HF checkpoints rotate halves of the rotary part (element j with element j + r / 2),
so cos and sin are listed per pair and each consumer lays them out as it needs: the PyTorch forward
repeats them over both halves, the ONNX graph hands them to GroupQueryAttention as its cos/sin caches
(narrower than head_dim / 2 for partial rotary), and the GGUF file carries the divisors themselves (llama3,
longrope) or the parameters llama.cpp derives them from (linear, yarn).
longrope and yarn also scale cos and sin by their attention factor (`rope_attention_factor`). Gemma 3's local layers
take a table of their own (local=True: plain RoPE with their base, no scaling).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import ModelError
from .config import ModelConfig


def base_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """float64 [rotary_dim / 2]: the angle per position of each pair of plain RoPE (local: with the local
    layers' base)."""
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    d = cfg.rotary_dim
    return 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float64) / d))


def rope_divisors(cfg: ModelConfig) -> np.ndarray | None:
    """float64 [rotary_dim / 2]: what each pair's inverse frequency is divided by under cfg's rope scaling
    (llama.cpp's rope_freqs tensor for llama3, rope_factors_short for longrope); None for plain RoPE."""
    s = cfg.rope_scaling
    if s is None:
        return None
    inv_freq = base_frequencies(cfg)
    if s.type == "linear":
        return np.full_like(inv_freq, s.factor)
    if s.type == "longrope":  # the short factors: sequences past the original context are refused
        return np.array(s.short_factor, dtype=np.float64)
    if s.type == "yarn":
        return yarn_divisors(cfg)
    # llama3: wavelengths shorter than original / high_freq_factor keep their frequency, those longer than
    # original / low_freq_factor are divided by factor, and the band between blends the two linearly in
    # original / wavelength.
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = 1.0 / ((1 - smooth) / s.factor + smooth)
    low = wavelen > s.original_max_positions / s.low_freq_factor
    high = wavelen < s.original_max_positions / s.high_freq_factor
    return np.where(high, 1.0, np.where(low, s.factor, blended))


def yarn_band(cfg: ModelConfig) -> tuple[float, float]:
    """The pairs over which yarn's blend runs, as transformers' find_correction_range: the (fractional) pair
    index at which a wavelength turns beta_fast and beta_slow times within the original context, rounded
    outwards when truncate, clamped to 0 .. rotary_dim - 1."""
    s, d = cfg.rope_scaling, cfg.rotary_dim

    def pair(rotations: float) -> float:
        return d * math.log(s.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = pair(s.beta_fast), pair(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, d - 1)


def yarn_divisors(cfg: ModelConfig) -> np.ndarray:
    """yarn's divisor of each pair: pairs below the band keep their frequency (extrapolation), those above it
    are divided by factor (interpolation), and the band mixes the two inverse frequencies linearly."""
    low, high = yarn_band(cfg)
    if low == high:
        high += 0.001  # transformers' guard against a band of width 0
    ramp = np.clip((np.arange(cfg.rotary_dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # the share of the kept (extrapolated) frequency
    return 1.0 / ((1 - keep) / cfg.rope_scaling.factor + keep)


def rope_attention_factor(cfg: ModelConfig, local: bool = False) -> float:
    """What cos and sin are multiplied by: the scaling's attention factor (longrope's, yarn's; 1 for the
    others) and 1 for the local layers' plain RoPE."""
    s = cfg.rope_scaling
    return s.attention_factor if s is not None and not local else 1.0


def inverse_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """float64 [rotary_dim / 2]: the angle per position of each pair, after rope scaling (local: the local
    layers' plain RoPE, see ModelConfig.local_rope)."""
    if local:
        return base_frequencies(cfg, local=True)
    inv_freq = base_frequencies(cfg)
    divisors = rope_divisors(cfg)
    return inv_freq if divisors is None else inv_freq / divisors


def check_positions(cfg: ModelConfig, n_positions: int) -> None:
    """ModelError past longrope's original context, where its long factors (not built here) would apply.
    Other models' tables extend past max_position_embeddings as they always did."""
    s = cfg.rope_scaling
    if s is not None and s.type == "longrope" and n_positions > cfg.context_length:
        raise ModelError(
            f"{n_positions} positions asked for, but this model's rotary table stops at {cfg.context_length} "
            "(longrope's original_max_position_embeddings: the long factors past it are not supported); "
            "use shorter sequences")


def rope_tables(cfg: ModelConfig, n_positions: int, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, float32 [n_positions, rotary_dim / 2], for positions 0 .. n_positions - 1 (local: of the
    local layers' RoPE)."""
    check_positions(cfg, n_positions)
    angles = np.arange(n_positions, dtype=np.float64)[:, None] * inverse_frequencies(cfg, local)[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    scale = rope_attention_factor(cfg, local)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.astype(np.float32), sin.astype(np.float32)
