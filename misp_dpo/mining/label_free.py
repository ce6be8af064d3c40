"""Quality figures of a negatives dataset that need no ground-truth attributes.

Hardness is the CLIP cosine of a negative to its positive (`sim_image`). A negative at or above
`near_duplicate` is nearly the positive again and teaches little; one among the dataset's least
similar (`easy_quantile`) is too different to be hard. Spread is the mean pairwise cosine distance
among one pair's negatives (from the embeddings `mine` read), the label-free side of diversity; SAE
latent coverage (counted by `mine`) is its side in the SAE's latents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class NegativeFlags:
    """Similarity-to-positive thresholds of the flags, set from the whole dataset."""

    near_duplicate: float  # at or above: nearly the positive image again (changes almost nothing)
    easy: float  # at or below: among the dataset's least similar negatives (changes everything)

    def of(self, sim_image: float | None) -> str | None:
        if sim_image is None:
            return None
        if sim_image >= self.near_duplicate:
            return "near-duplicate"
        if sim_image <= self.easy:
            return "easy"
        return None


def negative_flags(
    sim_image: np.ndarray, near_duplicate: float = 0.95, easy_quantile: float = 0.1
) -> NegativeFlags:
    """Near-duplicates above a fixed cosine; easy = the dataset's lowest `easy_quantile` of similarity."""
    easy = float(np.quantile(sim_image, easy_quantile)) if len(sim_image) else -math.inf
    return NegativeFlags(near_duplicate=near_duplicate, easy=min(easy, near_duplicate))


def pair_spread(vectors: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per pair, the mean pairwise cosine distance among its negatives (NaN under two negatives).

    `vectors` (M, D) are the L2-normalised negatives in pair order, `offsets` (P + 1,) their bounds.
    """
    out = np.full(len(offsets) - 1, np.nan)
    for p in range(len(offsets) - 1):
        block = vectors[offsets[p] : offsets[p + 1]].astype(np.float32)
        k = len(block)
        if k >= 2:
            cos = block @ block.T
            out[p] = float((k * k - cos.sum()) / (k * (k - 1)))  # mean of 1 - cos off the diagonal
    return out


def label_free_rows(
    values: dict[str, np.ndarray],
    flags: NegativeFlags,
    spread: np.ndarray | None,
    stats: Mapping[str, Any],
) -> list[tuple[str, str]]:
    """Quality figures that need no ground-truth attributes (`stats`: the negatives' manifest stats,
    where `mine` counted the SAE latent coverage)."""
    sim = values.get("sim_image", np.zeros(0))
    rows = []
    if len(sim):
        near, easy = int((sim >= flags.near_duplicate).sum()), int((sim <= flags.easy).sum())
        rows += [
            ("mean distance to the positive (1 - cosine; lower = harder)", f"{float(np.mean(1 - sim)):.3f}"),
            (
                f"near-duplicates of the positive (cosine >= {flags.near_duplicate:.2f})",
                f"{near} ({near / len(sim):.1%})",
            ),
            (
                f"easy negatives (cosine <= {flags.easy:.3f}, the lowest 10%)",
                f"{easy} ({easy / len(sim):.1%})",
            ),
        ]
    if spread is not None and np.isfinite(spread).any():
        rows.append(
            (
                "mean pairwise distance among a pair's negatives (1 - cosine; higher = more diverse)",
                f"{float(np.nanmean(spread)):.3f}",
            )
        )
    else:
        rows.append(("mean pairwise distance among a pair's negatives", "not available (no embeddings)"))
    pairs = stats.get("sae_coverage_pairs", 0)
    if pairs:
        coverage = stats.get("sae_coverage_millionths", 0) / pairs / 1e6
        rows.append(
            (
                "SAE latent coverage (of what the negatives change in SAE latents, the share only one of "
                "them changes; 1 = all different, 1/N = all the same)",
                f"{coverage:.3f}",
            )
        )
    else:
        rows.append(("SAE latent coverage", "not available (mined without an SAE)"))
    gain = values.get("diversity_gain")
    if gain is not None and len(gain):
        rows.append(
            (
                "mean diversity gain at pick time (strategy's space: SAE codes for misp)",
                f"{float(gain.mean()):.3f}",
            )
        )
    return rows
