"""Greedy diverse selection (the paper's Algorithm 1, docs/method.md), batched over pairs.

    S = {};  repeat N times:  S += argmax_{i not in S}  s_i + beta_div * min_{j in S} (1 - cos(f_i, f_j))

with the min term 0 for the first pick. The loop runs N times over a whole (P, K) block: each
iteration is one masked argmax and one batched cosine of every candidate against the new pick, so
the cost is O(N * P * K * F) and no Python code runs per pair. Ties go to the lower pool index
(the candidate retrieved as more similar), which keeps the output deterministic.

`diversity="latent-coverage"` [ours] replaces the min-cosine bonus by the gain in a weighted
coverage of SAE latents, a monotone submodular objective (so greedy is within 1 - 1/e of its best):
each candidate i keeps the `latent_top` latents it changes most beyond its pool's typical change,
a_il = top_t(relu(z_il - mean_pool z_l)) over the code's positive and negative parts, normalised
to sum 1; with c_l = max_{j in S} a_jl the bonus is sum_l max(0, a_il - c_l), i.e. how much of what
i changes no pick has changed yet. Negatives that change *different* latents win over negatives
whose codes merely point in different directions. The bonus is 0 for the first pick, as above.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Literal, NamedTuple

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
Diversity = Literal["min-cosine", "latent-coverage"]
_CHUNK = 32  # pairs per block when picking top latents: bounds the (chunk, K, 2L) temporaries


class Selection(NamedTuple):
    picks: np.ndarray  # (P, N) int64 pool indices in pick order, -1 where the pool ran out
    diversity_gain: np.ndarray  # (P, N) float32: min_{j in S}(1 - cos) at pick time (0 for the first)


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Features scaled to unit L2 norm along the last axis; all-zero vectors stay zero (cos = 0)."""
    norm = np.sqrt(np.einsum("...f,...f->...", features, features))[..., None]  # no squared copy
    return (features / np.where(norm > 0, norm, 1.0)).astype(np.float32, copy=False)


def greedy_select(
    score: np.ndarray,
    features: np.ndarray,
    mask: np.ndarray,
    n: int,
    beta_div: float,
    diversity: Diversity = "min-cosine",
    latent_top: int = 8,
) -> Selection:
    """Pick up to `n` candidates per pair; `features` (P, K, F) define the diversity bonus (cosines,
    or the SAE codes whose latents are covered)."""
    num_pairs, width = score.shape
    bonus: _Bonus = (
        _MinCosine(features) if diversity == "min-cosine" else _Coverage(features, mask, latent_top)
    )
    available = mask.copy()
    gain = np.zeros((num_pairs, width), dtype=np.float64)
    picks = np.full((num_pairs, n), -1, dtype=np.int64)
    gains = np.zeros((num_pairs, n), dtype=np.float32)
    pairs = np.arange(num_pairs)
    for step in range(n):
        objective = np.where(available, score + beta_div * gain, -np.inf)
        best = objective.argmax(axis=1) if width else np.zeros(num_pairs, dtype=np.int64)
        found = available[pairs, best] if width else np.zeros(num_pairs, dtype=bool)
        if not found.any():
            break
        picks[found, step] = best[found]
        gains[found, step] = gain[pairs[found], best[found]]
        available[pairs[found], best[found]] = False
        gain = bonus.after(best, found, first=step == 0)
    return Selection(picks=picks, diversity_gain=gains)


class _Bonus:
    def after(self, best: np.ndarray, found: np.ndarray, first: bool) -> np.ndarray:
        """Every candidate's bonus once `best` (where `found`) has joined S; (P, K) float64."""
        raise NotImplementedError


class _MinCosine(_Bonus):
    """min_{j in S} (1 - cos(f_i, f_j)) (the paper's Algorithm 1)."""

    def __init__(self, features: np.ndarray) -> None:
        self.unit = unit_rows(features)
        self.min_distance = np.zeros(features.shape[:2], dtype=np.float64)

    def after(self, best: np.ndarray, found: np.ndarray, first: bool) -> np.ndarray:
        pairs = np.arange(len(best))
        cosine = np.matmul(self.unit, self.unit[pairs, best][:, :, None])[:, :, 0]
        distance = 1.0 - cosine.astype(np.float64)
        # a pair with nothing found keeps its bonus (it has nothing left to pick anyway)
        updated = distance if first else np.minimum(self.min_distance, distance)
        self.min_distance = np.where(found[:, None], updated, self.min_distance)
        return self.min_distance


