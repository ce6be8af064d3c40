"""Scores, proposal and the greedy selection on hand-built pools."""

from __future__ import annotations

import numpy as np
import pytest

from misp_dpo.mining.scores import deviation, misp_score, softmax_proposal, uniform_proposal
from misp_dpo.mining.selection import clean_pool, greedy_select, pair_seeds, uniform_keys

# Hand-worked pool of 4 (see test_greedy_matches_the_hand_worked_example):
RECON = np.array([[4.0, 3.6, 2.0, 1.0]])
CODES = np.array([[[2.0, 0.0], [1.6, 0.0], [0.0, 1.0], [1.0, 1.0]]])


def test_scores_match_the_hand_worked_example() -> None:
    mask = np.ones((1, 4), bool)
    v = deviation(CODES)
    np.testing.assert_allclose(v, [[2.0, 1.6, 1.0, 2.0]])
    # l / max l = [1, .9, .5, .25]; v / max v = [1, .8, .5, 1]
    np.testing.assert_allclose(misp_score(RECON, v, mask, (1.0, 1.0)), [[2.0, 1.7, 1.0, 1.25]])
    np.testing.assert_allclose(misp_score(RECON, v, mask, (2.0, 0.0)), [[2.0, 1.8, 1.0, 0.5]])


def test_greedy_matches_the_hand_worked_example() -> None:
    """s = [2, 1.7, 1, 1.25]. Pick 1: argmax s -> 0 (gain 0). Distances to z0 = (2,0): z1 same
    direction -> 0, z2 orthogonal -> 1, z3 at 45 degrees -> 1 - 1/sqrt2 = .2929. Objectives
    1.7 / 2.0 / 1.5429 -> pick 2 (gain 1). Distances to z2: z1 -> 1 (min stays 0), z3 -> .2929.
    Objectives 1.7 / 1.5429 -> pick 1 (gain 0). Top-3 by s alone would be [0, 1, 3]."""
    mask = np.ones((1, 4), bool)
    s = misp_score(RECON, deviation(CODES), mask, (1.0, 1.0))
    picked = greedy_select(s, CODES, mask, n=3, beta_div=1.0)
    assert picked.picks.tolist() == [[0, 2, 1]]
    np.testing.assert_allclose(picked.diversity_gain, [[0.0, 1.0, 0.0]], atol=1e-6)
    # beta_div = 3: the third pick becomes 3 (1.25 + 3 * .2929 = 2.129 > 1.7)
    picked = greedy_select(s, CODES, mask, n=3, beta_div=3.0)
    assert picked.picks.tolist() == [[0, 2, 3]]
    np.testing.assert_allclose(picked.diversity_gain, [[0.0, 1.0, 1 - 2**-0.5]], atol=1e-6)


def test_beta_zero_is_top_n_by_score_and_picks_are_distinct_and_unpadded() -> None:
    rng = np.random.default_rng(0)
    score = rng.random((50, 12))
    mask = rng.random((50, 12)) < 0.7
    features = rng.standard_normal((50, 12, 5))
    picked = greedy_select(score, features, mask, n=4, beta_div=0.0)
    for p in range(50):
        pool = np.flatnonzero(mask[p])
        expected = pool[np.argsort(-score[p, pool], kind="stable")][:4]
        got = picked.picks[p][picked.picks[p] >= 0]
        assert got.tolist() == expected.tolist()
        assert (picked.picks[p] == -1).sum() == max(0, 4 - len(pool))
    diverse = greedy_select(score, features, mask, n=4, beta_div=5.0).picks
    for row, m in zip(diverse, mask, strict=True):
        chosen = row[row >= 0]
        assert len(set(chosen.tolist())) == len(chosen) and m[chosen].all()


def test_empty_pools_give_no_picks() -> None:
    picked = greedy_select(np.zeros((2, 0)), np.zeros((2, 0, 3)), np.zeros((2, 0), bool), 3, 1.0)
    assert (picked.picks == -1).all()


def test_padding_never_sets_the_pool_max() -> None:
    values = np.array([[1.0, 2.0, 100.0]])
    mask = np.array([[True, True, False]])
    np.testing.assert_allclose(misp_score(values, values, mask, (1.0, 1.0)), [[1.0, 2.0, 0.0]])


def test_proposals_sum_to_one_over_each_pool() -> None:
    rng = np.random.default_rng(1)
    score = rng.normal(size=(30, 9)) * 5
    mask = rng.random((30, 9)) < 0.6
    mask[0] = False
    for q in (softmax_proposal(score, mask, tau=0.3), uniform_proposal(mask)):
        sums = q.sum(axis=1)
        np.testing.assert_allclose(sums[mask.any(axis=1)], 1.0, atol=1e-12)
        assert sums[0] == 0 and (q[~mask] == 0).all()
    q = softmax_proposal(np.array([[0.0, np.log(3.0)]]), np.ones((1, 2), bool), tau=1.0)
    np.testing.assert_allclose(q, [[0.25, 0.75]])


def test_clean_pool_removes_the_positive_and_repeats() -> None:
    rows = np.array([[5, 7, 5, 9, 7, -1], [1, 2, 3, 4, 5, 6]])
    mask = rows >= 0
    keep, positives, repeats = clean_pool(rows, mask, np.array([9, 6]))
    assert keep.tolist() == [[True, True, False, False, False, False], [True] * 5 + [False]]
    assert (positives, repeats) == (2, 2)


def test_random_keys_depend_only_on_seed_and_pair() -> None:
    ids = [f"pair-{i}" for i in range(100)]
    seeds = pair_seeds(ids, seed=3)
    np.testing.assert_array_equal(seeds[40:60], pair_seeds(ids[40:60], seed=3))
    assert not np.array_equal(seeds, pair_seeds(ids, seed=4))
    keys = uniform_keys(seeds, 16)
    assert keys.shape == (100, 16) and 0 <= keys.min() and keys.max() < 1
    np.testing.assert_array_equal(keys[7], uniform_keys(seeds[7:8], 16)[0])
    # top-1 of the keys is uniform over the pool: every slot wins about 1/16 of 20000 draws
    wins = np.bincount(uniform_keys(pair_seeds(range(20000), 0), 16).argmax(axis=1), minlength=16)
    assert wins.min() > 1000 and wins.max() < 1500


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_selection_is_independent_of_batching(beta: float) -> None:
    rng = np.random.default_rng(2)
    score, features = rng.random((40, 10)), rng.standard_normal((40, 10, 4))
    mask = rng.random((40, 10)) < 0.8
    whole = greedy_select(score, features, mask, 3, beta).picks
    parts = [
        greedy_select(score[a:b], features[a:b], mask[a:b], 3, beta).picks for a, b in ((0, 13), (13, 40))
    ]
    np.testing.assert_array_equal(whole, np.concatenate(parts))
