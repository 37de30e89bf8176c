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
    """Each decoder-block linear's choice across depth: a grid of kinds x blocks, coloured by the bits per
    weight it takes in the target file, labelled with the choice."""
    import numpy as np

    plt = pyplot()
    cells = {}
    for name, label in allocation.choices.items():
        m = re.match(r"model\.layers\.(\d+)\.(.+)", name)
        if m:
            cells[(m[2].split(".")[-1], int(m[1]))] = (label, allocation.bpw[name])
    kinds = sorted({k for k, _ in cells})
    blocks = sorted({b for _, b in cells})
    grid = np.full((len(kinds), len(blocks)), np.nan)
    for (kind, block), (_, bpw) in cells.items():
        grid[kinds.index(kind), blocks.index(block)] = bpw
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(blocks) + 2), 0.45 * len(kinds) + 1.6))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    for (kind, block), (label, bpw) in cells.items():
        light = bpw < np.nanmean(grid)
        ax.text(blocks.index(block), kinds.index(kind), label.replace("_", "").replace("W", "").replace("G", "/"),
                ha="center", va="center", fontsize=5, color="white" if light else "black")
    ax.set_xticks(range(len(blocks)), blocks, fontsize=7)
    ax.set_yticks(range(len(kinds)), kinds, fontsize=8)
    ax.set_xlabel("block")
    ax.set_title(f"{allocation.target} choices per layer: {allocation.nbytes / 1e6:.2f} MB, "
                 f"{allocation.avg_bits:.3f} bits per weight (budget {allocation.budget / 1e6:.2f} MB)", fontsize=9)
    fig.colorbar(im, ax=ax, label="bits per weight in the file")
    return save_png(fig, path)


def save_png(fig, path: Path) -> Path:
    plt = pyplot()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)
