"""Paired differences between two models on the same probes, with a hierarchical bootstrap interval.

Used by `bench/downstream.py` (issue 13): every arm is evaluated on the same probes of the same seed's
world, so a difference is taken probe by probe (arm correct minus reference correct, each in {0, 1}).
The estimate is the mean over seeds of each seed's mean difference; its interval resamples seeds with
replacement, then the probes within each drawn seed with replacement (two-stage bootstrap), and takes
the percentile interval of the resampled estimates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDiff:
    """A paired difference: its estimate, the bootstrap interval and each seed's own mean."""

    mean: float
    low: float
    high: float
    per_seed: tuple[float, ...]

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    @property
    def signs(self) -> str:
        """One character per seed: + (arm above the reference), - (below), 0 (equal)."""
        return "".join("+" if d > 0 else "-" if d < 0 else "0" for d in self.per_seed)


def aligned_correct(reference: Mapping[str, bool], arm: Mapping[str, bool]) -> tuple[np.ndarray, np.ndarray]:
    """The two models' correctness on the probe ids both answered, in sorted id order."""
    ids = sorted(set(reference) & set(arm))
    return (
        np.array([reference[i] for i in ids], dtype=np.float64),
        np.array([arm[i] for i in ids], dtype=np.float64),
    )


def hierarchical_bootstrap(
    per_seed: Sequence[np.ndarray], draws: int = 2000, level: float = 0.95, seed: int = 0
) -> PairedDiff:
    """Mean over seeds of the per-seed mean of `per_seed[s]` (paired differences, one per probe), and
    its percentile interval from resampling seeds, then values within each drawn seed."""
    groups = [np.asarray(g, dtype=np.float64) for g in per_seed]
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("need at least one seed, each with at least one paired value")
    if not 0.0 < level < 1.0 or draws < 1:
        raise ValueError(f"need 0 < level < 1 and draws >= 1, got {level}, {draws}")
    rng = np.random.default_rng(seed)
    n_seeds = len(groups)
    means = np.array([g.mean() for g in groups])
    # inner stage: `draws` resampled means of every seed (a seed drawn twice gets two independent
    # inner draws: column b of seed s is used by every outer draw b that picks s, so draw per slot)
    picks = rng.integers(0, n_seeds, size=(draws, n_seeds))
    estimates = np.zeros(draws)
    for slot in range(n_seeds):
        chosen = picks[:, slot]
        for s in np.unique(chosen):
            rows = np.flatnonzero(chosen == s)
            g = groups[s]
            idx = rng.integers(0, len(g), size=(len(rows), len(g)))
            estimates[rows] += g[idx].mean(axis=1)
    estimates /= n_seeds
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return PairedDiff(float(means.mean()), float(low), float(high), tuple(float(m) for m in means))


def paired_difference(
    reference: Sequence[Mapping[str, bool]],
    arm: Sequence[Mapping[str, bool]],
    draws: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedDiff:
    """arm minus reference accuracy, per seed on the probes both answered (probe id -> correct)."""
    if len(reference) != len(arm):
        raise ValueError(f"need the same seeds for both: {len(reference)} against {len(arm)}")
    diffs = []
    for ref_seed, arm_seed in zip(reference, arm, strict=True):
        a, b = aligned_correct(ref_seed, arm_seed)
        diffs.append(b - a)
    return hierarchical_bootstrap(diffs, draws, level, seed)
