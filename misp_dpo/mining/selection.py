"""Greedy diverse selection (the paper's Algorithm 1, DESIGN §6), batched over pairs.

    S = {};  repeat N times:  S += argmax_{i not in S}  s_i + beta_div * min_{j in S} (1 - cos(f_i, f_j))

with the min term 0 for the first pick. The loop runs N times over a whole (P, K) block: each
iteration is one masked argmax and one batched cosine of every candidate against the new pick, so
the cost is O(N * P * K * F) and no Python code runs per pair. Ties go to the lower pool index
(the candidate retrieved as more similar), which keeps the output deterministic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class Selection(NamedTuple):
    picks: np.ndarray  # (P, N) int64 pool indices in pick order, -1 where the pool ran out
    diversity_gain: np.ndarray  # (P, N) float32: min_{j in S}(1 - cos) at pick time (0 for the first)


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Features scaled to unit L2 norm along the last axis; all-zero vectors stay zero (cos = 0)."""
    norm = np.sqrt(np.einsum("...f,...f->...", features, features))[..., None]  # no squared copy
    return (features / np.where(norm > 0, norm, 1.0)).astype(np.float32, copy=False)


def greedy_select(
    score: np.ndarray, features: np.ndarray, mask: np.ndarray, n: int, beta_div: float
) -> Selection:
    """Pick up to `n` candidates per pair; `features` (P, K, F) define the diversity term's cosine."""
    num_pairs, width = score.shape
    unit = unit_rows(features)
    available = mask.copy()
    min_distance = np.zeros((num_pairs, width), dtype=np.float64)
    picks = np.full((num_pairs, n), -1, dtype=np.int64)
    gains = np.zeros((num_pairs, n), dtype=np.float32)
    pairs = np.arange(num_pairs)
    for step in range(n):
        objective = np.where(available, score + beta_div * min_distance, -np.inf)
        best = objective.argmax(axis=1) if width else np.zeros(num_pairs, dtype=np.int64)
        found = available[pairs, best] if width else np.zeros(num_pairs, dtype=bool)
        if not found.any():
            break
        picks[found, step] = best[found]
        gains[found, step] = min_distance[pairs[found], best[found]]
        available[pairs[found], best[found]] = False
        cosine = np.matmul(unit, unit[pairs, best][:, :, None])[:, :, 0]
        distance = 1.0 - cosine.astype(np.float64)
        min_distance = distance if step == 0 else np.minimum(min_distance, distance)
    return Selection(picks=picks, diversity_gain=gains)


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
