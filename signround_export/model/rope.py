"""Rotary position embedding: the one table of angles every consumer uses.

For head dimension d and base theta, pair j of a head (j < d / 2) turns by position * theta^(-2j / d),
divided by the pair's scaling divisor when the config stretches RoPE (`rope_divisors`). HF checkpoints
rotate halves (element j with element j + d / 2), so cos and sin are listed per pair and each consumer
lays them out as it needs: the PyTorch forward repeats them over both halves, the ONNX graph hands them
to GroupQueryAttention as its cos/sin caches, and the GGUF file carries the divisors themselves.
"""

from __future__ import annotations

import math

import numpy as np

from .config import ModelConfig


def base_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """float64 [head_dim / 2]: the angle per position of each pair of plain RoPE (local: with the local
    layers' base)."""
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    return 1.0 / (theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))


def rope_divisors(cfg: ModelConfig) -> np.ndarray | None:
    """float64 [head_dim / 2]: what each pair's inverse frequency is divided by under cfg's rope scaling
    (llama.cpp's rope_freqs tensor for llama3); None for plain RoPE."""
    s = cfg.rope_scaling
    if s is None:
        return None
    inv_freq = base_frequencies(cfg)
    if s.type == "linear":
        return np.full_like(inv_freq, s.factor)
    # llama3: wavelengths shorter than original / high_freq_factor keep their frequency, those longer than
    # original / low_freq_factor are divided by factor, and the band between blends the two linearly in
    # original / wavelength.
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_positions / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = 1.0 / ((1 - smooth) / s.factor + smooth)
    low = wavelen > s.original_max_positions / s.low_freq_factor
    high = wavelen < s.original_max_positions / s.high_freq_factor
    return np.where(high, 1.0, np.where(low, s.factor, blended))


def inverse_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """float64 [head_dim / 2]: the angle per position of each pair, after rope scaling (local: the local
    layers' plain RoPE, see ModelConfig.local_rope)."""
    if local:
        return base_frequencies(cfg, local=True)
    inv_freq = base_frequencies(cfg)
    divisors = rope_divisors(cfg)
    return inv_freq if divisors is None else inv_freq / divisors


def rope_tables(cfg: ModelConfig, n_positions: int, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, float32 [n_positions, head_dim / 2], for positions 0 .. n_positions - 1 (local: of the
    local layers' RoPE)."""
    angles = np.arange(n_positions, dtype=np.float64)[:, None] * inverse_frequencies(cfg, local)[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
