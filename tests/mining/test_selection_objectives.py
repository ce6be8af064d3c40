"""The topm and nearest-random baselines, the latent-coverage objective, the paper preset and the
refusals of knobs a strategy would ignore, on hand-worked pools."""

from __future__ import annotations

import numpy as np
import pytest

from misp_dpo.config import build_config
from misp_dpo.errors import UserError
from misp_dpo.mining.mine import latent_coverage
from misp_dpo.mining.selection import greedy_select, pair_seeds, top_latents, uniform_keys
from misp_dpo.mining.strategies import (
    SelectionParams,
    SelectionPools,
    check_sae_variant,
    select_negatives,
    similarity_rank,
)
from tests.mining.test_strategies import make_pools

# Hand-worked pool for latent coverage (see test_latent_coverage_matches_the_hand_worked_example)
CODES = np.array([[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [3.0, 3.0, 0.0], [1.0, 1.0, 4.0]]])
SCORE = np.array([[2.0, 1.0, 1.4, 0.9]])


def test_top_latents_centre_on_the_pool_split_signs_and_sum_to_one() -> None:
    """Pool mean of the positive parts [2, 2, 1]: excesses c0 [2,0,0], c1 [0,2,0], c2 [1,1,0],
    c3 [0,0,3]; negative parts are 0 everywhere. Normalised: one latent each, c2 half and half."""
    index, weight = top_latents(CODES, np.ones((1, 4), bool), 2)
    as_dict = [
        {int(i): float(w) for i, w in zip(index[0, k], weight[0, k], strict=True) if w > 0} for k in range(4)
    ]
    assert as_dict == [{0: 1.0}, {1: 1.0}, {0: 0.5, 1: 0.5}, {2: 1.0}]
    signed = np.array([[[-3.0, 0.0], [1.0, 0.0]]])  # mean of neg parts [1.5, 0]: c0's -3 is index 2
    index, weight = top_latents(signed, np.ones((1, 2), bool), 1)
    assert index[0, 0, 0] == 2 and weight[0, 0, 0] == 1.0
    assert index[0, 1, 0] == 0 and weight[0, 1, 0] == 1.0
    padded = top_latents(CODES, np.array([[True, True, True, False]]), 2)[1]
    assert padded[0, 3].sum() == 0.0


def test_latent_coverage_matches_the_hand_worked_example() -> None:
    """Latents a (above): c0 {0: 1}, c1 {1: 1}, c2 {0: .5, 1: .5}, c3 {2: 1}; s = [2, 1, 1.4, .9], beta 1.
    Pick 1: argmax s -> c0. Covered {0: 1}: gains c1 1, c2 .5, c3 1 -> objectives 2, 1.9, 1.9 -> c1.
    Covered {0: 1, 1: 1}: gains c2 0, c3 1 -> 1.4 vs 1.9 -> c3. Min-cosine instead takes c2 third:
    it is 1 - cos 45deg = .29 from both picks (1.69) while c3 is .76 away (1.66), though every latent
    c2 changes is already covered."""
    mask = np.ones((1, 4), bool)
    covered = greedy_select(SCORE, CODES, mask, 3, 1.0, "latent-coverage", latent_top=2)
    assert covered.picks.tolist() == [[0, 1, 3]]
    np.testing.assert_allclose(covered.diversity_gain, [[0.0, 1.0, 1.0]])
    cosine = greedy_select(SCORE, CODES, mask, 3, 1.0, "min-cosine")
    assert cosine.picks.tolist() == [[0, 1, 2]]
    flat = greedy_select(SCORE, CODES, mask, 3, 0.0, "latent-coverage", latent_top=2)
    assert flat.picks.tolist() == [[0, 2, 1]], "beta 0 is top-N by score"


def test_latent_coverage_through_misp() -> None:
    pools, codes = make_pools()
    params = SelectionParams("misp", beta_div=2.0, diversity="latent-coverage", latent_top=3)
    mined = select_negatives(pools, params, codes)
    for row, m in zip(mined.picks, pools.mask, strict=True):
        chosen = row[row >= 0]
        assert len(set(chosen.tolist())) == len(chosen) == min(3, m.sum()) and m[chosen].all()
    assert (mined.diversity_gain[:, 0] == 0).all() and (mined.diversity_gain >= 0).all()


