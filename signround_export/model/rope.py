"""Rotary position embedding: the one table of angles every consumer uses.

For head dimension d and base theta, pair j of a head (j < d / 2) turns by position * theta^(-2j / d).
HF checkpoints rotate halves (element j with element j + d / 2), so cos and sin are listed per pair
and each consumer lays them out as it needs: the PyTorch forward repeats them over both halves, the
ONNX graph hands them to GroupQueryAttention as its cos/sin caches.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig


def rope_tables(cfg: ModelConfig, n_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin, float32 [n_positions, head_dim / 2], for positions 0 .. n_positions - 1."""
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    angles = np.arange(n_positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
