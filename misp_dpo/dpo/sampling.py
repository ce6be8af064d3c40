"""Which negatives a step forwards, and the importance weights that keep the image term's sum unbiased.

What the dataset's proposal means here. `mine` stores, per pair, the N negatives it picked and, for
each, q_i: its probability under the proposal softmax(s / tau) over the pair's *whole* candidate
pool, so over the stored N the q_i sum to at most 1. Only the stored N can be forwarded, so the sum
we estimate is the exact loss's S = sum_{i <= N} exp(a_i). We draw M indices with replacement from
the proposal restricted to the stored set, q~_i = q_i / sum_{k <= N} q_k (what drawing from the
pool's q and discarding non-stored picks gives), and estimate

    S^ = (1/M) sum_t exp(a_{j_t}) / q~_{j_t} = sum_{distinct j} w_j exp(a_j),  w_j = c_j / (M q~_j),

with c_j the number of draws of j. E[S^] = sum_j q~_j exp(a_j) / q~_j = S exactly, for any M >= 1.
Each distinct image is forwarded once and enters the loss with log weight log w_j. Weighting by the
pool-level q_i itself would estimate S / sum_k q_k instead: biased whenever the pool held more.

M >= N (or `sample_negatives = 0`) forwards every stored negative with w = 1: the exact loss, not an
estimate. Pairs whose proposals are missing, non-finite or not positive fall back to uniform q~.
The loss log(1 + S^) is still biased (Jensen), as in the paper; only the sum is unbiased.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

Proposal = Literal["dataset", "uniform"]


class Draw(NamedTuple):
    """One step's negatives for B pairs, padded to K columns (index -1, log weight -inf)."""

    index: np.ndarray  # (B, K) int64: position of the negative in the pair's stored list
    log_weight: np.ndarray  # (B, K) float64: log w_j


def restricted_proposal(q: np.ndarray, count: int, proposal: Proposal) -> np.ndarray:
    """q~ over a pair's first `count` stored negatives (uniform where q cannot be used)."""
    if proposal == "dataset":
        kept = q[:count].astype(np.float64)
        if np.all(np.isfinite(kept)) and np.all(kept > 0):
            return kept / kept.sum()
    return np.full(count, 1.0 / count)


def draw_pair(
    q: np.ndarray, count: int, m: int, proposal: Proposal, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(distinct indices, log weights) for one pair: all `count` with w = 1 when m is 0 or >= count."""
    if m <= 0 or m >= count:
        return np.arange(count), np.zeros(count)
    q_tilde = restricted_proposal(q, count, proposal)
    draws = rng.choice(count, size=m, replace=True, p=q_tilde)
    distinct, counts = np.unique(draws, return_counts=True)
    return distinct, np.log(counts / (m * q_tilde[distinct]))


def draw_negatives(
    proposals: np.ndarray, counts: np.ndarray, m: int, proposal: Proposal, rngs: list[np.random.Generator]
) -> Draw:
    """Draw every pair of a batch, each from its own generator (independent of the batch layout).

    proposals: (B, N_max) q_i (NaN past a pair's count); counts: (B,) stored negatives per pair.
    """
    picks = [draw_pair(proposals[b], int(counts[b]), m, proposal, rngs[b]) for b in range(len(counts))]
    width = max((len(p[0]) for p in picks), default=0)
    index = np.full((len(picks), width), -1, dtype=np.int64)
    log_weight = np.full((len(picks), width), -np.inf)
    for b, (idx, logw) in enumerate(picks):
        index[b, : len(idx)] = idx
        log_weight[b, : len(idx)] = logw
    return Draw(index=index, log_weight=log_weight)


def estimate_sum(a: np.ndarray, distinct: np.ndarray, log_weight: np.ndarray) -> float:
    """S^ = sum_j w_j exp(a_j) for one pair's draw (used by tests and diagnostics)."""
    return float(np.exp(a[distinct] + log_weight).sum())
