"""The validation report's PNG figures."""

from __future__ import annotations

from pathlib import Path

from ..plots import pyplot, save_png


def plot_perplexity(reports, path: Path) -> Path:
    """Perplexity of the float model, the reference and each artifact, side by side."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = [r.name for r in reports]
    ppl = [r.scores.ppl for r in reports]
    colors = ["tab:red" if r.failures else "tab:blue" for r in reports]
    bars = ax.bar(names, ppl, color=colors)
    ax.bar_label(bars, [f"{p:.3f}" for p in ppl], fontsize=8)
    ax.set_ylabel("perplexity")
    ax.set_ylim(0, max(ppl) * 1.15)
    ax.set_title("perplexity (red: failed a threshold)", fontsize=9)
    return save_png(fig, path)


def plot_tuning_loss(blocks: list[dict], path: Path) -> Path:
    """Per-block tuning loss before (round to nearest) and after SignRound, from the tuning log."""
    plt = pyplot()
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
    return save_png(fig, path)


def plot_layer_errors(reports, path: Path) -> Path:
    """Per-layer weight error of each artifact against the checkpoint, in quantization steps."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.5))
    for r in reports:
        if r.layer_errors:
            values = list(r.layer_errors.values())
            ax.plot(range(len(values)), values, marker=".", lw=0.8, label=r.name)
    ax.set_xlabel("layer (checkpoint order)")
    ax.set_ylabel("max |W - W_ckpt| (quantization steps)")
    ax.set_title("export error per layer (0 = the integers survived exactly)", fontsize=9)
    ax.legend(fontsize=8)
    return save_png(fig, path)