def _hand_pools(sim: list[float], pair: str = "p") -> SelectionPools:
    k = len(sim)
    candidates = np.zeros((1, k, 2))
    return SelectionPools(
        np.zeros((1, 2)),
        candidates,
        np.ones((1, k), bool),
        np.array([sim]),
        np.zeros((1, k)),
        pair_seeds([pair], 0),
    )


def test_similarity_rank_by_hand() -> None:
    rank = similarity_rank(np.array([[0.2, 0.9, 0.5, 0.9, 0.7]]), np.array([[True, True, True, True, False]]))
    assert rank.tolist() == [[3, 0, 2, 1, 4]]  # the tie goes to the lower index; padding last


def test_topm_draws_uniformly_from_the_m_most_similar() -> None:
    """Pool sims [.1, .9, .3, .8, .5, .7]: the top 4 are {1, 3, 5, 4}. N = 2 picks are the two
    largest uniform keys among those four, whatever the others' keys."""
    pools = _hand_pools([0.1, 0.9, 0.3, 0.8, 0.5, 0.7])
    keys = uniform_keys(pools.seeds, 6)[0]
    top = np.array([1, 3, 4, 5])
    expected = top[np.argsort(-keys[top], kind="stable")][:2]
    mined = select_negatives(pools, SelectionParams("topm", negatives=2, top_m=4))
    assert mined.picks[0].tolist() == expected.tolist()
    assert mined.score is None
    np.testing.assert_allclose(mined.proposal, 0.25)
    np.testing.assert_allclose(mined.pool_proposal, [[0, 0.25, 0, 0.25, 0.25, 0.25]])
    assert sorted(select_negatives(pools, SelectionParams("topm", negatives=2, top_m=2)).picks[0]) == [1, 3]


def test_topm_over_many_pools_stays_in_the_top_and_m_at_pool_size_is_random() -> None:
    pools, _ = make_pools()
    mined = select_negatives(pools, SelectionParams("topm", negatives=3, top_m=5))
    rank = similarity_rank(pools.sim_image, pools.mask)
    picked = mined.picks >= 0
    assert (np.take_along_axis(rank, np.maximum(mined.picks, 0), 1)[picked] < 5).all()
    assert mined.counts.tolist()[:3] == [3, 0, 3]
    everything = select_negatives(pools, SelectionParams("topm", top_m=64))
    np.testing.assert_array_equal(everything.picks, select_negatives(pools, SelectionParams("random")).picks)


def test_nearest_random_takes_the_k_nearest_then_uniform_from_the_rest() -> None:
    """Sims [.1, .9, .3, .8, .5]: k = 1 takes 1 first, then the two largest keys among {0, 2, 3, 4};
    k = 2 takes 1, 3 then the largest key among {0, 2, 4}."""
    pools = _hand_pools([0.1, 0.9, 0.3, 0.8, 0.5])
    keys = uniform_keys(pools.seeds, 5)[0]
    rest = np.array([0, 2, 3, 4])
    one = select_negatives(pools, SelectionParams("nearest-random", negatives=3, nearest_count=1))
    assert one.picks[0].tolist() == [1, *rest[np.argsort(-keys[rest], kind="stable")][:2].tolist()]
    rest = np.array([0, 2, 4])
    two = select_negatives(pools, SelectionParams("nearest-random", negatives=3, nearest_count=2))
    assert two.picks[0].tolist() == [1, 3, int(rest[np.argmax(keys[rest])])]
    np.testing.assert_allclose(two.proposal, 0.2)


def test_nearest_random_ends_are_random_and_nearest() -> None:
    pools, _ = make_pools()
    zero = select_negatives(pools, SelectionParams("nearest-random", nearest_count=0))
    np.testing.assert_array_equal(zero.picks, select_negatives(pools, SelectionParams("random")).picks)
    many = select_negatives(pools, SelectionParams("nearest-random", nearest_count=3))
    np.testing.assert_array_equal(many.picks, select_negatives(pools, SelectionParams("nearest")).picks)


