"""Held-out metrics of a trained SAE, accumulated in float64 over a stream of batches.

FVU is mean-centred: Σ‖x − x̂‖² / Σ‖x − x̄‖² with x̄ the held-out mean, computed as
SST = Σ‖x‖² − ‖Σx‖²/N (saev normalized-mse; not OpenAI's per-sample ‖x‖² form).
For the paper variant x is the fused difference d and Σd = Σ_pairs (Σ_candidates Δv) tᵀ.

A latent is *active* on a sample when its code exceeds the threshold (topk: > 0, the sample's
support; paper: sigmoid > 0.5); l0 counts active latents per sample and *dense* means active on
more than 10% of the held-out samples. *Dead* means the latent ignores its input: topk, it never
fires; paper, its sigmoid code varies by less than 1e-3 (standard deviation) over the held-out set,
whatever its level (a KL-pinned constant ρ, or stuck near 0 or 1). *Saturated* (paper) means a
mean code above 0.9.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

DENSE_SHARE = 0.1
DEAD_STD = 1e-3
SATURATED_MEAN = 0.9
HISTOGRAM_BINS = 50


class HeldOut:
    """Running sums over held-out batches; `result()` gives the metrics.json entries."""

    def __init__(self, latents: int, threshold: float, value_range: tuple[float, float]) -> None:
        self.threshold, self.value_range = threshold, value_range
        self.sse = self.squares = self.cosine = self.l0 = self.activation = 0.0
        self.n = 0
        self.total: np.ndarray | None = None
        self.active = np.zeros(latents, dtype=np.int64)
        self.code_sum = np.zeros(latents)
        self.code_squares = np.zeros(latents)
        self.histogram = np.zeros(HISTOGRAM_BINS, dtype=np.int64)

    def add(
        self,
        x_sum: torch.Tensor,
        squares: torch.Tensor,
        errors: torch.Tensor,
        cosine: torch.Tensor,
        z: torch.Tensor,
    ) -> None:
        """x_sum: Σx of the batch; squares, errors, cosine: per sample (n,); z: codes (n, L)."""

        def as64(t: torch.Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float64).numpy()

        total = as64(x_sum)
        self.total = total if self.total is None else self.total + total
        self.squares += float(as64(squares).sum())
        self.sse += float(as64(errors).sum())
        self.cosine += float(as64(cosine).sum())
        self.n += len(errors)
        codes = as64(z)
        active = codes > self.threshold
        self.active += active.sum(0)
        self.l0 += float(active.sum())
        self.code_sum += codes.sum(0)
        self.code_squares += (codes * codes).sum(0)
        self.activation += float(codes.sum())
        values = codes[codes > 0] if self.threshold == 0 else codes.ravel()
        values = np.clip(values, *self.value_range)  # the last bin holds everything above the range
        self.histogram += np.histogram(values, HISTOGRAM_BINS, self.value_range)[0]

    def result(self, sigmoid: bool) -> dict[str, Any]:
        if self.n == 0 or self.total is None:
            return {"heldout_samples": 0}
        sst = self.squares - float((self.total * self.total).sum()) / self.n
        share = self.active / self.n
        latents = len(self.active)
        mean = self.code_sum / self.n
        std = np.sqrt(np.maximum(self.code_squares / self.n - mean * mean, 0.0))
        dead = std < DEAD_STD if sigmoid else self.active == 0
        metrics: dict[str, Any] = {
            "heldout_samples": self.n,
            "fvu": self.sse / sst if sst > 0 else float("nan"),
            "fvu_convention": "mean-centred: sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (held-out)",
            "mse": self.sse / self.n,
            "cosine": self.cosine / self.n,
            "l0": self.l0 / self.n,
            "mean_activation": self.activation / (self.n * latents),
            "dead_fraction": float(dead.mean()),
            "dense_fraction": float((share > DENSE_SHARE).mean()),
            "active_threshold": self.threshold,
            "latent_active_share": [round(float(s), 6) for s in share],
            "activation_histogram": {
                "edges": np.linspace(*self.value_range, HISTOGRAM_BINS + 1).round(6).tolist(),
                "counts": self.histogram.tolist(),
            },
        }
        if sigmoid:
            metrics["saturated_fraction"] = float((mean > SATURATED_MEAN).mean())
            metrics["latent_std"] = [round(float(s), 6) for s in std]
        return metrics
