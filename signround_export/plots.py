"""PNG figures (matplotlib without a display): the setup every figure shares, and the bit allocation's."""

from __future__ import annotations

import re
from pathlib import Path

from .atomic import atomic_file


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_allocation(allocation, path: Path) -> Path:
    """Bits of every decoder-block linear across depth: a grid of kinds x blocks, coloured by bits."""
    import numpy as np

    plt = pyplot()
    cells = {}
    for name, bits in allocation.bits.items():
        m = re.match(r"model\.layers\.(\d+)\.(.+)", name)
        if m:
            cells[(m[2].split(".")[-1], int(m[1]))] = bits
    kinds = sorted({k for k, _ in cells})
    blocks = sorted({b for _, b in cells})
    grid = np.full((len(kinds), len(blocks)), np.nan)
    for (kind, block), bits in cells.items():
        grid[kinds.index(kind), blocks.index(block)] = bits
    levels = sorted(set(allocation.bits.values()))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(blocks) + 2), 0.4 * len(kinds) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=min(levels), vmax=max(levels))
    for (r, c), bits in np.ndenumerate(grid):
        if not np.isnan(bits):
            ax.text(c, r, f"{bits:.0f}", ha="center", va="center", fontsize=7, color="white" if bits < max(levels) else "black")
    ax.set_xticks(range(len(blocks)), blocks, fontsize=7)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("block")
    ax.set_title(f"bits per layer: {allocation.avg_bits:.3f} bits per weight (budget {allocation.budget})", fontsize=9)
    fig.colorbar(im, ax=ax, ticks=levels, label="bits")
    return save_png(fig, path)


def save_png(fig, path: Path) -> Path:
    plt = pyplot()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
