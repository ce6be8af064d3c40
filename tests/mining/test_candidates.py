from __future__ import annotations

import numpy as np
import pytest

from misp_dpo.mining.candidates import (
    GATHER_FLOATS,
    PoolSettings,
    apply_filters,
    build_pools,
    merge_neighbours,
    select_pool,
)
from misp_dpo.mining.index import GPU_MAX_K, IndexSpec, Searcher, build_index
from tests.helpers import clustered_unit_vectors


def brute_force(vectors: np.ndarray):  # noqa: ANN201 - a SearchFn
    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ vectors.astype(np.float32).T
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, ids, axis=1), ids

    return search


def test_merge_keeps_each_row_once() -> None:
    by_image = np.array([[5, 3, 9], [1, -1, -1]])
    by_prompt = np.array([[3, 7, 5], [1, 2, 4]])
    merged = merge_neighbours(by_image, by_prompt)
    assert merged.tolist() == [[-1, -1, 3, 5, 7, 9], [-1, -1, -1, 1, 2, 4]]


def test_filters_catch_boundaries_and_count_each_candidate_once() -> None:
    rows = np.array([[-1, 4, 10, 11, 12, 13, 14, 15]])
    # columns: sim_image, sim_prompt, sim_chosen, squared norm; the positive's squared norm is 1.0
    sims = np.array(
        [
            [
                [0.0, 0.0, 0.0, 0.0],  # padding
                [1.0, 0.3, 0.9, 1.0],  # the positive itself (also identical and a false negative)
                [0.999996, 0.2, 0.1, 1.0],  # an identical image under other bytes: distance^2 8e-6
                [0.99998, 0.2, 0.1, 1.0],  # cosine ~1 but 4e-5 apart: a near-duplicate, not identical
                [0.9, 0.2, 0.1, 1.0],  # exactly at dup_threshold: removed
                [0.89, 0.2, 0.5, 1.0],  # exactly at the positive's chosen cosine minus margin: removed
                [0.89, 0.2, 0.49, 1.0],  # just below it: kept
                [0.5, 0.9, 0.0, 1.0],  # kept
            ]
        ],
        dtype=np.float32,
    )
    settings = PoolSettings(dup_threshold=0.9, margin=0.1)
    reference = np.array([[0.6, 1.0]], np.float32)
    keep, counts = apply_filters(rows, np.array([4]), sims, reference, settings)
    assert keep.tolist() == [[False, False, False, False, False, False, True, True]]
    assert counts == {"self": 1, "duplicate": 1, "near_duplicate": 2, "false_negative": 1}


def test_select_pool_fills_image_then_prompt_slots_and_ranks_by_image() -> None:
    rows = np.array([[0, 1, 2, 3, 4, 5, 6, 7]])
    sim_image = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.8]])
    sim_prompt = np.array([[0.0, 0.0, 0.0, 0.0, 0.1, 0.9, 0.8, 0.0]])
    keep = np.array([[True, True, True, True, True, True, True, False]])
    only_image = select_pool(
        rows, sim_image, sim_prompt, keep, PoolSettings(pool=4, min_pool=0, prompt_share=0.0)
    )
    assert only_image.tolist() == [[0, 1, 2, 3]]
    half = select_pool(rows, sim_image, sim_prompt, keep, PoolSettings(pool=4, min_pool=0, prompt_share=0.5))
    assert half.tolist() == [[0, 1, 5, 6]], "two image slots, two prompt slots, ranked by sim_image"
    all_prompt = select_pool(
        rows, sim_image, sim_prompt, keep, PoolSettings(pool=3, min_pool=0, prompt_share=1.0)
    )
    assert all_prompt.tolist() == [[4, 5, 6]]
    short = select_pool(
        rows, sim_image, sim_prompt, keep & (rows < 2), PoolSettings(pool=4, min_pool=0, prompt_share=0.5)
    )
    assert short.tolist() == [[0, 1, -1, -1]]
    tied = select_pool(
        rows, np.full((1, 8), 0.5), sim_prompt, keep, PoolSettings(pool=3, min_pool=0, prompt_share=0.0)
    )
    assert tied.tolist() == [[0, 1, 2]], "ties go to the lower corpus row"


