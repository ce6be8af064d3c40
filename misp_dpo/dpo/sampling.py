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

`fitted` [ours; the paper calls q_phi learnable without giving its form]: q_phi = softmax(x_i . w)
over a pair's stored negatives, x_i the negative's mined fields standardised over the dataset
(`FEATURES`: log q_i, s_i, l_i, v_i, similarities, diversity gain; a null field counts 0), so the
family holds both `uniform` (w = 0) and `dataset` (w = e_log q). The estimator's variance at M = 1
is S^2 (sum_i p_i^2 / q_i - 1) with p = softmax(a), zero at q = p; the fit minimises the mean over a
held-out batch of log sum_i p_i^2 / q_i (convex in w: two log-sum-exps of affine functions) with a
ridge towards the previous w, refitted every K steps on the current model's a_i (`FittedProposal`).
The draw then mixes in `DEFENSIVE` of uniform (Hesterberg 1995) so that no weight exceeds 1/(DEFENSIVE q~).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
import torch

Proposal = Literal["dataset", "uniform", "fitted"]
# The mined fields a fitted proposal reads (`proposal` enters as log q_i).
FEATURES = ("proposal", "score", "recon_error", "deviation", "sim_image", "sim_prompt", "diversity_gain")
DEFENSIVE = 0.1  # share of uniform mixed into the fitted q~


class Draw(NamedTuple):
    """One step's negatives for B pairs, padded to K columns (index -1, log weight -inf)."""

    index: np.ndarray  # type: ignore[assignment]  # (B, K) int64: position of the negative in its pair's list
    log_weight: np.ndarray  # (B, K) float64: log w_j


def restricted_proposal(q: np.ndarray, count: int, proposal: Proposal) -> np.ndarray:
    """q~ over a pair's first `count` stored negatives (uniform where q cannot be used).

    For `fitted`, `q` already holds the fitted q~ (`FittedProposal.probabilities`)."""
    if proposal in ("dataset", "fitted"):
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


def relative_variance(a: np.ndarray, q: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(B,) Var(S^) / S^2 at M = 1 of each pair: sum_i p_i^2 / q_i - 1, p = softmax(a) over its count."""
    width = a.shape[1]
    present = np.arange(width)[None, :] < counts[:, None]
    logits = np.where(present, a, -np.inf)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = p / p.sum(axis=1, keepdims=True)
    ratio = np.where(present, p**2 / np.where(present, q, 1.0), 0.0)
    return np.asarray(ratio.sum(axis=1) - 1.0)


@dataclass
class FittedProposal:
    """q_phi = (1 - DEFENSIVE) softmax(x . w) + DEFENSIVE / N over a pair's stored negatives."""

    mean: np.ndarray  # (F,) standardisation of the dataset's fields
    scale: np.ndarray  # (F,)
    w: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ridge: float = 1e-2

    @classmethod
    def for_data(cls, fields: np.ndarray, counts: np.ndarray) -> FittedProposal:
        """Standardise over the dataset's stored negatives; start at the dataset proposal (w = e_log q)."""
        present = np.arange(fields.shape[1])[None, :] < counts[:, None]
        raw = _raw(fields)[present]
        finite = np.isfinite(raw)
        mean = np.array(
            [raw[finite[:, f], f].mean() if finite[:, f].any() else 0.0 for f in range(raw.shape[1])]
        )
        std = np.array(
            [raw[finite[:, f], f].std() if finite[:, f].any() else 1.0 for f in range(raw.shape[1])]
        )
        scale = np.where(std > 1e-12, std, 1.0)
        w = np.zeros(raw.shape[1])
        w[0] = scale[0]  # x_0 = (log q - mean) / scale: w_0 = scale gives softmax(log q) = q~
        return cls(mean, scale, w)

    def features(self, fields: np.ndarray) -> np.ndarray:
        """(B, N, F) standardised features; a missing or non-finite field is 0 (the mean)."""
        x = (_raw(fields) - self.mean) / self.scale
        return np.where(np.isfinite(x), x, 0.0)

    def probabilities(self, fields: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """(B, N) q~ over each pair's first counts[b] negatives (NaN past them)."""
        present = np.arange(fields.shape[1])[None, :] < counts[:, None]
        logits = np.where(present, self.features(fields) @ self.w, -np.inf)
        top = np.where(present.any(axis=1, keepdims=True), logits.max(axis=1, keepdims=True), 0.0)
        q = np.where(present, np.exp(logits - top), 0.0)
        q = q / np.maximum(q.sum(axis=1, keepdims=True), 1e-300)
        q = (1.0 - DEFENSIVE) * q + DEFENSIVE / np.maximum(counts[:, None], 1)
        return np.where(present, q, np.nan)

    def fit(self, fields: np.ndarray, counts: np.ndarray, a: np.ndarray, iterations: int = 50) -> None:
        """Minimise mean_b log sum_i p_bi^2 / q_bi + ridge |w - w_prev|^2 over pairs with >= 2 negatives."""
        keep = counts >= 2
        if not keep.any():
            return
        present = torch.as_tensor(np.arange(fields.shape[1])[None, :] < counts[keep, None])
        x = torch.as_tensor(self.features(fields[keep]), dtype=torch.float64)
        a_t = torch.as_tensor(np.where(present.numpy(), a[keep], 0.0), dtype=torch.float64)
        log_p = torch.log_softmax(a_t.masked_fill(~present, -torch.inf), dim=1)
        previous = torch.as_tensor(self.w, dtype=torch.float64)
        w = previous.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([w], max_iter=iterations, line_search_fn="strong_wolfe")

        def objective() -> torch.Tensor:
            optimizer.zero_grad()
            logits = (x @ w).masked_fill(~present, -torch.inf)
            log_q = torch.log_softmax(logits, dim=1)
            chi = torch.logsumexp((2 * log_p - log_q).masked_fill(~present, -torch.inf), dim=1)
            loss = chi.mean() + self.ridge * ((w - previous) ** 2).sum()
            loss.backward()
            return loss

        optimizer.step(objective)
        fitted = w.detach().numpy()
        if np.all(np.isfinite(fitted)):
            self.w = fitted


def _raw(fields: np.ndarray) -> np.ndarray:
    """Fields as the model reads them: log of the proposal (first), the others as stored."""
    raw = np.array(fields, dtype=np.float64, copy=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        raw[..., 0] = np.log(raw[..., 0])
    return raw