class _Coverage(_Bonus):
    """sum_l max(0, a_il - max_{j in S} a_jl) over each candidate's top latents (module docstring)."""

    def __init__(self, codes: np.ndarray, mask: np.ndarray, top: int) -> None:
        self.index, self.weight = top_latents(codes, mask, top)
        self.covered = np.zeros((codes.shape[0], 2 * codes.shape[2]), dtype=np.float64)

    def after(self, best: np.ndarray, found: np.ndarray, first: bool) -> np.ndarray:
        pairs = np.flatnonzero(found)
        index, weight = self.index[pairs, best[pairs]], self.weight[pairs, best[pairs]]  # (F, t)
        rows = np.repeat(pairs, index.shape[1])
        np.maximum.at(self.covered, (rows, index.ravel()), weight.ravel())
        held = np.take_along_axis(self.covered[:, None, :], self.index, axis=2) if self.index.size else 0.0
        return np.maximum(self.weight - held, 0.0).sum(axis=2)


def top_latents(
    codes: np.ndarray, mask: np.ndarray, top: int, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(P, K, t) latent indices into the 2L signed latents (l for z_l > 0, L + l for z_l < 0) and
    their weights a_il: each candidate's strongest changes beyond its pool's mean, summing to 1
    (all 0 for a candidate that changes nothing beyond the mean, and on padding).

    With `rows` (P, N) pool indices (-1: none), only those candidates are ranked, (P, N, t): the
    mean is still the whole pool's, and the argpartition, the costly part, runs on N, not K."""
    num_pairs, width, latents = codes.shape
    t = min(top, 2 * latents)
    shape = (num_pairs, width if rows is None else rows.shape[1], t)
    index = np.zeros(shape, dtype=np.int64)
    weight = np.zeros(shape, dtype=np.float64)
    for lo in range(0, num_pairs, _CHUNK):
        z = np.nan_to_num(codes[lo : lo + _CHUNK].astype(np.float64))
        m = mask[lo : lo + _CHUNK, :, None]
        signed = np.concatenate([np.maximum(z, 0.0), np.maximum(-z, 0.0)], axis=2) * m
        mean = signed.sum(axis=1, keepdims=True) / np.maximum(m.sum(axis=1, keepdims=True), 1)
        if rows is not None:
            picked = rows[lo : lo + _CHUNK, :, None]
            signed = np.take_along_axis(signed, np.maximum(picked, 0), axis=1) * (picked >= 0)
            m = np.take_along_axis(m, np.maximum(picked, 0), axis=1) & (picked >= 0)
        excess = np.maximum(signed - mean, 0.0) * m
        chosen = np.argpartition(-excess, t - 1, axis=2)[:, :, :t] if t < 2 * latents else None
        chosen = chosen if chosen is not None else np.broadcast_to(np.arange(t), excess.shape).copy()
        values = np.take_along_axis(excess, chosen, axis=2)
        total = values.sum(axis=2, keepdims=True)
        index[lo : lo + _CHUNK] = chosen
        weight[lo : lo + _CHUNK] = np.where(total > 0, values / np.where(total > 0, total, 1.0), 0.0)
    return index, weight


def pair_seeds(pair_ids: Iterable[str], seed: int) -> np.ndarray:
    """A 64-bit seed per pair from (seed, pair_id): the same draw whatever the sharding or batching."""
    digests = [hashlib.blake2b(f"{seed}\x00{pid}".encode(), digest_size=8).digest() for pid in pair_ids]
    return np.frombuffer(b"".join(digests), dtype="<u8").copy() if digests else np.zeros(0, np.uint64)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser (Steele et al. 2014): a counter-based generator, vectorised in numpy."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def uniform_keys(seeds: np.ndarray, width: int) -> np.ndarray:
    """(P, width) iid uniform [0, 1) numbers, row p determined by seeds[p] alone.

    The top-N of iid uniform keys over a pool is a uniform draw of N without replacement.
    """
    with np.errstate(over="ignore"):
        counters = seeds[:, None] + _GOLDEN * np.arange(1, width + 1, dtype=np.uint64)[None, :]
    return (_splitmix64(counters) >> np.uint64(11)).astype(np.float64) * 2.0**-53


def clean_pool(rows: np.ndarray, mask: np.ndarray, positive_rows: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Mask out the positive itself and repeated images, so no pick can be either.

    The candidates stage already removes both; this guard makes "the positive never appears and no
    negative repeats within a pair" hold for any input. Returns (mask, positives, duplicates) removed.
    """
    is_positive = mask & (rows == positive_rows[:, None])
    order = np.argsort(np.where(mask, rows, -1), axis=1, kind="stable")
    ordered = np.take_along_axis(np.where(mask, rows, -1), order, axis=1)
    repeat_sorted = np.zeros_like(mask)
    repeat_sorted[:, 1:] = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    is_repeat = np.zeros_like(mask)
    np.put_along_axis(is_repeat, order, repeat_sorted, axis=1)
    keep = mask & ~is_positive & ~is_repeat
    return keep, int(is_positive.sum()), int((is_repeat & ~is_positive).sum())