@pytest.mark.parametrize("prompt_share", [0.0, 0.25])
def test_pools_exclude_positive_and_near_duplicates(prompt_share: float) -> None:
    rng = np.random.default_rng(0)
    vectors, _ = clustered_unit_vectors(400, 16, 8, 0.12, rng, dtype=np.float16)
    vectors[7] = vectors[3]  # an identical copy of pair 0's positive under another id
    positive_rows = np.array([3, 50, 120, 399])
    prompt, _ = clustered_unit_vectors(4, 16, 2, 0.3, rng)
    chosen = vectors[positive_rows].astype(np.float32)  # a perfect caption: nothing else matches as well
    settings = PoolSettings(pool=20, headroom=10, prompt_share=prompt_share, dup_threshold=0.9, margin=0.0)
    pools = build_pools(brute_force(vectors), vectors, positive_rows, prompt, chosen, settings)
    assert pools.rows.shape == (4, 20)
    full = vectors.astype(np.float32)
    for p, positive in enumerate(positive_rows):
        rows = pools.rows[p][pools.rows[p] >= 0]
        assert len(rows) == pools.sizes[p] == len(set(rows.tolist()))
        assert positive not in rows and (p != 0 or 7 not in rows)
        sims = full[rows] @ full[positive]
        assert (sims < 0.9).all()
        np.testing.assert_allclose(pools.sim_image[p, : len(rows)], sims, atol=1e-5)
        np.testing.assert_allclose(pools.sim_prompt[p, : len(rows)], full[rows] @ prompt[p], atol=1e-5)
        assert (np.diff(pools.sim_image[p, : len(rows)]) <= 0).all(), "rank 0 is the most similar"
    assert pools.removed["self"] == 4 and pools.removed["duplicate"] == 1
    assert pools.removed["near_duplicate"] > 0
    assert pools.retrieved >= 4 * 30


def test_pools_without_prompt_share_are_the_filtered_image_neighbours() -> None:
    rng = np.random.default_rng(1)
    vectors, _ = clustered_unit_vectors(300, 12, 6, 0.2, rng, dtype=np.float16)
    positive_rows = np.arange(0, 300, 37)
    prompt, _ = clustered_unit_vectors(len(positive_rows), 12, 2, 0.3, rng)
    chosen = -vectors[positive_rows].astype(np.float32)  # no candidate is a false negative here
    settings = PoolSettings(pool=10, headroom=5, prompt_share=0.0, dup_threshold=2.0, margin=-2.0)
    pools = build_pools(brute_force(vectors), vectors, positive_rows, prompt, chosen, settings)
    full = vectors.astype(np.float32)
    for p, positive in enumerate(positive_rows):
        order = np.argsort(-(full @ full[positive]), kind="stable")
        assert pools.rows[p].tolist() == [r for r in order if r != positive][:10]


def test_tiny_corpus_gives_short_pools_and_empty_batch_works() -> None:
    vectors = np.eye(4, 8, dtype=np.float16)
    settings = PoolSettings(pool=6, headroom=2, min_pool=0)
    chosen = vectors[:2].astype(np.float32)
    pools = build_pools(brute_force(vectors), vectors, np.array([0, 1]), np.ones((2, 8)), chosen, settings)
    assert pools.sizes.tolist() == [3, 3] and pools.rows.shape == (2, 6)
    empty = build_pools(
        brute_force(vectors), vectors, np.zeros(0, np.int64), np.zeros((0, 8)), chosen[:0], settings
    )
    assert empty.rows.shape == (0, 6) and empty.retrieved == 0


def test_pools_above_the_gpu_k_limit_are_whole_and_gathered_in_parts() -> None:
    rng = np.random.default_rng(2)
    vectors, _ = clustered_unit_vectors(3000, 8, 5, 0.3, rng, dtype=np.float16)
    settings = PoolSettings(pool=GPU_MAX_K + 52, headroom=16, dup_threshold=2.0, margin=-2.0)
    searcher = Searcher(build_index(vectors, IndexSpec("Flat")), IndexSpec("Flat"), "auto", settings.k)
    assert searcher.k_max is None, "k above the GPU limit searches on the CPU"
    positive_rows = np.arange(0, 3000, 8)
    assert len(positive_rows) * 2 * settings.k * 8 > GATHER_FLOATS, "needs several gather parts"
    prompt, _ = clustered_unit_vectors(len(positive_rows), 8, 3, 0.3, rng)
    chosen = -vectors[positive_rows].astype(np.float32)
    pools = build_pools(searcher.search, vectors, positive_rows, prompt, chosen, settings)
    assert (pools.sizes == settings.pool).all(), "never truncated to the GPU limit"
    full = vectors.astype(np.float32)
    for p in (0, len(positive_rows) - 1):
        rows = pools.rows[p]
        assert positive_rows[p] not in rows and len(set(rows.tolist())) == settings.pool
        np.testing.assert_allclose(pools.sim_image[p], full[rows] @ full[positive_rows[p]], atol=1e-5)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="min_pool"):
        PoolSettings(pool=4, min_pool=5)
    with pytest.raises(ValueError, match="prompt_share"):
        PoolSettings(prompt_share=1.5)
