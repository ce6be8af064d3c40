"""The four strategies through `select_negatives`, on seeded pools."""

from __future__ import annotations

import numpy as np
import pytest

from misp_dpo.mining.scores import PoolCodes, deviation, misp_score, softmax_proposal
from misp_dpo.mining.selection import greedy_select, pair_seeds
from misp_dpo.mining.strategies import SelectionParams, SelectionPools, select_negatives
from tests.helpers import clustered_unit_vectors


def make_pools(
    pairs: int = 20, width: int = 10, dim: int = 6, seed: int = 0
) -> tuple[SelectionPools, PoolCodes]:
    rng = np.random.default_rng(seed)
    vectors, _ = clustered_unit_vectors(pairs * (width + 1), dim, 4, 0.4, rng)
    positive = vectors[:pairs]
    candidates = vectors[pairs:].reshape(pairs, width, dim)
    mask = np.ones((pairs, width), bool)
    mask[0, 4:] = False  # a short pool
    mask[1] = False  # an empty pool
    candidates = np.where(mask[:, :, None], candidates, 0.0)
    sim_image = np.einsum("pkd,pd->pk", candidates, positive)
    sim_prompt = rng.uniform(-1, 1, (pairs, width))
    codes = PoolCodes(
        codes=rng.random((pairs, width, 5)).astype(np.float32) * mask[:, :, None],
        recon_error=rng.random((pairs, width)).astype(np.float32) * mask,
    )
    seeds = pair_seeds([f"p{i}" for i in range(pairs)], 0)
    return SelectionPools(positive, candidates, mask, sim_image, sim_prompt, seeds), codes


def test_nearest_returns_the_n_most_similar_of_the_filtered_pool() -> None:
    pools, _ = make_pools()
    mined = select_negatives(pools, SelectionParams("nearest", negatives=3))
    for p in range(len(pools.mask)):
        pool = np.flatnonzero(pools.mask[p])
        expected = pool[np.argsort(-pools.sim_image[p, pool], kind="stable")][:3]
        assert mined.picks[p][mined.picks[p] >= 0].tolist() == expected.tolist()
    np.testing.assert_allclose(mined.score[2], np.sort(pools.sim_image[2])[::-1][:3], rtol=1e-6)
    assert mined.counts.tolist()[:2] == [3, 0]


def test_misp_fields_are_the_scores_of_the_picked_candidates() -> None:
    pools, codes = make_pools()
    params = SelectionParams("misp", negatives=3, weights=(1.0, 0.5), beta_div=1.0, tau=0.5, relevance=0.0)
    mined = select_negatives(pools, params, codes)
    v = deviation(codes.codes)
    s = misp_score(codes.recon_error, v, pools.mask, (1.0, 0.5))
    expected = greedy_select(s, codes.codes, pools.mask, 3, 1.0)
    np.testing.assert_array_equal(mined.picks, expected.picks)
    q = softmax_proposal(s, pools.mask, 0.5)
    p, picks = 5, mined.picks[5]
    np.testing.assert_allclose(mined.score[p], s[p, picks], rtol=1e-6)
    np.testing.assert_allclose(mined.recon_error[p], codes.recon_error[p, picks], rtol=1e-6)
    np.testing.assert_allclose(mined.deviation[p], v[p, picks], rtol=1e-6)
    np.testing.assert_allclose(mined.proposal[p], q[p, picks], rtol=1e-6)
    np.testing.assert_allclose(mined.diversity_gain, expected.diversity_gain)
    sums = mined.pool_proposal.sum(axis=1)
    np.testing.assert_allclose(sums[pools.mask.any(axis=1)], 1.0)


def test_maxmin_uses_clip_differences_and_beta_zero_is_nearest() -> None:
    pools, _ = make_pools()
    nearest = select_negatives(pools, SelectionParams("nearest"))
    flat = select_negatives(pools, SelectionParams("maxmin", beta_div=0.0))
    np.testing.assert_array_equal(nearest.picks, flat.picks)
    diverse = select_negatives(pools, SelectionParams("maxmin", beta_div=5.0))
    features = pools.candidates - pools.positive[:, None, :]
    expected = greedy_select(pools.sim_image, features, pools.mask, 3, 5.0)
    np.testing.assert_array_equal(diverse.picks, expected.picks)
    assert (diverse.picks != nearest.picks).any()
    assert diverse.recon_error is None and diverse.deviation is None


def test_random_is_uniform_seeded_and_scoreless() -> None:
    pools, _ = make_pools()
    mined = select_negatives(pools, SelectionParams("random"))
    again = select_negatives(pools._replace(seeds=pools.seeds.copy()), SelectionParams("random"))
    np.testing.assert_array_equal(mined.picks, again.picks)
    other = select_negatives(
        pools._replace(seeds=pair_seeds([f"p{i}" for i in range(20)], 1)), SelectionParams("random")
    )
    assert (mined.picks != other.picks).any()
    assert mined.score is None
    np.testing.assert_allclose(mined.proposal[0], 0.25)  # the short pool of 4
    np.testing.assert_allclose(mined.proposal[2], 0.1)
    with pytest.raises(ValueError, match="seeds"):
        select_negatives(pools._replace(seeds=None), SelectionParams("random"))


def test_non_finite_pools_are_flagged_and_get_no_picks() -> None:
    pools, codes = make_pools()
    recon = codes.recon_error.copy()
    recon[3, 2] = np.nan
    mined = select_negatives(pools, SelectionParams("misp"), codes._replace(recon_error=recon))
    assert mined.invalid.tolist() == [p == 3 for p in range(20)]
    assert (mined.picks[3] == -1).all() and (mined.picks[4] >= 0).all()
    padded_nan = codes.codes.copy()
    padded_nan[0, 8] = np.nan  # padding: ignored
    assert not select_negatives(
        pools, SelectionParams("misp"), codes._replace(codes=padded_nan)
    ).invalid.any()


def test_relevance_adds_the_pool_normalised_similarity_by_hand() -> None:
    recon = np.array([[1.0, 2.0, 4.0, 9.0]])
    dev = np.array([[2.0, 2.0, 1.0, 9.0]])
    sim = np.array([[0.5, 0.9, 0.7, 0.1]])
    mask = np.array([[True, True, True, False]])  # the last slot is padding: ignored by min/max
    paper = misp_score(recon, dev, mask, (1.0, 1.0))
    np.testing.assert_allclose(paper, [[1 / 4 + 1, 2 / 4 + 1, 1 + 1 / 2, 0]])
    assert np.array_equal(misp_score(recon, dev, mask, (1.0, 1.0), 0.0, sim), paper)
    with_relevance = misp_score(recon, dev, mask, (1.0, 1.0), 2.0, sim)
    np.testing.assert_allclose(with_relevance - paper, [[2 * 0.0, 2 * 1.0, 2 * 0.5, 0.0]])
    flat = misp_score(recon, dev, mask, (1.0, 1.0), 2.0, np.full((1, 4), 0.3))
    assert np.array_equal(flat, paper), "a pool of equal similarities adds nothing"


def test_a_dominant_relevance_picks_the_nearest() -> None:
    pools, codes = make_pools()
    nearest = select_negatives(pools, SelectionParams("nearest", negatives=3))
    mined = select_negatives(pools, SelectionParams("misp", negatives=3, beta_div=0.0, relevance=1e6), codes)
    np.testing.assert_array_equal(mined.picks, nearest.picks)