@pytest.mark.parametrize(
    ("values", "flag"),
    [
        ({"strategy": "random", "relevance": 2.0}, "--relevance 2.0 is only used by --strategy misp"),
        ({"strategy": "maxmin", "weights": "1,0"}, "--weights 1.0,0.0 is only used by --strategy misp"),
        ({"strategy": "nearest", "top_m": 8}, "--top-m 8 is only used by --strategy topm"),
        ({"strategy": "misp", "nearest_count": 2}, "--nearest-count 2 is only used by --strategy nearest-"),
        ({"weights": "0,0", "relevance": 0.0}, "not both 0 unless --relevance > 0"),
        ({"strategy": "topm", "top_m": 2}, "top_m (2) must be at least negatives (3)"),
        ({"preset": "paper", "relevance": 2.0}, "--preset paper sets --relevance 0.0; drop --relevance 2.0"),
        ({"preset": "paper", "strategy": "maxmin"}, "--preset paper sets --strategy misp"),
    ],
)
def test_ignored_or_contradicting_knobs_are_refused_in_one_line(values: dict, flag: str) -> None:
    with pytest.raises(UserError, match="mine") as error:
        build_config(SelectionParams, values, "mine")
    assert flag in str(error.value) and "\n" not in str(error.value)


def test_weights_zero_with_relevance_and_the_paper_preset() -> None:
    """w = 0,0 with relevance > 0 scores by similarity alone: with beta 0 that is `nearest`."""
    params = build_config(SelectionParams, {"weights": "0,0", "relevance": 1.0, "beta_div": 0.0}, "mine")
    assert params.weights == (0.0, 0.0)
    pools, codes = make_pools()
    nearest = select_negatives(pools, SelectionParams("nearest"))
    np.testing.assert_array_equal(select_negatives(pools, params, codes).picks, nearest.picks)
    paper = SelectionParams(preset="paper", beta_div=1.0)
    assert (paper.strategy, paper.weights, paper.beta_div, paper.relevance, paper.diversity) == (
        "misp",
        (1.0, 1.0),
        1.0,
        0.0,
        "min-cosine",
    )
    np.testing.assert_array_equal(
        select_negatives(pools, paper, codes).picks,
        select_negatives(pools, SelectionParams(beta_div=1.0, relevance=0.0), codes).picks,
    )


def test_the_paper_preset_needs_the_paper_sae() -> None:
    check_sae_variant(SelectionParams(preset="paper"), "paper")
    check_sae_variant(SelectionParams(), "topk")
    with pytest.raises(
        ValueError, match="--preset paper needs an SAE trained with --variant paper; --sae holds topk"
    ):
        check_sae_variant(SelectionParams(preset="paper"), "topk")


def test_latent_coverage_counts_what_only_one_negative_changes() -> None:
    # Three candidates over 4 latents: 0 and 2 change latent 0, 1 changes latent 1. Beyond the pool's
    # mean each keeps one latent with weight 1, so two picks on different latents cover 2 / 2 = 1, two
    # on the same latent 1 / 2, a single pick 1 / 1, and no pick has no value.
    one_pool = np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0]], dtype=np.float32)
    codes = np.stack([one_pool] * 4)
    mask = np.ones((4, 3), dtype=bool)
    picks = np.array([[0, 1], [0, 2], [2, -1], [-1, -1]])
    coverage = latent_coverage(codes, mask, picks)
    np.testing.assert_allclose(coverage[:3], [1.0, 0.5, 1.0])
    assert np.isnan(coverage[3])


def test_top_latents_of_chosen_rows_are_those_of_the_whole_pool() -> None:
    """`rows` ranks only the picks, against the whole pool's mean: the same latents and weights as
    ranking every candidate and taking the picks' rows (zeros where no pick)."""
    rng = np.random.default_rng(3)
    codes = rng.normal(size=(40, 9, 6)).astype(np.float32)
    mask = rng.random((40, 9)) < 0.8
    rows = np.stack([rng.choice(9, 3, replace=False) for _ in range(40)])
    rows[::7, 2] = -1
    full_index, full_weight = top_latents(codes, mask, 4)
    index, weight = top_latents(codes, mask, 4, rows=rows)
    safe, present = np.maximum(rows, 0)[:, :, None], (rows >= 0)[:, :, None]
    want_index = np.take_along_axis(full_index, safe, axis=1)
    want_weight = np.take_along_axis(full_weight, safe, axis=1) * present

    def by_latent(i: np.ndarray, w: np.ndarray) -> list[dict[int, float]]:
        return [
            {int(k): round(float(v), 9) for k, v in zip(ki, wi, strict=True) if v > 0}
            for ki, wi in zip(i.reshape(-1, 4), w.reshape(-1, 4), strict=True)
        ]

    assert (weight > 0).any() and not (weight[rows < 0] > 0).any()
    assert by_latent(index, weight) == by_latent(want_index, want_weight)
