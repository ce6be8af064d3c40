"""Importance sampling of negatives: the estimate of sum_i exp(a_i) is unbiased (acceptance a)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from misp_dpo.dpo.losses import image_loss
from misp_dpo.dpo.sampling import draw_negatives, draw_pair, estimate_sum, restricted_proposal
from misp_dpo.dpo.step import pair_rngs

A = np.array([0.3, -1.2, 2.0, 0.7])
Q_POOL = np.array([0.05, 0.30, 0.02, 0.13])  # q over a larger pool: the stored four sum to 0.5


def _expected_estimate(a: np.ndarray, q: np.ndarray, m: int, proposal: str) -> float:
    """E[S^] by enumerating every ordered sequence of m draws with its probability."""
    q_tilde = restricted_proposal(q, len(a), proposal)  # type: ignore[arg-type]
    total = 0.0
    for draws in itertools.product(range(len(a)), repeat=m):
        prob = float(np.prod(q_tilde[list(draws)]))
        distinct, counts = np.unique(draws, return_counts=True)
        total += prob * estimate_sum(a, distinct, np.log(counts / (m * q_tilde[distinct])))
    return total


@pytest.mark.parametrize(("m", "proposal"), [(1, "dataset"), (2, "dataset"), (3, "dataset"), (2, "uniform")])
def test_estimator_is_exactly_unbiased(m: int, proposal: str) -> None:
    exact = float(np.exp(A).sum())
    assert _expected_estimate(A, Q_POOL, m, proposal) == pytest.approx(exact, rel=1e-12)


def test_weighting_by_the_pool_q_would_be_biased() -> None:
    """Why q is renormalised over the stored negatives: the raw pool q over-weights by 1 / sum_k q_k."""
    q_tilde = restricted_proposal(Q_POOL, 4, "dataset")
    biased = sum(q_tilde[j] * np.exp(A[j]) / Q_POOL[j] for j in range(4))
    assert biased == pytest.approx(np.exp(A).sum() / Q_POOL.sum())


def test_mean_of_many_draws_within_two_percent() -> None:
    rng = np.random.default_rng(0)
    estimates = []
    for _ in range(20000):
        distinct, log_w = draw_pair(Q_POOL, 4, 2, "dataset", rng)
        estimates.append(estimate_sum(A, distinct, log_w))
    exact = np.exp(A).sum()
    assert abs(np.mean(estimates) - exact) / exact < 0.02


def test_draws_forward_each_image_once_and_count_every_draw() -> None:
    rng = np.random.default_rng(1)
    q_tilde = restricted_proposal(Q_POOL, 4, "dataset")
    for _ in range(200):
        distinct, log_w = draw_pair(Q_POOL, 4, 3, "dataset", rng)
        assert len(np.unique(distinct)) == len(distinct) <= 3
        counts = np.exp(log_w) * 3 * q_tilde[distinct]
        assert np.allclose(counts, np.round(counts)) and round(counts.sum()) == 3


@pytest.mark.parametrize("m", [0, 4, 9])
def test_all_negatives_give_the_exact_loss(m: int) -> None:
    distinct, log_w = draw_pair(Q_POOL, 4, m, "dataset", np.random.default_rng(0))
    assert distinct.tolist() == [0, 1, 2, 3] and (log_w == 0).all()
    h_pos, h_neg = torch.tensor([0.2]), torch.tensor(A[None, :])
    weighted = image_loss(h_pos, h_neg[:, distinct], 0.5, torch.tensor(log_w[None, :]))
    assert torch.equal(weighted, image_loss(h_pos, h_neg, 0.5))


@pytest.mark.parametrize("bad", [np.array([0.1, np.nan, 0.2, 0.1]), np.array([0.1, 0.0, 0.2, 0.1])])
def test_unusable_proposals_fall_back_to_uniform(bad: np.ndarray) -> None:
    assert np.allclose(restricted_proposal(bad, 4, "dataset"), 0.25)
    assert _expected_estimate(A, bad, 2, "dataset") == pytest.approx(np.exp(A).sum(), rel=1e-12)


def test_draw_of_a_pair_does_not_depend_on_its_batch() -> None:
    proposals = np.tile(np.append(Q_POOL, np.nan), (3, 1))
    counts = np.array([4, 4, 3])
    rows = np.array([10, 11, 12])
    together = draw_negatives(proposals, counts, 2, "dataset", pair_rngs(0, 5, rows))
    alone = draw_negatives(proposals[1:2], counts[1:2], 2, "dataset", pair_rngs(0, 5, rows[1:2]))
    width = (together.index[1] >= 0).sum()
    assert np.array_equal(together.index[1, :width], alone.index[0, :width])
    assert np.array_equal(together.log_weight[1, :width], alone.log_weight[0, :width])
    assert (together.index[:, width:] < 0).all() or together.index.shape[1] == width
