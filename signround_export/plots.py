"""PNG figures for reports (matplotlib without a display)."""

from __future__ import annotations

import re
from pathlib import Path

from .fileio import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_allocation(allocation, path: Path) -> Path:
    """Bits of every decoder-block linear across depth: a grid of kinds x blocks, coloured by bits."""
    import numpy as np

    plt = _pyplot()
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
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def plot_perplexity(reports, path: Path) -> Path:
    """Perplexity of the float model, the reference and each artifact, side by side."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r.name for r in reports]
    ppl = [r.scores.ppl for r in reports]
    colors = ["tab:red" if r.failures else "tab:blue" for r in reports]
    bars = ax.bar(names, ppl, color=colors)
    ax.bar_label(bars, [f"{p:.3f}" for p in ppl], fontsize=8)
    ax.set_ylabel("perplexity")
    ax.set_ylim(0, max(ppl) * 1.15)
    ax.set_title("perplexity (red: failed a threshold)", fontsize=9)
    return _save(fig, path)


def plot_tuning_loss(blocks: list[dict], path: Path) -> Path:
    """Per-block tuning loss before (round to nearest) and after SignRound, from the tuning log."""
    plt = _pyplot()
    tuned = [b for b in blocks if b.get("loss_before") is not None]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    if tuned:
        x = [b["block"] for b in tuned]
        ax.plot(x, [b["loss_before"] for b in tuned], marker="o", ms=3, label="before (RTN)")
        ax.plot(x, [b["loss_after"] for b in tuned], marker="o", ms=3, label="after (best step)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "round to nearest: no tuning loss", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("block")
    ax.set_ylabel("block output MSE")
    ax.set_title("tuning loss per block", fontsize=9)
    return _save(fig, path)


def plot_layer_errors(reports, path: Path) -> Path:
    """Per-layer weight error of each artifact against the checkpoint, in quantization steps."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for r in reports:
        if r.layer_errors:
            values = list(r.layer_errors.values())
            ax.plot(range(len(values)), values, marker=".", lw=0.8, label=r.name)
    ax.set_xlabel("layer (checkpoint order)")
    ax.set_ylabel("max |W - W_ckpt| (quantization steps)")
    ax.set_title("export error per layer (0 = the integers survived exactly)", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, path)
