"""`curves.png`: training curves and the latent activation histograms of a trained SAE."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

CURVES = {
    "paper": (("loss", "recon", "kl"), ("rho_hat_min", "rho_hat_max")),
    "topk": (("loss", "fvu", "auxk"), ("dead_fraction",)),
}


def _smooth(values: list[float], window: int) -> np.ndarray:
    data = np.asarray(values, dtype=np.float64)
    if len(data) < 2 * window:
        return data
    return np.convolve(data, np.ones(window) / window, mode="valid")


def plot_curves(history: dict[str, list[float]], metrics: dict[str, Any], variant: str, path: Path) -> None:
    """Loss terms per step, a sparsity curve, and the held-out activation and per-latent histograms.

    Uses the Agg canvas directly (no pyplot state), so it works headless and in worker processes.
    """
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    (loss_ax, sparse_ax), (hist_ax, share_ax) = fig.subplots(2, 2)
    losses, sparsity = CURVES[variant]
    steps = max((len(history.get(k, [])) for k in losses), default=0)
    window = max(1, steps // 100)
    for name in losses:
        if history.get(name):
            loss_ax.plot(_smooth(history[name], window), label=name)
    loss_ax.set(title=f"{variant}: training loss (moving average of {window})", xlabel="step", yscale="log")
    loss_ax.legend()
    for name in sparsity:
        if history.get(name):
            sparse_ax.plot(history[name], label=name)
    sparse_ax.set(title="sparsity during training", xlabel="step")
    sparse_ax.legend()
    histogram = metrics.get("activation_histogram")
    if histogram:
        edges = np.asarray(histogram["edges"])
        hist_ax.stairs(np.maximum(histogram["counts"], 0), edges, fill=True)
        what = "sigmoid codes" if variant == "paper" else "non-zero codes (scaled units)"
        hist_ax.set(title=f"held-out activation values: {what}", yscale="log", xlabel="activation")
    share = np.asarray(metrics.get("latent_active_share", []), dtype=np.float64)
    if len(share):
        dead = int((share == 0).sum())
        share_ax.hist(np.log10(share[share > 0]), bins=40)
        share_ax.set(
            title=f"per-latent active share; {dead} of {len(share)} latents never active",
            xlabel=f"log10 share of held-out samples with code > {metrics.get('active_threshold')}",
        )
    fig.savefig(path, format="png", dpi=90)
