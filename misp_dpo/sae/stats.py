"""One pass over the training items before training: sample count, data mean and input scale.

The mean initialises b_dec (CLIP embeddings share a large common direction; starting the decoder
bias there keeps latents from dying at step 0) and the scale
makes the mean-centred energy E‖scale·(x − x̄)‖² equal to 1, so the losses of different CLIP models
and datasets are on one footing. For the paper variant x is the fused difference d = vec(Δv tᵀ):
its mean Σ Δv tᵀ / n is accumulated as Σ_pairs (Σ_candidates Δv) tᵀ, never per sample. Sums are
float64, so the statistics do not depend on the batching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from misp_dpo.sae.data import Dataset, PoolChunk, VectorChunk, sequential

PAIRS_PER_BATCH = 256


class UnusableInput(ValueError):
    """The training split is empty or constant: nothing to learn (the caller names the input)."""


@dataclass(frozen=True)
class InputStats:
    items: int  # training pairs (paper) or images (topk)
    samples: int  # training samples: (pair, candidate) differences or images
    mean: np.ndarray  # (D,) or (D, D) float64, mean of the unscaled input
    energy: float  # E‖x − x̄‖², unscaled
    scale: float  # 1 / sqrt(energy)
    width: int  # paper: widest pool; topk: 1

    def describe(self) -> dict[str, float | int]:
        return {
            "items": self.items,
            "samples": self.samples,
            "scale": self.scale,
            "centred_energy": self.energy,
            "mean_norm": float(np.linalg.norm(self.mean)),
        }


def pool_differences(chunk: PoolChunk, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(Δv (n, K, D), t (n, D), mask (n, K)) in float64, Δv zero on padding."""
    mask = chunk.candidates >= 0
    candidates = images[np.where(mask, chunk.candidates, 0)].astype(np.float64)
    dv = (chunk.positive.astype(np.float64)[:, None, :] - candidates) * mask[..., None]
    return dv, chunk.prompt.astype(np.float64), mask


def input_stats(dataset: Dataset, variant: str) -> InputStats:
    if variant == "paper":
        return _paper_stats(dataset)
    return _topk_stats(dataset)


def _finish(items: int, samples: int, total: np.ndarray, squares: float, width: int) -> InputStats:
    if samples == 0:
        raise UnusableInput("no training samples: the inputs are empty or every item is held out")
    mean = total / samples
    energy = squares / samples - float((mean * mean).sum())
    if not energy > 0:
        raise UnusableInput(f"the training inputs do not vary (centred energy {energy:.3g})")
    return InputStats(items, samples, mean, energy, 1.0 / float(np.sqrt(energy)), width)


def _paper_stats(dataset: Dataset) -> InputStats:
    assert dataset.images is not None
    dim = dataset.images.shape[1]
    total, squares, items, samples = np.zeros((dim, dim)), 0.0, 0, 0
    for chunk in sequential(dataset, heldout=False, batch_size=PAIRS_PER_BATCH):
        assert isinstance(chunk, PoolChunk)
        dv, t, mask = pool_differences(chunk, dataset.images)
        total += dv.sum(axis=1).T @ t
        squares += float(((dv * dv).sum(-1) * (t * t).sum(-1)[:, None]).sum())
        items, samples = items + len(t), samples + int(mask.sum())
    return _finish(items, samples, total, squares, dataset.width)


def _topk_stats(dataset: Dataset) -> InputStats:
    total, squares, items = None, 0.0, 0
    for chunk in sequential(dataset, heldout=False, batch_size=65536):
        assert isinstance(chunk, VectorChunk)
        x = chunk.vectors.astype(np.float64)
        total = x.sum(0) if total is None else total + x.sum(0)
        squares += float((x * x).sum())
        items += len(x)
    return _finish(items, items, total if total is not None else np.zeros(1), squares, 1)
